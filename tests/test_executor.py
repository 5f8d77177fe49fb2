"""Executors: the in-process, pool and Ray backends give the same results in the order of the items, a
worker that dies mid-candidate is replaced and its candidate retried, and fn's own exceptions propagate."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robustnas.data.datasets import load_dataset
from robustnas.core.errors import UserError
from robustnas.core.executor import EXECUTORS, WorkerLost, executor_flags, make_executor
from robustnas.search import SearchContext, build_strategy
from robustnas.search.random import RandomConfig
from robustnas.search.tamnas import TamNasConfig
from robustnas.app.study import StudyCommand

ITEMS = [5, 0, 3, 1, 4, 2]


# --------------------------------------------------------------------------- fns shipped to workers
def fit_tiny(seed: int) -> dict:
    """A real small torch job that seeds itself from its item: SGD on a tiny MLP over seeded data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    return {"seed": seed, "loss": loss.item(), "w": [p.detach().double().sum().item() for p in net.parameters()],
            "pid": os.getpid()}


def strip_pid(results):
    return [{k: v for k, v in r.items() if k != "pid"} for r in results]


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("candidate 3 is bad")
    return x


def torch_threads(_) -> int:
    return torch.get_num_threads()


class DieOnce:
    """Kills its worker process the first time it meets `victim` (a marker file remembers across processes)."""

    def __init__(self, marker: Path, victim: int, always: bool = False):
        self.marker, self.victim, self.always = str(marker), victim, always

    def __call__(self, x: int) -> int:
        if x == self.victim:
            seen = Path(self.marker)
            if self.always or not seen.exists():
                seen.touch()
                os._exit(13)
        return 10 * x


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pool():
    ex = make_executor("pool", workers=2)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def ray_ex():
    pytest.importorskip("ray")
    ex = make_executor("ray", workers=2)
    yield ex
    ex.close()


# --------------------------------------------------------------------------- the three backends agree
def test_backends_registered():
    assert set(EXECUTORS) == {"inprocess", "pool", "ray"}


def test_pool_matches_inprocess_in_item_order(pool):
    expected = make_executor("inprocess").map(fit_tiny, ITEMS)
    got = pool.map(fit_tiny, ITEMS)
    assert [r["seed"] for r in got] == ITEMS
    assert strip_pid(got) == strip_pid(expected)
    assert len({r["pid"] for r in got}) >= 1 and os.getpid() not in {r["pid"] for r in got}
    assert len({r["loss"] for r in got}) == len(ITEMS)  # the items really differ
    assert pool.map(torch_threads, [0, 1]) == [1, 1]  # 2 workers x 1 thread: within the cores


def test_on_result_sees_every_index_once(pool):
    seen = {}
    out = pool.map(fit_tiny, ITEMS, on_result=lambda i, r: seen.setdefault(i, r))
    assert sorted(seen) == list(range(len(ITEMS))) and [seen[i] for i in range(len(ITEMS))] == out


def test_exception_in_fn_propagates(pool):
    with pytest.raises(ValueError, match="candidate 3 is bad"):
        make_executor("inprocess").map(fail_on_three, ITEMS)
    with pytest.raises(ValueError, match="candidate 3 is bad"):
        pool.map(fail_on_three, ITEMS)
    assert pool.map(fail_on_three, [1, 2]) == [1, 2]  # the pool is still usable


def test_dead_worker_is_replaced_and_its_candidate_retried(pool, tmp_path):
    marker = tmp_path / "died"
    done = []
    out = pool.map(DieOnce(marker, victim=4), ITEMS, on_result=lambda i, r: done.append(i))
    assert marker.exists()  # a worker really died
    assert out == [10 * x for x in ITEMS]
    assert sorted(done) == list(range(len(ITEMS)))  # each result reported once, retries included
    assert strip_pid(pool.map(fit_tiny, ITEMS[:2])) == strip_pid([fit_tiny(s) for s in ITEMS[:2]])


def test_a_candidate_that_always_kills_its_worker_gives_up(tmp_path):
    with make_executor("pool", workers=1, max_retries=1) as ex:
        with pytest.raises(WorkerLost, match="candidate 1"):
            ex.map(DieOnce(tmp_path / "m", victim=7, always=True), [1, 7, 2])


