"""Where candidate evaluations run. A population-based search hands a whole generation to `map` at once,
so the same search runs in this process, on a local process pool or on a Ray cluster, unchanged.

The contract every executor keeps, so that the backends are interchangeable:
- `fn` and every item are picklable (a top-level function or a callable object holding what it needs,
  e.g. the supernet; plain-data items such as integer encodings), because other backends ship them to
  other processes or machines; `fn` is pickled once per `map` call and loaded once per worker;
- results come back as a list in the order of `items`, whatever order they finished in;
- `fn` is deterministic in its item (it seeds itself from it), so results do not depend on the backend
  or on which worker ran what (bit-identical on CPU when the torch thread counts match: workers use
  `threads`, 1 by default);
- an exception raised by `fn` propagates out of `map` (never retried); a worker process that dies
  mid-candidate (killed, out of memory, os._exit) is replaced and its candidate retried, up to
  `max_retries` times, then `WorkerLost` is raised;
- `on_result(index, result)` is called in this process as each result arrives, once per item.
"""

from __future__ import annotations

import importlib.util
import inspect
import multiprocessing
import os
import pickle
import sys
import tempfile
import uuid
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import ProcessPoolExecutor as _Pool
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Optional, Protocol, TypeVar
from typing import runtime_checkable

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from robustnas.core.config import Base
from robustnas.core.errors import UserError

T = TypeVar("T")
R = TypeVar("R")
OnResult = Optional[Callable[[int, Any], None]]


class WorkerLost(RuntimeError):
    """A candidate's worker died more than `max_retries` times (killed, out of memory, a crash in C)."""


@runtime_checkable
class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[T], R], items: Iterable[T], on_result: OnResult = None) -> list[R]: ...

    def close(self) -> None: ...


class _Closing:
    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def available_cores() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _check_counts(name: str, workers: Optional[int] = None, threads: int = 1, max_retries: int = 0) -> None:
    if (workers is not None and (not isinstance(workers, int) or workers < 1)) or not isinstance(threads, int) \
            or threads < 1 or not isinstance(max_retries, int) or max_retries < 0:
        raise UserError(f"{name} executor: workers ({workers}) and threads ({threads}) must be at least 1 "
                        f"and max_retries ({max_retries}) at least 0")


class InProcessExecutor(_Closing):
    """Runs every evaluation here, one after the other."""

    name = "inprocess"

    def map(self, fn: Callable[[T], R], items: Iterable[T], on_result: OnResult = None) -> list[R]:
        out = []
        for i, item in enumerate(items):
            out.append(fn(item))
            if on_result is not None:
                on_result(i, out[-1])
        return out


# ------------------------------------------------------------------------------------------ worker side
_LOADED: Optional[tuple[str, Callable]] = None  # (token, fn): each worker unpickles a map call's fn once


