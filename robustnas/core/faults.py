"""Fault injection for the resume tests: `tick(kind)` marks a point where a long command may be killed.

A command calls `tick("write")` before every file it writes (core/rundir.atomic_write), `tick("step")` once
per optimisation step (the training loops) and `tick("item")` where it finishes a unit of work that writes
no file. Two environment variables, read once per process, make the ticks do something:

- ROBUSTNAS_CRASH_AT="<kind>:<n>" ends the process at the n-th call of tick(kind) with os._exit(75): a hard
  kill, no cleanup, no finally blocks, so a resumed run must cope with whatever was on disk at that moment.
  Kind "*" counts every tick, whatever its kind.
- ROBUSTNAS_COUNT_TICKS=<file> appends one line per tick (its kind) to <file>, so a test can count the
  ticks of an uninterrupted run and choose a point mid-way (tests/resume.py).

Unset (every real run), tick() costs a pid comparison. Only the process that read the variables acts on
them: they are removed from os.environ when read, so worker processes the command starts (the executor's
pool, Ray) neither crash nor count, and a process forked from this one reads its own (empty) environment
again instead of sharing this one's counts.
"""

from __future__ import annotations

import os
from typing import Optional

CRASH_ENV = "ROBUSTNAS_CRASH_AT"
COUNT_ENV = "ROBUSTNAS_COUNT_TICKS"
CRASH_EXIT_CODE = 75  # EX_TEMPFAIL: the tests tell an injected crash from any other failure by it

_pid: Optional[int] = None          # the process the settings below were read in
_crash: Optional[tuple[str, int]] = None
_count_fd: Optional[int] = None
_counts: dict[str, int] = {}


def _read_env() -> None:
    """This process's settings, taken out of the environment so that no child process inherits them."""
    global _pid, _crash, _count_fd, _counts
    _pid, _crash, _counts = os.getpid(), None, {}
    _count_fd = None
    crash = os.environ.pop(CRASH_ENV, None)
    count = os.environ.pop(COUNT_ENV, None)
    if crash:
        kind, sep, n = crash.rpartition(":")
        if not sep or not kind or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{CRASH_ENV}={crash!r}: expected <kind>:<n> with n >= 1, e.g. write:5")
        _crash = (kind, int(n))
    if count:
        _count_fd = os.open(count, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def tick(kind: str) -> None:
    """One more point of kind `kind` passed in this process: counted, and the process ended here when it is
    the point ROBUSTNAS_CRASH_AT names."""
    if _pid != os.getpid():
        _read_env()
    if _crash is None and _count_fd is None:
        return
    n = _counts[kind] = _counts.get(kind, 0) + 1
    every = _counts["*"] = _counts.get("*", 0) + 1
    if _count_fd is not None:
        os.write(_count_fd, f"{kind}\n".encode())  # unbuffered: nothing is lost when the process is killed
    if _crash == (kind, n) or _crash == ("*", every):
        _report(kind, n)
        os._exit(CRASH_EXIT_CODE)


def _report(kind: str, n: int) -> None:
    """Where the process was killed, on stderr: the test's log shows which write or step it was."""
    import sys
    import traceback

    sys.stderr.write(f"robustnas: killed at {kind} point {n} ({CRASH_ENV}), in:\n")
    traceback.print_stack(sys._getframe(2), limit=8, file=sys.stderr)
    sys.stderr.flush()


_read_env()  # at import, before the command can start any worker process
