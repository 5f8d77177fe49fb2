"""Robustness predictors and their harness (issue 28): the correlations and their intervals, determinism,
the surrogate's out-of-sample guarantee, and, where ../shared holds Tiny-RobustBench, the command on it."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr
from typer.testing import CliRunner

from robustnas.app.cli import app
from robustnas.core.errors import UserError
from robustnas.evaluation import predictors as P
from robustnas.nets.spaces.darts import random_genotype

TRB = Path(__file__).resolve().parents[1] / ".." / "shared" / "external" / "tiny-robustbench"
TRB_FILES = [TRB / f"robust_bench_seed_{a}_{a + 1000}.json" for a in (0, 1000, 2000)]
needs_trb = pytest.mark.skipif(not all(f.is_file() for f in TRB_FILES), reason="Tiny-RobustBench not in ../shared")


def _rows(n, seed=0, shape=P.NetShape(C=4, layers=3, in_shape=(3, 8, 8))):
    """n random DARTS genotypes with a made-up robust accuracy (the count baseline plus noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        g = random_genotype(rng)
        robust = P.PREDICTORS["sep_dil_count"].fn(P.Arch(g), 0) + rng.normal()
        rows.append(P.Row(P.Arch(g, shape), robust, 50 + robust, f"made-up[{i}]"))
    return rows


def test_a_monotone_function_of_the_truth_gets_tau_and_rho_one():
    truth = np.random.default_rng(0).normal(size=40)
    for which in ("tau", "rho"):
        c = P.correlate(np.exp(truth) + 3, truth, which, n_boot=200)
        assert c.value == pytest.approx(1.0) and c.lo == pytest.approx(1.0) and c.hi == pytest.approx(1.0)
        assert P.correlate(-truth, truth, which, n_boot=200).value == pytest.approx(-1.0)


def test_the_correlations_are_scipys_with_ties():
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, 60).astype(float), rng.normal(size=60)
    assert P.correlate(x, y, "tau", n_boot=10).value == pytest.approx(kendalltau(x, y)[0])
    assert P.correlate(x, y, "rho", n_boot=10).value == pytest.approx(spearmanr(x, y)[0])


def test_a_random_score_gets_an_interval_around_zero_and_the_same_one_for_a_seed():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=100)
    for seed in range(5):
        score = np.random.default_rng(100 + seed).normal(size=100)
        for which in ("tau", "rho"):
            c = P.correlate(score, truth, which, n_boot=300, seed=seed)
            assert c.lo < 0 < c.hi, (seed, which, c)
            assert c == P.correlate(score, truth, which, n_boot=300, seed=seed)


@pytest.mark.parametrize("name", sorted(P.PREDICTORS))
def test_every_predictor_is_deterministic_for_a_seed(name):
    g = random_genotype(3)
    shape = P.NetShape(C=4, layers=3, in_shape=(3, 8, 8))
    fn = P.PREDICTORS[name].fn
    first = fn(P.Arch(g, shape), 5)
    assert np.isfinite(first)
    assert fn(P.Arch(g, shape), 5) == first


def test_the_count_baselines_count():
    g = P._genotype_of({"normal": [["sep_conv_3x3", 0], ["dil_conv_5x5", 1], ["skip_connect", 0], ["max_pool_3x3", 2]],
                        "normal_concat": [2, 3],
                        "reduce": [["sep_conv_5x5", 0], ["sep_conv_3x3", 1], ["avg_pool_3x3", 0], ["dil_conv_3x3", 2]],
                        "reduce_concate": [2, 3]})
    arch = P.Arch(g)
    assert P.PREDICTORS["sep_dil_count"].fn(arch, 0) == 2 * 3 + 2
    assert P.PREDICTORS["param_op_count"].fn(arch, 0) == 5


def test_the_surrogate_never_scores_a_row_it_was_fitted_on():
    rows = _rows(40)
    fit, scored = rows[:30], rows[30:]
    s = P.Surrogate(fit, seed=0)
    assert len(s.score(scored)) == 10
    assert np.array_equal(s.score(scored), P.Surrogate(fit, seed=0).score(scored))
    with pytest.raises(ValueError, match="fitted on 1 of the rows"):
        s.score(scored + [fit[0]])
    # a scored row whose genotype is also in the fit set is left out of the fit, not refused
    copy = P.Row(fit[3].arch, 0.0, 0.0, "copy")
    s2 = P.fit_surrogate(fit, [copy] + scored)
    assert s2.n == 29 and len(s2.score([copy] + scored)) == 11
    # leave one file out: every table is scored by a surrogate that never saw it
    tables = [rows[:14], rows[14:27], rows[27:]]
    out = P.leave_one_file_out(tables)
    assert [len(o) for o in out] == [14, 13, 13]


def test_read_table_takes_the_tiny_robustbench_spelling(tmp_path):
    g = random_genotype(0).to_dict()
    g["reduce_concate"] = g.pop("reduce_concat")
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"net": {"genotype": g, "depth": 5, "width": 8}, "max_test_top1_adv": 40.0,
                                 "max_test_top1_original": 70.0}]))
    (row,) = P.read_table(path)
    assert row.arch.shape.C == 8 and row.arch.shape.layers == 5 and row.robust == 40.0 and row.clean == 70.0
    path.write_text(json.dumps([{"net": {}}]))
    with pytest.raises(UserError, match=r"t.json\[0\]"):
        P.read_table(path)


@needs_trb
def test_the_count_baseline_on_tiny_robustbench_is_0434():
    rows = [r for f in TRB_FILES for r in P.read_table(f)]
    assert len(rows) == 164
    (count, _), = P.score(rows, ["sep_dil_count"]).values()
    c = P.correlate(count, [r.robust for r in rows], "tau", n_boot=200)
    assert c.value == pytest.approx(0.434, abs=0.001) and c.lo < c.value < c.hi and c.n == 164


@needs_trb
def test_the_command_scores_one_file_with_the_surrogate_fitted_on_the_other_two():
    args = ["predictors", "--table", str(TRB_FILES[0]), "--fit-on", str(TRB_FILES[1]), "--fit-on", str(TRB_FILES[2]),
            "--boot", "100"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    names = list(P.GENOTYPE_PREDICTORS) + ["surrogate"]
    tail = lines[-len(names):]
    assert [line.split()[:2] for line in tail] == [["tau", n] for n in names]
    for line in tail:
        assert len(line.split()) == 3 and -1 <= float(line.split()[2]) <= 1 and len(line.split()[2].split(".")[1]) == 3
    assert "fitted on 107 rows" in result.output
    same = CliRunner().invoke(app, ["predictors", "--table", str(TRB_FILES[0]), "--fit-on", str(TRB_FILES[0])])
    assert same.exit_code == 2 and "both scored" in same.output