def _set_threads(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _init_pool_worker(threads: int, started: Any) -> None:
    """Each worker's thread count, so that workers x threads stays within the cores (the variables reach
    libraries that read them when they start); `started` counts the workers that got this far."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    _set_threads(threads)
    with started.get_lock():
        started.value += 1


def _pool_call(token: str, path: str, item: Any) -> Any:
    global _LOADED
    if _LOADED is None or _LOADED[0] != token:
        _LOADED = (token, pickle.loads(Path(path).read_bytes()))
    return _LOADED[1](item)


def _ray_call(token: str, box: list, item: Any, threads: int) -> Any:
    """`box` holds the ObjectRef of the pickled fn, wrapped so that Ray does not fetch it for every task."""
    global _LOADED
    _set_threads(threads)
    if _LOADED is None or _LOADED[0] != token:
        import ray

        _LOADED = (token, pickle.loads(ray.get(box[0])))
    return _LOADED[1](item)


# ------------------------------------------------------------------------------------------ process pool
class PoolExecutor(_Closing):
    """A local pool of `workers` processes (spawn or forkserver: safe beside torch), kept across `map`
    calls. At most `workers` candidates are in flight, so a dead worker costs only its own candidates."""

    name = "pool"

    def __init__(self, workers: Optional[int] = None, threads: int = 1, max_retries: int = 2,
                 start_method: str = "spawn"):
        _check_counts("pool", workers, threads, max_retries)
        cores = available_cores()
        workers = cores if workers is None else workers
        if start_method not in ("spawn", "forkserver"):
            raise UserError(f"pool executor: start_method must be spawn or forkserver, not {start_method!r} "
                            "(fork is unsafe once torch has started threads)")
        self.workers, self.max_retries, self.start_method = workers, max_retries, start_method
        self.threads = max(1, min(threads, cores // workers))  # workers x threads <= cores
        self._pool: Optional[_Pool] = None

    def _get_pool(self) -> _Pool:
        if self._pool is None:
            ctx = multiprocessing.get_context(self.start_method)
            self._started = ctx.Value("i", 0)
            self._pool = _Pool(max_workers=self.workers, mp_context=ctx, initializer=_init_pool_worker,
                               initargs=(self.threads, self._started))
        return self._pool

    def _drop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        self._drop_pool()

    def map(self, fn: Callable[[T], R], items: Iterable[T], on_result: OnResult = None) -> list[R]:
        items = list(items)
        if not items:
            return []
        results: list[Any] = [None] * len(items)
        attempts = [0] * len(items)
        todo, running = deque(range(len(items))), {}  # running: Future -> item index
        error: Optional[BaseException] = None
        with _pickled_to_file(fn) as (token, path):
            while todo or running:
                if error is None:
                    pool = self._get_pool()
                    while todo and len(running) < self.workers:
                        i = todo.popleft()
                        running[pool.submit(_pool_call, token, path, items[i])] = i
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                lost: list[int] = []
                for fut in done:
                    error = self._collect(fut, running.pop(fut), results, lost, on_result, error)
                if lost:  # the pool is broken: every future still running fails the same way
                    for fut in wait(running).done:
                        error = self._collect(fut, running.pop(fut), results, lost, on_result, error)
                    self._drop_pool()
                    if self._started.value == 0:
                        raise UserError("the pool's worker processes died while starting: a script that uses the "
                                        "pool executor must do its work under `if __name__ == '__main__':` "
                                        "(each spawned worker imports the script)")
                    for i in sorted(lost, reverse=True):
                        attempts[i] += 1
                        if attempts[i] > self.max_retries:
                            raise WorkerLost(f"candidate {i} ({_short(items[i])}) lost its worker process "
                                             f"{attempts[i]} times (killed? out of memory?); giving up")
                        todo.appendleft(i)
        if error is not None:
            raise error
        return results

    @staticmethod
    def _collect(fut: Future, i: int, results: list, lost: list[int], on_result: OnResult,
                 error: Optional[BaseException]) -> Optional[BaseException]:
        """Store one finished future's result; returns the first exception of fn seen so far."""
        try:
            r = fut.result()
        except BrokenProcessPool:
            lost.append(i)
            return error
        except BaseException as e:  # fn's own exception: not retried, raised once in-flight work is in
            return error if error is not None else e
        results[i] = r
        if on_result is not None:
            on_result(i, r)
        return error


@contextmanager
def _pickled_to_file(fn: Callable) -> Iterator[tuple[str, str]]:
    """fn pickled once into a temporary file that each worker reads once (a supernet is tens of MB)."""
    fd, path = tempfile.mkstemp(prefix="robustnas-fn-", suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(fn, f, protocol=pickle.HIGHEST_PROTOCOL)
        yield uuid.uuid4().hex, path
    finally:
        Path(path).unlink(missing_ok=True)


def _short(item: Any, width: int = 60) -> str:
    text = repr(item)
    return text if len(text) <= width else text[: width - 3] + "..."


# ------------------------------------------------------------------------------------------ Ray
class RayExecutor(_Closing):
    """One Ray task per item, on a local Ray (address=None: started here with `workers` x `threads`
    CPUs) or a running cluster (address="auto" or "ray://host:10001"; robustnas must be installed there).
    With CUDA each task asks for 1/workers of a GPU, so `workers` tasks share one. Ray itself retries a
    task whose worker died (`max_retries`); exceptions raised by fn are not retried."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None, threads: int = 1,
                 num_gpus: Optional[float] = None, max_retries: int = 2):
        try:
            import ray
        except ImportError:
            raise UserError("the ray executor needs Ray, which is not installed: pip install robustnas[ray]") from None
        _check_counts("ray", workers, threads, max_retries)
        self._ray, self.threads, self._owner = ray, threads, False
        if not ray.is_initialized():
            options: dict[str, Any] = {"address": address, "include_dashboard": False, "logging_level": "WARNING"}
            if address is None:
                options["num_cpus"] = (workers or max(1, available_cores() // threads)) * threads
            with _import_path_for_workers(address is None):
                ray.init(**options)
            self._owner = True
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        if num_gpus is None:
            num_gpus = 1.0 / self.workers if _cuda() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self.num_gpus = num_gpus
        self._task = ray.remote(_ray_call).options(num_cpus=threads, num_gpus=num_gpus, max_retries=max_retries,
                                                   retry_exceptions=False)

    def close(self) -> None:
        if self._owner and self._ray.is_initialized():
            self._ray.shutdown()
        self._owner = False

    def map(self, fn: Callable[[T], R], items: Iterable[T], on_result: OnResult = None) -> list[R]:
        ray = self._ray
        items = list(items)
        if not items:
            return []
        box = [ray.put(pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL))]
        token = uuid.uuid4().hex
        refs = [self._task.remote(token, box, item, self.threads) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(items)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                for ref in done:
                    results[index[ref]] = self._get(ref, items[index[ref]])
                    if on_result is not None:
                        on_result(index[ref], results[index[ref]])
            except BaseException:
                # report what already finished to on_result, drop the rest
                finished, pending = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
                for ref in finished:
                    try:
                        r = ray.get(ref)
                    except Exception:
                        continue
                    if on_result is not None:
                        on_result(index[ref], r)
                for ref in pending:
                    ray.cancel(ref, force=False)
                raise
        return results

    def _get(self, ref: Any, item: Any) -> Any:
        from ray.exceptions import RayError, RayTaskError

        try:
            return self._ray.get(ref)
        except RayTaskError as e:  # fn raised: give the caller fn's own exception
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from e
            raise
        except RayError as e:
            raise WorkerLost(f"candidate {_short(item)} lost its Ray worker: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


@contextmanager
def _import_path_for_workers(local: bool) -> Iterator[None]:
    """A local Ray's workers start from PYTHONPATH: give them this process's import path, so that a fn
    defined in a script or test module next to it can be unpickled there."""
    old = os.environ.get("PYTHONPATH")
    if local:
        os.environ["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + ([old] if old else []))
    try:
        yield
    finally:
        if local:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old


EXECUTORS: dict[str, Callable[..., Executor]] = {"inprocess": InProcessExecutor, "pool": PoolExecutor,
                                                 "ray": RayExecutor}


def _known_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
    return name


# a config field naming an executor, checked against EXECUTORS
ExecutorName = Annotated[str, AfterValidator(_known_executor)]


def check_executor(name: str, **options: Any) -> dict[str, Any]:
    """Check an executor's settings without starting anything (a config validates them before a long
    supernet training, not after): a known name, options it takes, its package installed. Returns the
    options to build it with; None-valued ones are left to the backend's defaults."""
    try:
        factory = EXECUTORS[name]
    except KeyError:
        raise UserError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}") from None
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(factory).parameters
    wrong = [k for k in options if k not in accepted]
    if wrong:
        raise UserError(f"executor {name!r} takes no option {wrong[0]!r}; it takes: "
                        f"{', '.join(accepted) or 'none'}")
    counts = {k: options[k] for k in ("workers", "threads", "max_retries") if k in options}
    if counts:
        _check_counts(name, **counts)
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError("the ray executor needs Ray, which is not installed: pip install robustnas[ray]")
    return options


