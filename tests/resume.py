"""The resume harness behind the `resume_check` fixture (tests/conftest.py): a command killed mid-way and
resumed must end with exactly the numbers of an uninterrupted run.

One check, for a CLI argument list and a function that reads the final numbers of an output directory:
1. run `robustnas <args> --out A` uninterrupted, counting the fault points it passes (core/faults.py:
   ROBUSTNAS_COUNT_TICKS), and read its numbers;
2. run `robustnas <args> --out B` with ROBUSTNAS_CRASH_AT=<kind>:<n>, n about `at` of the way through
   those points; it must end with the crash's exit code 75, and B must not yet hold A's numbers (with
   several points in `at`, the --resume runs that follow are killed too, one at each);
3. run `robustnas <args> --out B --resume` to the end and compare B's numbers with A's: equal.

Commands run as `python -m robustnas.app.cli` in other processes, one torch thread each. By default they
are forked from one server process that imported torch and robustnas once (CliServer), which saves the
seconds of import every process would otherwise spend; ROBUSTNAS_TEST_FORK=0 runs each as a fresh
`python -m robustnas.app.cli` process instead (the same numbers, slower).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from robustnas.core.faults import COUNT_ENV, CRASH_ENV, CRASH_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
# what every command process gets: this checkout's robustnas, one thread (tiny nets; and repeatable)
BASE_ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
PRELOAD = ("torch", "torch._dynamo", "torch.utils.flop_counter", "matplotlib.pyplot", "sklearn.datasets",
           "pyautoattack", "robustnas.app.cli", "robustnas.app.pipeline", "robustnas.app.study", "robustnas.search",
           "robustnas.search.nsga2", "robustnas.evaluation.evaluate", "robustnas.results.report",
           "robustnas.results.compare", "robustnas.results.store", "robustnas.results.study_report")


# ------------------------------------------------------------------------------------------ running commands
def _cli_main(args: Sequence[str]) -> int:
    """What `python -m robustnas.app.cli args` does, as an exit code."""
    import traceback

    from robustnas.app import cli

    sys.argv = ["robustnas", *args]
    try:
        cli.main()
        code: Any = 0
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    return code


def serve() -> None:
    """The fork server: import everything once, then per request (one JSON line on stdin: args, env, cwd,
    log) fork a child that runs the command with that environment and answer its exit code (one JSON line).
    A child is a fresh command as far as robustnas is concerned: faults.py reads its environment again in a
    process with another pid, and no torch thread exists yet to be lost in the fork (checked)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import robustnas

    proto_in, proto_out = sys.stdin.buffer, sys.stdout.buffer
    where = str(Path(robustnas.__file__).resolve())
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    proto_out.write((json.dumps({"robustnas": where, "threads": threads}) + "\n").encode())
    proto_out.flush()
    for line in proto_in:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the command
            code = 1
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                fd = os.open(os.devnull, os.O_RDONLY)  # not the server's requests
                os.dup2(fd, 0)
                os.close(fd)
                os.environ.clear()
                os.environ.update(req["env"])
                os.chdir(req["cwd"])
                code = _cli_main(req["args"])
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        proto_out.write((json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n").encode())
        proto_out.flush()


class CliServer:
    """Runs robustnas commands in other processes: forked from a server process (fast) or, when forking is
    off or unsafe, as `python -m robustnas.app.cli` processes."""

    def __init__(self, fork: Optional[bool] = None):
        if fork is None:
            fork = os.environ.get("ROBUSTNAS_TEST_FORK", "1") != "0" and hasattr(os, "fork")
        self.proc: Optional[subprocess.Popen] = None
        if fork:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; "
                                       f"import resume; resume.serve()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **BASE_ENV}, cwd=str(ROOT))
            hello = json.loads(self.proc.stdout.readline() or b"null")
            if not hello or not hello["robustnas"].startswith(str(ROOT)) or hello["threads"] != 1:
                self.close()  # another robustnas on the path, or threads that a fork would lose: no forking

    def run(self, args: Sequence[str], cwd: Path, log: Path, env: Optional[dict[str, str]] = None) -> int:
        """Run `robustnas <args>` in `cwd` with os.environ + `env`; its output goes to `log`. The exit code."""
        full = {**os.environ, **BASE_ENV, **(env or {})}
        if self.proc is not None:
            req = {"args": [str(a) for a in args], "env": full, "cwd": str(cwd), "log": str(log)}
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())["rc"]
        with open(log, "w") as f:
            return subprocess.run([sys.executable, "-m", "robustnas.app.cli", *map(str, args)], cwd=cwd, env=full,
                                  stdout=f, stderr=subprocess.STDOUT).returncode

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


# ------------------------------------------------------------------------------------------ reading numbers
TIMING = re.compile(r"(^|_)seconds$|(^|_)sessions$|latency|_ms(_|$)|^images_per_s$|^cost_s$")


def stripped(obj: Any, out: Optional[Path] = None) -> Any:
    """`obj` without wall-clock figures (keys like seconds, *_seconds, images_per_s; *_sessions, how many
    processes the work took) and with the output
    directory's path written as <out>: what must be equal between an interrupted and an uninterrupted run."""
    if isinstance(obj, dict):
        return {k: stripped(v, out) for k, v in obj.items() if not TIMING.search(str(k))}
    if isinstance(obj, list):
        return [stripped(v, out) for v in obj]
    if isinstance(obj, str) and out is not None:
        return obj.replace(str(out.resolve()), "<out>").replace(str(out), "<out>")
    return obj


def read_numbers(out: Path, *names: str) -> dict[str, Any]:
    """The files `names` of `out` as data without timings: .json as JSON, .jsonl as a list of JSON lines,
    .csv as a list of rows, .safetensors as the SHA-256 of its bytes (the same tensors, bit for bit), other
    files as text. A missing file raises FileNotFoundError."""
    numbers: dict[str, Any] = {}
    for name in names:
        path = out / name
        if name.endswith(".safetensors"):
            numbers[name] = hashlib.sha256(path.read_bytes()).hexdigest()
            continue
        text = path.read_text()
        if name.endswith(".jsonl"):
            value: Any = [json.loads(line) for line in text.splitlines()]
        elif name.endswith(".json"):
            value = json.loads(text)
        elif name.endswith(".csv"):
            value = list(csv.reader(text.splitlines()))
        else:
            value = text
        numbers[name] = stripped(value, out)
    return numbers


# ------------------------------------------------------------------------------------------ the check
class ResumeHarness:
    def __init__(self, server: CliServer, tmp: Path):
        self.server, self.tmp = server, tmp

    def _run(self, args: Sequence[str], out: Path, tag: str, env: Optional[dict] = None) -> tuple[int, Path]:
        log = self.tmp / f"{tag}.log"
        return self.server.run([*args, "--out", str(out), "--no-progress"], self.tmp, log, env), log

    def check(self, args: Sequence[str], read: Callable[[Path], Any], kind: str = "write",
              at: Sequence[float | int] = (0.5,), after_kill: Optional[Callable[[Path], Any]] = None) -> Any:
        """Kill `robustnas <args>` at each point of `at`: a float is that share of the `kind` ticks the
        uninterrupted run made ("*": ticks of every kind), an int that tick itself, counted in the process
        killed; with several points the first kills a fresh run and each next one the --resume run after it.
        Then --resume to the end, and assert read(interrupted dir) == read(uninterrupted dir). Returns the
        numbers. `after_kill(interrupted dir)`, when given, is called after each kill (to look at what the
        killed run left, e.g. its checkpoint's recorded time)."""
        ref_dir, cut_dir, ticks = self.tmp / "uninterrupted", self.tmp / "interrupted", self.tmp / "ticks.txt"
        rc, log = self._run(args, ref_dir, "uninterrupted", {COUNT_ENV: str(ticks)})
        assert rc == 0, f"uninterrupted run failed ({rc}):\n{log.read_text()[-3000:]}"
        expected = read(ref_dir)
        counted = ticks.read_text().split() if ticks.exists() else []
        total = len(counted) if kind == "*" else counted.count(kind)
        assert total >= 2, f"the uninterrupted run passed {total} {kind!r} point(s): nothing to interrupt mid-way"
        for i, share in enumerate(at):
            n = share if isinstance(share, int) else min(max(1, round(share * total)), total)
            resume = ["--resume"] if i else []
            rc, log = self._run([*args, *resume], cut_dir, f"crash{i}", {CRASH_ENV: f"{kind}:{n}"})
            assert rc == CRASH_EXIT_CODE, (f"run {i} should have been killed at {kind} point {n} (of {total} in "
                                           f"the uninterrupted run) but ended with {rc}:\n{log.read_text()[-3000:]}")
            try:
                early = read(cut_dir)
            except (FileNotFoundError, KeyError, ValueError, IndexError):
                early = None
            assert early != expected, (f"killed at {kind} point {n} of {total}, the run had already written its "
                                       f"final numbers: choose an earlier point")
            if after_kill is not None:
                after_kill(cut_dir)
        rc, log = self._run([*args, "--resume"], cut_dir, "resume")
        assert rc == 0, f"--resume failed ({rc}):\n{log.read_text()[-3000:]}"
        got = read(cut_dir)
        assert got == expected, _first_difference(expected, got)
        return expected


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where an uninterrupted (a) and a resumed (b) run first differ, for the assertion message."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}/{k}: only in the {'resumed' if k in b else 'uninterrupted'} run"
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], f"{path}/{k}")
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items uninterrupted, {len(b)} resumed"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: uninterrupted {str(a)[:300]} != resumed {str(b)[:300]}"
