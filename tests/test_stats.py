"""robustnas.core.stats: intervals cover at their level (exactly computed where possible, so that a Wald interval
in their place fails), McNemar is scipy's exact binomial test, every interval is the dual of its test, Holm and
the group-sequential boundaries are right, and the detectable difference has the power it claims."""

import numpy as np
import pytest
from scipy.stats import binom, binomtest, norm

from robustnas.core import stats


def exact_coverage(interval, n: int, p: float) -> float:
    """P(interval(k, n) holds p) for k ~ Binomial(n, p), summed over every k (no simulation noise)."""
    ks = np.arange(n + 1)
    iv = np.array([interval(int(k), n) for k in ks])
    return float((binom.pmf(ks, n, p) * ((iv[:, 0] <= p) & (p <= iv[:, 1]))).sum())


def wald(k: int, n: int) -> tuple[float, float]:
    half = 1.96 * np.sqrt(k / n * (1 - k / n) / n)
    return k / n - half, k / n + half


def plain_wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return ci.low, ci.high


@pytest.mark.parametrize("method", ["wilson", "exact"])
def test_binomial_interval_covers_the_true_rate_at_about_its_level(method):
    covers = [exact_coverage(lambda k, n: stats.binom_interval(k, n, method), 120, p) for p in (0.1, 0.35, 0.5, 0.8)]
    assert min(covers) >= 0.93 and np.mean(covers) <= (0.97 if method == "wilson" else 0.99), covers


BOUNDARY = (0.001, 0.0017, 0.003, 0.005, 0.0075, 0.01, 0.99, 0.995, 0.9983)


def test_binomial_interval_covers_near_the_boundary_where_wald_and_wilson_do_not():
    """n = 100, p <= 0.01 (certified accuracies are often 0.000): Clopper-Pearson where k or n - k <= 3."""
    covers = {p: exact_coverage(stats.binom_interval, 100, p) for p in BOUNDARY}
    assert min(covers.values()) >= 0.95, covers
    # the same criterion fails the intervals this replaces
    assert min(exact_coverage(wald, 100, p) for p in BOUNDARY) < 0.7
    assert min(exact_coverage(plain_wilson, 100, p) for p in BOUNDARY) < 0.9
    assert stats.binom_interval(0, 100) == pytest.approx(tuple(binomtest(0, 100).proportion_ci(method="exact")))


def paired_exact_coverage(interval, n: int, a_only: float, b_only: float) -> float:
    """Coverage of acc(a) - acc(b) = a_only - b_only by interval(n10, n01, n), summed over every (n10, n01)
    (multinomial: n10 ~ Bin(n, a_only), n01 | n10 ~ Bin(n - n10, b_only / (1 - a_only)))."""
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    prob = binom.pmf(i, n, a_only) * binom.pmf(j, n - i, b_only / (1 - a_only))
    keep = (i + j <= n) & (prob > 1e-13)
    i, j, prob = i[keep], j[keep], prob[keep]
    lo, hi = np.array([interval(x, y, n) for x, y in zip(i, j)]).T if interval is not stats.paired_interval \
        else stats.paired_interval(i, j, n)
    true = a_only - b_only
    return float((prob * ((lo <= true + 1e-12) & (true - 1e-12 <= hi))).sum())


def wald_paired(i: int, j: int, n: int) -> tuple[float, float]:
    d = (i - j) / n
    half = 1.96 * np.sqrt(max((i + j) / n - d ** 2, 0.0) / n)
    return d - half, d + half


