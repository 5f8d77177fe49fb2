"""robustnas.core.stats: intervals cover at their level on simulated data; McNemar is scipy's exact binomial test."""

import numpy as np
import pytest
from scipy.stats import binomtest

from robustnas.core import stats


@pytest.mark.parametrize("method", ["wilson", "exact"])
def test_binomial_interval_covers_the_true_rate_at_about_its_level(method):
    rng = np.random.default_rng(0)
    hits = total = 0
    for p in (0.1, 0.35, 0.5, 0.8, 0.93):
        for k in rng.binomial(120, p, size=250):
            lo, hi = stats.binom_interval(int(k), 120, method)
            hits += lo <= p <= hi
            total += 1
    cover = hits / total
    assert 0.93 <= cover <= (0.975 if method == "wilson" else 0.99), cover


def test_paired_difference_interval_covers_the_true_difference():
    rng = np.random.default_rng(1)
    # a correlated pair of networks: a is right on 70%, b on 64%, and they disagree on 16% of the images
    cells = np.array([0.59, 0.11, 0.05, 0.25])  # both right, a only, b only, both wrong
    true = cells[1] - cells[2]
    hits = 0
    for _ in range(1500):
        kind = rng.choice(4, size=200, p=cells)
        a, b = np.isin(kind, (0, 1)), np.isin(kind, (0, 2))
        r = stats.paired_difference(a, b)
        hits += r["low"] <= true <= r["high"]
    assert 0.93 <= hits / 1500 <= 0.975


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_images():
    # 2x2 table: 40 both right, 13 a only, 4 b only, 23 both wrong
    a = np.array([1] * 40 + [1] * 13 + [0] * 4 + [0] * 23, bool)
    b = np.array([1] * 40 + [0] * 13 + [1] * 4 + [0] * 23, bool)
    r = stats.paired_difference(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (13, 4, 80)
    assert r["p"] == pytest.approx(binomtest(13, 17, 0.5).pvalue)
    assert r["diff"] == pytest.approx(9 / 80)
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_holm_adjusts_step_down():
    adj = stats.holm([0.01, 0.04, 0.03, 0.2])
    # sorted 0.01, 0.03, 0.04, 0.2 -> x4, x3, x2, x1, running max
    assert adj == pytest.approx([0.04, 0.09, 0.09, 0.2])


def test_seed_bootstrap_is_wider_than_one_seed_when_seeds_disagree():
    rng = np.random.default_rng(2)
    n = 300
    # three seeds of one member whose accuracy moves between 0.55 and 0.75 from seed to seed
    per_seed = np.stack([rng.random(n) < p for p in (0.55, 0.65, 0.75)])
    s = stats.seed_summary(per_seed)
    one = stats.seed_summary(per_seed[1:2])
    assert s["seeds"] == 3 and s["sd"] > 0.05
    assert s["low"] <= s["mean"] <= s["high"]
    assert s["high"] - s["low"] > one["high"] - one["low"]


def test_bootstrap_difference_interval_covers_with_seed_and_image_noise():
    rng = np.random.default_rng(3)
    hits, reps = 0, 150
    for _ in range(reps):
        base = rng.random(150)  # image difficulty, shared by both members (paired images)
        a = np.stack([base < rng.normal(0.7, 0.03) for _ in range(4)])
        b = np.stack([base < rng.normal(0.6, 0.03) for _ in range(4)])
        r = stats.bootstrap_difference(a, b, n_boot=400, seed=int(rng.integers(1 << 30)))
        hits += r["low"] <= 0.1 <= r["high"]
    assert hits / reps >= 0.88  # percentile bootstrap of 4 seeds is a little short of nominal


def test_detectable_difference_has_the_asked_power():
    rng = np.random.default_rng(4)
    n, disc = 400, 0.2
    d = stats.detectable_difference(n, discordance=disc)
    cells = [1 - disc - 0.3, disc / 2 + d / 2, disc / 2 - d / 2, 0.3]
    rejected = 0
    for _ in range(400):
        kind = rng.choice(4, size=n, p=cells)
        rejected += stats.paired_difference(np.isin(kind, (0, 1)), np.isin(kind, (0, 2)))["p"] < 0.05
    assert 0.72 <= rejected / 400 <= 0.88
    assert stats.detectable_difference(4 * n, discordance=disc) == pytest.approx(d / 2)


def test_bootstrap_p_value_is_never_zero_and_its_floor_is_two_over_b_plus_one():
    rng = np.random.default_rng(5)
    base = rng.random(300)
    a = np.stack([base < 0.9 for _ in range(2)])   # a beats b on every resample
    b = np.stack([base < 0.2 for _ in range(2)])
    r = stats.bootstrap_difference(a, b, n_boot=999, seed=0)
    assert r["low"] > 0 and r["p"] == pytest.approx(2 / 1000)
    same = stats.bootstrap_difference(a, a, n_boot=999, seed=0)  # every draw ties at zero: p is 1
    assert same["p"] == 1.0
