"""A fault hook for resume tests: `tick(kind)` marks a point where a process may be killed.

With the environment variable ROBUSTNAS_CRASH_AT="<kind>:<n>" (e.g. "step:37"), the n-th call of
tick(kind) in this process ends it at once with os._exit(75): no cleanup, no atexit, no flushed buffers,
as a kill would. Unset, tick does nothing but count. The variable is read once, when this module is
imported, and removed from the environment then, so processes started later (executor workers) do not
inherit a crash meant for this one.

Callers: every optimisation step of a training or search (tick("step"), through the epoch scaffold's
users, training/loop.py), and every file the run directory writes (tick("write"), core/rundir.py).
"""

from __future__ import annotations

import os

CRASH_EXIT_CODE = 75


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    kind, _, n = spec.rpartition(":")
    if not kind or not n.isdigit() or int(n) < 1:
        raise ValueError(f"ROBUSTNAS_CRASH_AT={spec!r}: expected <kind>:<n> with n >= 1, e.g. step:37")
    return kind, int(n)


_CRASH_AT = _parse(os.environ.pop("ROBUSTNAS_CRASH_AT", ""))
_counts: dict[str, int] = {}


def tick(kind: str) -> None:
    """Count one call of `kind`; end the process if this is the call ROBUSTNAS_CRASH_AT names."""
    if _CRASH_AT is None:
        return
    n = _counts[kind] = _counts.get(kind, 0) + 1
    if (kind, n) == _CRASH_AT:
        os._exit(CRASH_EXIT_CODE)