def test_a_script_without_main_guard_gets_a_one_line_fix(tmp_path):
    """Spawned workers import the calling script: unguarded, they die while starting, and the message says
    how to fix it instead of retrying."""
    body = "from robustnas.core.executor import make_executor\nex = make_executor('pool', workers=1)\n"
    bad, good = tmp_path / "bad.py", tmp_path / "good.py"
    bad.write_text(body + "print(ex.map(abs, [1, -2]))\n")
    good.write_text(body + "if __name__ == '__main__':\n    print(ex.map(abs, [1, -2]))\n    ex.close()\n")
    run = lambda p: subprocess.run([sys.executable, str(p)], capture_output=True, text=True)  # noqa: E731
    failed = run(bad)
    assert failed.returncode != 0 and "if __name__ == '__main__':" in failed.stderr.strip().splitlines()[-1]
    assert "lost its worker" not in failed.stderr
    ok = run(good)
    assert ok.returncode == 0 and ok.stdout.strip() == "[1, 2]"


def test_tamnas_scorer_runs_on_the_pool(pool):
    """The real TAM-NAS SubnetScorer (holding the supernet) pickles and scores alike in a worker."""
    digits = load_dataset("digits", seed=0)
    s = build_strategy("tamnas", {"eval_n": 24, "eval_pgd_steps": 2, "recal_batches": 1, "recal_batch_size": 16})
    s.setup(SearchContext(digits, eps=0.1, seed=0, progress=False))
    scorer = s.scorer()
    encodings = [s.space.largest(), s.space.smallest(), s.space.sample(__import__("numpy").random.default_rng(2))]
    here = [scorer(e) for e in encodings]
    assert pool.map(scorer, encodings) == here
    assert len({r["params"] for r in here}) == 3


# --------------------------------------------------------------------------- settings
def test_bad_settings_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(UserError, match="takes no option 'workers'"):
        make_executor("inprocess", workers=2)
    with pytest.raises(UserError, match="workers"):
        make_executor("pool", workers=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(UserError, match=r"pip install robustnas\[ray\]"):
        make_executor("ray")
    with pytest.raises(UserError, match=r"pip install robustnas\[ray\]"):
        build_strategy("tamnas", {"executor": "ray"})


def test_tamnas_accepts_pool_and_ray_settings():
    s = build_strategy("tamnas", {"executor": "pool", "executor_options": {"workers": 2}})
    assert (s.cfg.executor, s.cfg.executor_options) == ("pool", {"workers": 2})


def test_command_line_flags_name_the_executor():
    assert executor_flags() == {}
    assert executor_flags(workers=3) == {"executor": "pool", "executor_options": {"workers": 3}}
    assert executor_flags(ray=True) == {"executor": "ray", "executor_options": {}}
    assert executor_flags(workers=2, ray_address="auto") == {"executor": "ray",
                                                             "executor_options": {"workers": 2, "address": "auto"}}
    for config in (TamNasConfig, RandomConfig, StudyCommand):  # every config with an executor takes them
        cfg = config.model_validate(executor_flags(workers=2))
        assert (cfg.executor, cfg.executor_options) == ("pool", {"workers": 2})
        with pytest.raises(ValidationError, match="workers"):
            config.model_validate(executor_flags(workers=0))
    with pytest.raises(UserError, match="do not apply; they do to random, tamnas"):
        build_strategy("darts", executor_flags(workers=2))


# --------------------------------------------------------------------------- Ray (local mode)
def test_ray_matches_inprocess_and_retries_a_dead_worker(ray_ex, tmp_path):
    expected = strip_pid([fit_tiny(s) for s in ITEMS])
    assert strip_pid(ray_ex.map(fit_tiny, ITEMS)) == expected
    marker = tmp_path / "died"
    assert ray_ex.map(DieOnce(marker, victim=2), ITEMS) == [10 * x for x in ITEMS]
    assert marker.exists()
    with pytest.raises(ValueError, match="candidate 3 is bad"):
        ray_ex.map(fail_on_three, ITEMS)
    assert ray_ex.map(torch_threads, [0, 1]) == [1, 1]