@pytest.mark.parametrize("n,a_only,b_only", [(200, 0.11, 0.05), (100, 0.02, 0.005), (100, 0.01, 0.01)])
def test_paired_interval_covers_the_true_difference(n, a_only, b_only):
    cover = paired_exact_coverage(stats.paired_interval, n, a_only, b_only)
    assert cover >= 0.95, cover  # at least; paired_interval_is_clopper_pearson_times_the_share pins its width
    if a_only < 0.05 and a_only != b_only:  # few discordant images: a Wald paired interval fails the same criterion, as does the
        # conditional exact interval scaled by the observed discordant share
        assert paired_exact_coverage(wald_paired, n, a_only, b_only) < 0.9
        assert paired_exact_coverage(lambda i, j, n: stats.paired_exact_interval(i, j, n)[1:], n, a_only, b_only) < 0.9


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_images():
    # 2x2 table: 40 both right, 13 a only, 4 b only, 23 both wrong
    a = np.array([1] * 40 + [1] * 13 + [0] * 4 + [0] * 23, bool)
    b = np.array([1] * 40 + [0] * 13 + [1] * 4 + [0] * 23, bool)
    r = stats.paired_difference(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (13, 4, 80)
    assert r["p"] == pytest.approx(binomtest(13, 17, 0.5).pvalue)
    assert r["diff"] == pytest.approx(9 / 80)
    assert stats.mcnemar_exact(0, 0) == 1.0
    b_, c_ = np.meshgrid(np.arange(41), np.arange(41))
    got = stats.mcnemar_exact(b_, c_)  # vectorised
    want = np.array([[binomtest(int(x), int(x + y), 0.5).pvalue if x + y else 1.0 for x, y in zip(r1, r2)]
                     for r1, r2 in zip(b_, c_)])
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_paired_interval_is_clopper_pearson_of_the_split_times_the_range_of_the_share():
    split = binomtest(70, 100).proportion_ci(0.95, method="exact")      # a right on 70 of 100 discordant images
    share = binomtest(100, 500).proportion_ci(0.995, method="exact")    # 100 of 500 images discordant
    lo, hi = stats.paired_interval(70, 30, 500)
    assert lo == pytest.approx(share.low * (2 * split.low - 1)) and hi == pytest.approx(share.high * (2 * split.high - 1))
    assert stats.paired_interval(0, 0, 100) == pytest.approx((-share_high(0, 100), share_high(0, 100)))


def share_high(d, n):
    return binomtest(d, n).proportion_ci(0.995, method="exact").high


@pytest.mark.parametrize("level", [0.95, 0.99, 1 - 0.05 / 36])
def test_the_paired_intervals_exclude_zero_exactly_when_mcnemar_rejects(level):
    for b in range(0, 61, 4):
        for c in range(0, 61, 2):
            _, lo, hi = stats.paired_exact_interval(b, c, 200, level)
            lo2, hi2 = stats.paired_interval(b, c, 200, level)
            rejects = stats.mcnemar_exact(b, c) < 1 - level
            assert (lo > 0 or hi < 0) == rejects == (lo2 > 0 or hi2 < 0), (b, c)
            assert lo2 <= (b - c) / 200 <= hi2


def seeds_members(rng, reps, seeds, n, sd, shift=0.0):
    """Two members on the same n images (reps x seeds x n each): 40% of the images are uncertain for every
    network (right with probability 0.5 + seed effect / 0.4), 25% always right, 35% always wrong; member a's
    accuracy is `shift` higher; each seed's accuracy moves with sd `sd`."""
    kind = rng.choice(3, size=(reps, 1, n), p=[0.25, 0.35, 0.4])
    out = []
    for extra in (shift, 0.0):
        u = (rng.normal(0, sd, size=(reps, seeds, 1)) + extra) / 0.4
        p = np.where(kind == 0, 1.0, np.where(kind == 1, 0.0, np.clip(0.5 + u, 0, 1)))
        out.append(rng.random((reps, seeds, n)) < p)
    return out


def test_two_level_interval_covers_the_true_difference_at_its_level():
    """3 seeds each, seed sd 0.03, a true difference of 0.05: the t interval covers it at about 95% (a twice
    as wide one would cover about 100%, a t interval without the seed term far less)."""
    rng = np.random.default_rng(3)
    a, b = seeds_members(rng, 4000, 3, 300, 0.03, shift=0.05)
    r = stats.seed_level_difference(a, b)
    half = np.array([stats.pair_interval({"test": "two-level t", "diff": d, "se": s, "df": f}, 0.95)
                     for d, s, f in zip(r["diff"], r["se"], r["df"])])
    cover = np.mean((half[:, 0] <= 0.05) & (0.05 <= half[:, 1]))
    assert 0.935 <= cover <= 0.97, cover
    excludes = (half[:, 0] > 0) | (half[:, 1] < 0)
    assert np.array_equal(excludes, r["p"] < 0.05)  # the interval is the test's dual


def test_two_level_variance_is_the_paired_image_variance_when_seeds_agree():
    """Seeds that give identical networks: no seed term, and the variance is the per-image variance of the
    paired differences / n (a paired t on the images)."""
    rng = np.random.default_rng(4)
    x, y = rng.random(200) < 0.6, rng.random(200) < 0.5
    a, b = np.stack([x] * 3), np.stack([y] * 4)
    r = stats.seed_level_difference(a, b)
    d = x.astype(float) - y
    assert r["diff"] == pytest.approx(d.mean()) and r["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(200))
    assert r["df"] == pytest.approx(199)


def test_a_member_gets_no_interval_from_two_seeds_and_a_t_interval_from_three():
    rng = np.random.default_rng(2)
    per_seed = np.stack([rng.random(300) < p for p in (0.55, 0.65, 0.75)])
    three, two, one = stats.seed_summary(per_seed), stats.seed_summary(per_seed[:2]), stats.seed_summary(per_seed[:1])
    assert three["seeds"] == 3 and three["sd"] > 0.05 and three["interval"] == "two-level t"
    assert three["low"] <= three["mean"] <= three["high"] and three["high"] - three["low"] > one["high"] - one["low"]
    assert two["low"] is None and "2 seeds" in two["interval"]
    assert one["interval"] == "binomial" and (one["low"], one["high"]) == stats.binom_interval(int(per_seed[0].sum()), 300)


def test_compare_members_tests_seeds_only_from_three_each():
    rng = np.random.default_rng(5)
    x = rng.random((5, 100)) < 0.5
    assert stats.compare_members(x[:1], x[1:2])["test"] == "mcnemar-exact"
    assert stats.compare_members(x[:1], x[1:2])["scope"] == "networks"
    assert stats.compare_members(x[:3], x[3:5])["p"] is None  # 3 against 2 seeds
    two = stats.compare_members(x[:2], x[2:4])
    assert two["p"] is None and "cannot be estimated" in two["why"] and len(two["per_seed"]) == 2
    assert stats.compare_members(x[:1], x[1:4])["p"] is None
    assert stats.compare_members(x[:3], x[2:5])["test"] == "two-level t"


def test_holm_adjusts_step_down():
    adj = stats.holm([0.01, 0.04, 0.03, 0.2])
    # sorted 0.01, 0.03, 0.04, 0.2 -> x4, x3, x2, x1, running max
    assert adj == pytest.approx([0.04, 0.09, 0.09, 0.2])


def test_sequential_holm_with_one_look_is_holm_and_its_levels_are_dual():
    rng = np.random.default_rng(6)
    for _ in range(1000):
        m = int(rng.integers(1, 9))
        p = rng.random(m) ** rng.uniform(1, 6)  # many small p-values
        rejected, levels = stats.sequential_holm({k: [(1.0, p[k])] for k in range(m)}, 0.05)
        adj = stats.holm(p)
        for k in range(m):
            assert (k in rejected) == (adj[k] < 0.05)
            assert (p[k] < rejected.get(k, levels.get(k))) == (k in rejected)


def test_obrien_fleming_spending_boundaries_match_gsdesign():
    """Lan-DeMets O'Brien-Fleming spending, two-sided 0.05 symmetric, 5 and 4 equally spaced looks: the
    z boundaries gsDesign (sfLDOF) tabulates."""
    z5 = norm.isf(stats.spending_levels([0.2, 0.4, 0.6, 0.8, 1.0], 0.05) / 2)
    assert z5 == pytest.approx([4.877, 3.357, 2.680, 2.290, 2.031], abs=2e-3)
    z4 = norm.isf(stats.spending_levels([0.25, 0.5, 0.75, 1.0], 0.05) / 2)
    assert z4 == pytest.approx([4.333, 2.963, 2.359, 2.014], abs=2e-3)
    assert stats.spending_levels([1.0], 0.05) == pytest.approx([0.05])


def test_spending_boundaries_spend_alpha_on_brownian_looks():
    rng = np.random.default_rng(7)
    fractions = np.array([0.1, 0.25, 0.5, 0.6, 1.0])
    steps = rng.normal(size=(400_000, 5)) * np.sqrt(np.diff(fractions, prepend=0.0))
    z = np.cumsum(steps, 1) / np.sqrt(fractions)
    for alpha in (0.05, 0.05 / 36):
        crossed = (2 * norm.sf(np.abs(z)) < stats.spending_levels(fractions, alpha)).any(1).mean()
        assert crossed == pytest.approx(alpha, rel=0.08 if alpha == 0.05 else 0.4), (alpha, crossed)


def test_detectable_difference_has_the_asked_power_for_one_seed_and_under_holm():
    rng = np.random.default_rng(8)
    n, disc = 400, 0.2
    for pairs in (1, 36):
        d = stats.detectable_difference(n, discordance=disc, pairs=pairs)
        cells = [1 - disc - 0.3, disc / 2 + d / 2, disc / 2 - d / 2, 0.3]
        counts = rng.multinomial(n, cells, size=4000)
        power = np.mean(stats.mcnemar_exact(counts[:, 1], counts[:, 2]) < 0.05 / pairs)
        assert 0.72 <= power <= 0.86, (pairs, power)
    assert stats.detectable_difference(4 * n, discordance=disc) == pytest.approx(stats.detectable_difference(n) / 2)
    assert stats.detectable_difference(500, 1, 0.2, pairs=36) == pytest.approx(0.081, abs=1e-3)  # the figure


def test_detectable_difference_with_seeds_has_at_least_the_asked_power():
    """Networks equally likely right on an uncertain image (the extreme the plan's number is set by at
    these sizes): about the asked power (Welch's degrees of freedom make it a little optimistic with seed
    variance: 0.74 at one pair, sd 0.03), at one pair and under Holm's first step over 10."""
    rng = np.random.default_rng(9)
    for sd, pairs in ((0.03, 1), (0.03, 10), (0.01, 10), (0.0, 1)):
        d = stats.detectable_difference(300, 3, 0.2, sd, pairs=pairs)
        a, b = seeds_members(rng, 3000, 3, 300, sd, shift=d)
        power = np.mean(stats.seed_level_difference(a, b)["p"] < 0.05 / pairs)
        assert 0.7 <= power <= 0.95, (sd, pairs, d, power)
    assert stats.detectable_difference(500, 2, 0.2, 0.03) is None
    with pytest.raises(ValueError, match="seed sd"):
        stats.detectable_difference(500, 3, 0.2)
