"""The `run` report's paired comparison of the searched network against its baseline (issue 24)."""

import re

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from robustnas.evaluation.evaluate import write_per_image
from robustnas.results.report import paired_section


def _write(d, robust, clean=None):
    d.mkdir(parents=True, exist_ok=True)
    n = len(robust)
    write_per_image(d, torch.zeros(n, dtype=torch.long),
                    {"clean": torch.ones(n, dtype=torch.bool) if clean is None else clean,
                     "autoattack": torch.as_tensor(robust)})


@pytest.mark.parametrize("only_s,only_b", [(0, 0), (9, 0), (9, 3), (30, 12), (2, 15)])
def test_verdict_p_and_interval_agree(tmp_path, only_s, only_b):
    n = 200
    s = np.zeros(n, bool)
    b = np.zeros(n, bool)
    s[:60] = b[:60] = True  # both survive
    s[60:60 + only_s] = True
    b[100:100 + only_b] = True
    _write(tmp_path, s)
    _write(tmp_path / "baseline", b)
    text = "\n".join(paired_section(tmp_path, {}, {}))
    assert f"broken only for the baseline {only_s}, only for the searched network {only_b}" in text
    p = float(re.search(r"p = ([0-9.e+-]+)", text).group(1))
    expected = 1.0 if only_s + only_b == 0 else binomtest(only_s, only_s + only_b, 0.5).pvalue
    assert p == pytest.approx(expected, rel=1e-3)
    lo, hi = map(float, re.search(r"interval \[([+-][0-9.]+), ([+-][0-9.]+)\]", text).groups())
    diff = (only_s - only_b) / n
    assert lo <= diff <= hi
    differs = "cannot be told apart" not in text
    assert differs == (p < 0.05) == (lo > 0 or hi < 0), text
    if differs:
        assert ("searched network is more robust" in text) == (diff > 0)
    assert "not the search method" in text


def test_only_images_both_were_attacked_on_are_paired(tmp_path):
    _write(tmp_path, np.array([True] * 10 + [False] * 10))
    _write(tmp_path / "baseline", np.array([False] * 10))  # the baseline saw the first 10 images only
    text = "\n".join(paired_section(tmp_path, {}, {}))
    assert "on the 10 test images" in text and "broken only for the baseline 10, only for the searched network 0" in text


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Stat Med 17:873, Table II example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339
    from robustnas.core.stats import newcombe_difference

    d, lo, hi = newcombe_difference(48, 80, 56, 70)
    assert d == pytest.approx(0.2)
    assert (lo, hi) == (pytest.approx(0.0524, abs=5e-4), pytest.approx(0.3339, abs=5e-4))


def _history(robust, val_n=500):
    return [{"epoch": e, "val_robust": r, "val_n": val_n} for e, r in enumerate(robust)]


def test_convergence_says_still_improving_only_when_the_gain_is_shown():
    from robustnas.evaluation.analysis import training_convergence

    rising = training_convergence(_history([0.20, 0.30, 0.38, 0.45]), 500)
    assert rising["status"] == "still improving" and rising["mid_epoch"] == 1 and rising["low"] > 0
    flat = training_convergence(_history([0.20, 0.44, 0.45, 0.45]), 500)
    assert flat["status"] == "no gain shown over the second half" and flat["low"] < 0 < flat["high"]
    # the same gain on 50 validation images is not shown
    small = training_convergence(_history([0.20, 0.30, 0.38, 0.40], 50), 50)
    assert small["status"] == "no gain shown over the second half"
    assert training_convergence(_history([0.3]), 500)["status"] == "unknown"


def test_compare_and_run_reports_carry_a_convergence_line_per_member(tmp_path):
    import json

    from robustnas.results.compare import run_convergence

    run = tmp_path / "r"
    run.mkdir()
    (run / "train.jsonl").write_text("".join(json.dumps(h) + "\n" for h in _history([0.1, 0.2, 0.3, 0.4])))
    assert run_convergence(run)["status"] == "still improving"
    old = tmp_path / "old"
    old.mkdir()
    (old / "train.jsonl").write_text(json.dumps({"epoch": 0, "val_robust": 0.3}) + "\n")
    assert run_convergence(old)["status"] == "unknown" and run_convergence(tmp_path)["status"] == "unknown"
