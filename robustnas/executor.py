"""Where candidate evaluations run. A population-based search hands a whole generation to `map` at once,
so the same search runs in this process today and on a process pool or a Ray cluster later, unchanged.

The contract every executor keeps, so that the backends are interchangeable:
- `fn` and every item are picklable (a top-level function or a callable object holding what it needs,
  e.g. the supernet; plain-data items such as integer encodings), because other backends ship them to
  other processes or machines;
- results come back as a list in the order of `items`, whatever order they finished in;
- `fn` is deterministic in its item (it seeds itself from it), so results do not depend on the backend
  or on which worker ran what;
- an exception raised by `fn` propagates out of `map`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, TypeVar, runtime_checkable

from robustnas.errors import UserError

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Runs every evaluation here, one after the other."""

    name = "inprocess"

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass

    def __enter__(self) -> "InProcessExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


EXECUTORS: dict[str, Callable[..., Executor]] = {"inprocess": InProcessExecutor}


def make_executor(name: str = "inprocess", **options) -> Executor:
    """The executor called `name` (see EXECUTORS), built with backend `options`."""
    try:
        factory = EXECUTORS[name]
    except KeyError:
        raise UserError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}") from None
    return factory(**options)