def make_executor(name: str = "inprocess", **options: Any) -> Executor:
    """The executor called `name` (see EXECUTORS), built with backend `options` (see check_executor)."""
    options = check_executor(name, **options)
    return EXECUTORS[name](**options)


class ExecutorSettings(Base):
    """The settings of every config that evaluates candidates through an executor (TAM-NAS, random
    search, the study), checked when the config is read, before any training."""

    executor: ExecutorName = "inprocess"   # inprocess | pool | ray
    executor_options: dict[str, Any] = Field(default={}, validate_default=True)  # e.g. {workers: 2}, {address: auto}

    @field_validator("executor_options")
    @classmethod
    def _check_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "executor" in info.data:  # else the name itself was refused
            try:
                check_executor(info.data["executor"], **v)
            except UserError as e:
                raise ValueError(str(e)) from None
        return v

    def make_executor(self) -> Executor:
        return make_executor(self.executor, **self.executor_options)


def executor_flags(workers: Optional[int] = None, ray: bool = False, ray_address: Optional[str] = None) -> dict:
    """The settings the command line's --workers N / --ray / --ray-address ADDR stand for: a pool of N
    local processes, or Ray (local, or the cluster at ADDR) running N tasks at once. {} when none is given,
    so a config file's own settings stay."""
    if ray or ray_address:
        options = {k: v for k, v in {"workers": workers, "address": ray_address}.items() if v is not None}
        return {"executor": "ray", "executor_options": options}
    if workers is not None:
        return {"executor": "pool", "executor_options": {"workers": workers}}
    return {}
