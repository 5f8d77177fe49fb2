"""core/faults.py: tick() kills the process at the tick ROBUSTNAS_CRASH_AT names and counts ticks into
ROBUSTNAS_COUNT_TICKS, in the process that read them only (never in its worker processes)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from robustnas.core.faults import CRASH_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTNAS_")}
    full.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_the_named_tick_ends_the_process_at_once_with_exit_code_75():
    p = _python("""
        from robustnas.core.faults import tick
        for i in range(1, 6):
            tick("step")
            tick("write")
            print("after write", i, flush=True)
        """, ROBUSTNAS_CRASH_AT="write:3")
    assert p.returncode == CRASH_EXIT_CODE == 75
    assert p.stdout.split("\n")[:-1] == ["after write 1", "after write 2"]
    assert "killed at write point 3" in p.stderr
    # "*" counts every kind: the 4th tick is the second step
    p = _python("""
        from robustnas.core.faults import tick
        for kind in ("step", "write", "item", "step", "write"):
            tick(kind)
            print(kind, flush=True)
        """, ROBUSTNAS_CRASH_AT="*:4")
    assert p.returncode == 75 and p.stdout.split() == ["step", "write", "item"]


def test_unset_nothing_happens_and_a_bad_setting_is_refused():
    p = _python("""
        from robustnas.core.faults import tick
        for _ in range(100):
            tick("write")
        print("done")
        """)
    assert p.returncode == 0 and p.stdout == "done\n"
    p = _python("import robustnas.core.faults", ROBUSTNAS_CRASH_AT="write")
    assert p.returncode == 1 and "expected <kind>:<n>" in p.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a worker")
def test_ticks_are_counted_in_this_process_only_never_in_its_workers(tmp_path):
    counts = tmp_path / "ticks.txt"
    p = _python("""
        import os, subprocess, sys
        from robustnas.core.faults import tick
        tick("write")
        assert "ROBUSTNAS_CRASH_AT" not in os.environ and "ROBUSTNAS_COUNT_TICKS" not in os.environ
        # a started worker process and a forked one: neither is killed at tick 2, neither counts
        code = "from robustnas.core.faults import tick\\nfor _ in range(5): tick('write')"
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0
        pid = os.fork()
        if pid == 0:
            for _ in range(5):
                tick("write")
            os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        tick("item")
        print("survived", flush=True)
        tick("write")
        print("not reached", flush=True)
        """, ROBUSTNAS_CRASH_AT="write:2", ROBUSTNAS_COUNT_TICKS=str(counts))
    assert p.returncode == 75, p.stderr
    assert p.stdout == "survived\n"
    assert counts.read_text().split() == ["write", "item", "write"]


def test_rundir_writes_are_ticks(tmp_path):
    p = _python(f"""
        from robustnas.core.rundir import write_json
        for i in range(3):
            write_json({str(tmp_path)!r} + f"/{{i}}.json", {{"i": i}})
        """, ROBUSTNAS_CRASH_AT="write:3")
    assert p.returncode == 75
    assert sorted(f.name for f in tmp_path.iterdir()) == ["0.json", "1.json"]  # killed before the third
