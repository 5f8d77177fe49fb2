"""Statistics of accuracies measured on a finite set of test images: intervals, paired tests, seeds, multiple
and sequential testing, power.

An accuracy is k correct out of n images; its interval is a binomial one (scipy's Wilson, Clopper-Pearson
where k or n - k is at most EXACT_AT: Wilson undercovers at the boundary).

Two members are compared on the same images, and what the comparison can claim depends on their seeds:

- one seed each: McNemar's exact test on the discordant images, with `paired_interval` (the
  Clopper-Pearson interval of the discordant split times the range of the discordant share), which excludes
  zero exactly when the test rejects. The verdict is about the two trained networks, not about the methods.
- at least MIN_SEEDS seeds each: a two-level model (seeds, and images within each seed) and a t test on its
  Satterthwaite degrees of freedom (`seed_level_difference`); a verdict about the methods.
- otherwise (two seeds): the seed variance cannot be estimated, so there is no test; each seed's paired
  image-level result is given for information.

Several pairs are tested with Holm's step-down method (`sequential_holm`, which also runs group-sequential
looks with Lan-DeMets O'Brien-Fleming alpha spending); each pair's interval is at the level its own decision
used, so it excludes zero exactly when the verdict says "differ".
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Hashable, Optional, Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.stats import beta, binom, binomtest, nct, norm
from scipy.stats import t as t_dist

LEVEL = 0.95
INTERVALS = ("wilson", "exact")  # scipy's names; "exact" is Clopper-Pearson
EXACT_AT = 3    # Wilson switches to Clopper-Pearson where k or n - k is at most this
MIN_SEEDS = 3   # seeds per member below which the seed variance is not estimated and no seed-level test is made


# ------------------------------------------------------------------------------------------ one accuracy
def binom_interval(k: int, n: int, method: str = "wilson", level: float = LEVEL) -> tuple[float, float]:
    """Interval for a proportion of k successes in n trials (scipy's binomtest.proportion_ci); "wilson" is
    Clopper-Pearson where k or n - k <= EXACT_AT (Wilson covers only 0.84 at n = 100, p = 0.0017)."""
    if method not in INTERVALS:
        raise ValueError(f"unknown interval {method!r}; use one of {', '.join(INTERVALS)}")
    if n <= 0:
        return (0.0, 1.0)
    if min(k, n - k) <= EXACT_AT:
        method = "exact"
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method=method)
    return (float(ci.low), float(ci.high))


def accuracy_interval(acc: float, n: int, method: str = "wilson", level: float = LEVEL) -> dict:
    """{"value", "n", "low", "high"} for an accuracy measured on n images."""
    k = round(acc * n)
    lo, hi = binom_interval(k, n, method, level)
    return {"value": acc, "n": n, "low": lo, "high": hi}


# ------------------------------------------------------------------------------------------ one seed each
def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value from the discordant counts b (A right, B wrong) and c (A wrong, B
    right): scipy's exact binomial test of b in b + c at 1/2, which for the symmetric null is twice the
    smaller tail. Takes arrays (then returns one)."""
    b, c = np.asarray(b), np.asarray(c)
    p = np.minimum(1.0, 2 * binom.cdf(np.minimum(b, c), b + c, 0.5))
    return float(p) if p.ndim == 0 else p


def paired_counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """The 2x2 table of two per-image correctness vectors: (both right, a only, b only, both wrong)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError("paired results need the same images")
    return (int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum()))


def paired_exact_interval(only_a: int, only_b: int, n: int, level: float = LEVEL) -> tuple[float, float, float]:
    """acc(a) - acc(b) on n shared images from the discordant counts, with a conditional exact interval.

    Only the d = only_a + only_b images on which the two disagree carry information; given d, only_a is
    binomial, and its Clopper-Pearson interval scaled by d / n bounds the difference. The interval excludes 0
    exactly when McNemar's exact test rejects at 1 - level (the sanity checks of evaluate.py use it as a
    test); as an interval of the difference it undercovers where few images are discordant
    (`paired_interval` does not)."""
    d = only_a + only_b
    diff = (only_a - only_b) / max(n, 1)
    if d == 0:
        return diff, 0.0, 0.0
    ci = binomtest(int(only_a), int(d)).proportion_ci(confidence_level=level, method="exact")
    return diff, d / n * (2 * ci.low - 1), d / n * (2 * ci.high - 1)


SHARE_SPLIT = 0.1  # share of 1 - level spent on the discordant share in paired_interval


def clopper_pearson(k, n, level: float = LEVEL):
    """Clopper-Pearson interval of k successes in n trials from the beta quantiles (what scipy's
    proportion_ci(method="exact") computes), vectorised over k and n; (0, 1) where n is 0."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    tail = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, beta.ppf(tail, k, n - k + 1), 0.0)
        hi = np.where(k < n, beta.isf(tail, k + 1, n - k), 1.0)
    return lo, hi


def paired_interval(only_a, only_b, n, level: float = LEVEL):
    """Interval of acc(a) - acc(b) = delta (2 pi - 1) on n shared images, delta the share of discordant
    images and pi the share of them that a gets right: the Clopper-Pearson interval of pi (only_a of the d
    discordant images) at `level`, the dual of McNemar's exact test, times the Clopper-Pearson range of delta
    (d of n) at 1 - SHARE_SPLIT (1 - level). It excludes 0 exactly when McNemar rejects at 1 - level, and
    covers the difference with probability at least 1 - (1 + SHARE_SPLIT)(1 - level) (Bonferroni); scaling
    pi's interval by the observed d / n instead (paired_exact_interval) covers only 0.70 at n = 100 with 2%
    and 0.5% of the images won by either member, where d is often 0 or 1."""
    only_a, only_b = np.asarray(only_a), np.asarray(only_b)
    d = only_a + only_b
    share_lo, share_hi = clopper_pearson(d, n, 1 - SHARE_SPLIT * (1 - level))
    split_lo, split_hi = clopper_pearson(only_a, d, level)  # (0, 1) where d is 0
    lo, hi = 2 * split_lo - 1, 2 * split_hi - 1
    lo, hi = np.minimum(share_lo * lo, share_hi * lo), np.maximum(share_lo * hi, share_hi * hi)
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> dict:
    """Accuracy of a minus accuracy of b on the same images: McNemar's exact p-value and `paired_interval`
    at `level` (they agree: the interval excludes 0 exactly when p < 1 - level)."""
    n11, n10, n01, n00 = paired_counts(a, b)
    n = n11 + n10 + n01 + n00
    diff = (n10 - n01) / n
    lo, hi = paired_interval(n10, n01, n, level)
    return {"diff": diff, "low": lo, "high": hi, "level": level, "n": n, "a_only": n10, "b_only": n01,
            "p": mcnemar_exact(n10, n01), "test": "mcnemar-exact"}


# ------------------------------------------------------------------------------------------ several seeds
def _member_terms(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a member's (..., seeds, images) 0/1 table: its mean accuracy, the variance of that mean over seeds
    (sample variance of the per-seed accuracies / seeds) and the seeds x images residual mean square / seeds
    (the per-image noise of one seed that the per-image means over seeds still hold)."""
    s, n = y.shape[-2:]
    acc = y.mean(-1)
    resid = y - acc[..., None] - y.mean(-2, keepdims=True) + acc.mean(-1)[..., None, None]
    ms_e = (resid ** 2).sum((-2, -1)) / ((s - 1) * (n - 1))
    return acc.mean(-1), acc.var(-1, ddof=1) / s, ms_e / s


def _t_result(diff, seed_terms: Sequence[tuple[np.ndarray, int]], image_term, n: int) -> dict:
    """t statistic of `diff` with variance sum(seed terms) + image term and Satterthwaite's degrees of
    freedom (each seed term on seeds - 1, the image term on n - 1)."""
    var = sum(v for v, _ in seed_terms) + image_term
    denom = sum(v ** 2 / (s - 1) for v, s in seed_terms) + image_term ** 2 / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0, var ** 2 / np.where(denom > 0, denom, 1.0), np.inf)
        se = np.sqrt(var)
        stat = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf))
    p = 2 * t_dist.sf(np.abs(stat), df)
    return {"diff": diff, "se": se, "df": df, "p": p}


def seed_level_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean accuracy of member a minus member b, each (..., seeds, images) 0/1 on the same images, with at
    least 2 seeds each, under a two-level model: a seed draws a network (its population accuracy varies with
    sd sigma), the test images are a sample of the population, and each network is right or wrong on each
    image. The variance of the difference is

        S_a^2 / s_a + S_b^2 / s_b + max(S_d^2 - E_a - E_b, 0) / n

    S_a^2 the sample variance of a's per-seed accuracies (seed variance plus each seed's image noise), S_d^2
    the variance over images of the per-image difference of the two members' seed means (the images are
    shared, so their sampling is common to every seed) and E the residual mean squares / seeds that S_d^2 and
    S^2 would otherwise count twice. t test on Satterthwaite's degrees of freedom (at most s_a + s_b - 2 when
    seeds dominate, about n when images do). Vectorised over leading axes; returns arrays there
    ("diff", "se", "df", "p")."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    (sa, n), sb = a.shape[-2:], b.shape[-2]
    ma, va, ea = _member_terms(a)
    mb, vb, eb = _member_terms(b)
    d = a.mean(-2) - b.mean(-2)
    image = np.maximum(d.var(-1, ddof=1) - ea - eb, 0.0) / n
    return _t_result(ma - mb, [(va, sa), (vb, sb)], image, n)


def seed_level_interval(y: np.ndarray, level: float = LEVEL) -> tuple[float, float, float, float]:
    """One member's mean accuracy over its seeds (seeds x images, >= 2 seeds) with the two-level model's t
    interval: (mean, low, high, df)."""
    y = np.asarray(y, float)
    s, n = y.shape
    m, v, e = _member_terms(y)
    image = max(float(y.mean(0).var(ddof=1) - e), 0.0) / n
    r = _t_result(m, [(v, s)], image, n)
    half = float(t_dist.ppf(0.5 + level / 2, r["df"]) * r["se"]) if r["se"] > 0 else 0.0
    return float(m), max(float(m) - half, 0.0), min(float(m) + half, 1.0), float(r["df"])


def seed_summary(per_seed: np.ndarray, level: float = LEVEL) -> dict:
    """A member trained with several seeds (rows of `per_seed`, seeds x images, True = correct): the mean
    accuracy, the spread across seeds (sample sd) and its interval: binomial for one seed, none for two (the
    seed variance is not estimated from two values), the two-level t interval from MIN_SEEDS on."""
    a = np.asarray(per_seed, bool)
    accs = a.mean(1)
    s, n = a.shape
    out = {"mean": float(accs.mean()), "sd": float(accs.std(ddof=1)) if s > 1 else None, "seeds": s, "n": n,
           "per_seed": accs.tolist()}
    if s == 1:
        lo, hi = binom_interval(int(a.sum()), n, level=level)
        return {**out, "low": lo, "high": hi, "interval": "binomial"}
    if s < MIN_SEEDS:
        return {**out, "low": None, "high": None, "interval": f"none: seed variance not estimated from {s} seeds"}
    _, lo, hi, df = seed_level_interval(a, level)
    return {**out, "low": lo, "high": hi, "df": df, "interval": "two-level t"}


def compare_members(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired comparison of two members (seeds x images each, same images). One seed each: McNemar (about
    the two networks); MIN_SEEDS or more each: the two-level t test (about the methods); otherwise no test
    ("p" None) and each seed's McNemar result (seed k of a against seed k of b), for information only.
    The interval is not here: `pair_interval` gives it at the level the verdict used."""
    a, b = np.atleast_2d(np.asarray(a, bool)), np.atleast_2d(np.asarray(b, bool))
    sa, sb, n = len(a), len(b), a.shape[1]
    diff = float(a.mean() - b.mean())
    if sa == 1 and sb == 1:
        _, only_a, only_b, _ = paired_counts(a[0], b[0])
        return {"test": "mcnemar-exact", "scope": "networks", "diff": diff, "n": n, "seeds": [1, 1],
                "a_only": only_a, "b_only": only_b, "p": mcnemar_exact(only_a, only_b)}
    if min(sa, sb) >= MIN_SEEDS:
        r = seed_level_difference(a, b)
        return {"test": "two-level t", "scope": "methods", "diff": diff, "n": n, "seeds": [sa, sb],
                "se": float(r["se"]), "df": float(r["df"]), "p": float(r["p"])}
    per_seed = [paired_difference(a[k], b[k]) for k in range(min(sa, sb))]
    return {"test": None, "scope": "per seed", "diff": diff, "n": n, "seeds": [sa, sb], "p": None,
            "why": f"seed variance cannot be estimated with {min(sa, sb)} seed(s) of one member "
                   f"(a seed-level test needs {MIN_SEEDS} each)", "per_seed": per_seed}


def pair_interval(r: dict, level: float) -> tuple[float, float]:
    """The interval of a `compare_members` result at `level`, the dual of its test: it excludes 0 exactly
    when the test's p < 1 - level."""
    if level >= 1:  # a look with no alpha left to spend: nothing is excluded
        return -1.0, 1.0
    if r["test"] == "mcnemar-exact":
        return paired_interval(r["a_only"], r["b_only"], r["n"], level)
    if r["test"] == "two-level t":
        half = float(t_dist.ppf(0.5 + level / 2, r["df"]) * r["se"]) if r["se"] > 0 else 0.0
        return max(r["diff"] - half, -1.0), min(r["diff"] + half, 1.0)
    raise ValueError(f"no interval for a pair without a test ({r.get('why')})")


# ------------------------------------------------------------------------------------------ many pairs, many looks
def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (scipy has no Holm); reject where adjusted p < alpha."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p)
    adj = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


def obf_spent(fraction, alpha: float):
    """Lan-DeMets O'Brien-Fleming-type spending, alpha / 2 on each side: the two-sided alpha spent by
    information fraction t, 2 (2 - 2 Phi(z_{1 - alpha/4} / sqrt(t))) (gsDesign's sfLDOF, rpact's asOF, per
    side); all of alpha at t = 1."""
    t = np.clip(np.asarray(fraction, float), 1e-12, 1.0)
    return 4 * norm.sf(norm.isf(alpha / 4) / np.sqrt(t))


def spending_levels(fractions: Sequence[float], alpha: float, grid: int = 801) -> np.ndarray:
    """Nominal two-sided levels of group-sequential looks at increasing information fractions (a fraction
    of 1 is the planned maximum), spending `alpha` with `obf_spent`: a look rejects when its p-value is below
    its level. Boundaries from the joint normal law of the statistics (Brownian motion in information time),
    integrated numerically look by look (Armitage, McPherson & Rowe); the first level is exact, and one look
    at fraction 1 gets alpha itself."""
    t = np.minimum(np.asarray(fractions, float), 1.0)
    spent = obf_spent(t, alpha)
    levels, x, w, prev_t, prev_spent = [], None, None, 0.0, 0.0
    for k, (tk, sk) in enumerate(zip(t, spent)):
        need, dt = sk - prev_spent, tk - prev_t
        if need <= 1e-14 or dt <= 0:
            c = math.inf
        elif x is None:
            c = float(norm.isf(need / 2))
        else:
            def crossed(c: float) -> float:
                b = c * math.sqrt(tk)
                return float(np.sum(w * (norm.cdf((-b - x) / math.sqrt(dt)) + norm.sf((b - x) / math.sqrt(dt)))))
            c = brentq(lambda c: crossed(c) - need, 0.0, 40.0, xtol=1e-10)
        levels.append(float(2 * norm.sf(c)))
        if dt <= 0:
            continue
        # the density of the (Brownian) score at tk on the paths that have not stopped, on a grid
        half = c * math.sqrt(tk) if math.isfinite(c) else (8 * math.sqrt(tk))
        y = np.linspace(-half, half, grid)
        if x is None:
            f = norm.pdf(y, scale=math.sqrt(tk))
        else:
            f = (w[None, :] * norm.pdf((y[:, None] - x[None, :]) / math.sqrt(dt))).sum(1) / math.sqrt(dt)
        h = y[1] - y[0]
        x, w = y, f * h
        w[0] /= 2
        w[-1] /= 2
        prev_t, prev_spent = tk, sk
    return np.array(levels)


@lru_cache(maxsize=4096)
def _last_level(fractions: tuple[float, ...], alpha: float) -> float:
    """The level of the last of these looks (pairs looked at together share their fractions)."""
    return float(spending_levels(fractions, alpha)[-1])


def sequential_holm(looks: dict[Hashable, Sequence[tuple[float, float]]], alpha: float,
                    rejected: Optional[dict[Hashable, float]] = None) -> tuple[dict, dict]:
    """Holm's method over pairs that are each tested at group-sequential looks (Maurer & Bretz 2013):
    `looks[pair]` is its (information fraction, p) so far, the last one the look being decided. Every pair
    not yet rejected gets alpha / (their number), spent over its looks by `spending_levels`; a pair whose
    last p is below its level is rejected, which raises the others' share, until none changes. `rejected`
    holds earlier rejections (pair -> the level that rejected it). Returns (rejected, the current level of
    every other pair). One look at fraction 1 per pair is Holm's step-down test."""
    rejected = dict(rejected or {})
    while True:
        still = [k for k in looks if k not in rejected]
        if not still:
            return rejected, {}
        share = alpha / len(still)
        levels = {k: _last_level(tuple(f for f, _ in looks[k]), share) for k in still}
        new = [k for k in still if looks[k][-1][1] < levels[k]]
        if not new:
            return rejected, levels
        rejected.update({k: levels[k] for k in new})


# ------------------------------------------------------------------------------------------ power
def detectable_difference(n: int, seeds: int = 1, discordance: float = 0.2, seed_sd: Optional[float] = None,
                          alpha: float = 0.05, power: float = 0.8, pairs: int = 1) -> Optional[float]:
    """Smallest true accuracy difference between two members that the report's test declares with `power`
    at Holm's first step over `pairs` pairs (level alpha / pairs), on n shared images and `seeds` seeds per
    member. discordance: the share of images on which a network of one member and one of the other disagree;
    seed_sd: the sd of a member's accuracy across seeds.

    One seed: the normal approximation to McNemar, variance discordance / n (a difference between two trained
    networks). MIN_SEEDS or more: the two-level t test, power from the noncentral t, the larger of two
    extremes: (i) every network of both members equally likely right on an image, so each seed's image noise
    (discordance / 2n) sits in the seed terms: variance 2 (seed_sd^2 + discordance / 2n) / seeds on
    2 (seeds - 1) degrees of freedom; (ii) networks whose errors are fixed by the images, so the image term
    is discordance / n on n - 1 degrees of freedom beside seed terms seed_sd^2 / seeds (Satterthwaite).
    seed_sd required. Two seeds: None (no seed-level test is made)."""
    level = alpha / max(pairs, 1)
    if seeds == 1:
        z = norm.isf(level / 2) + norm.ppf(power)
        return float(z * math.sqrt(discordance / n))
    if seeds < MIN_SEEDS:
        return None
    if seed_sd is None:
        raise ValueError(f"with {seeds} seeds the detectable difference needs the seed sd (assumed or measured)")

    def detectable(seed_term: float, image_term: float) -> float:
        se = math.sqrt(2 * seed_term + image_term)
        df = se ** 4 / (2 * seed_term ** 2 / (seeds - 1) + image_term ** 2 / (n - 1))
        crit = t_dist.isf(level / 2, df)

        def got(nc: float) -> float:  # power at noncentrality nc = difference / se
            return float(nct.sf(crit, df, nc) + np.nan_to_num(nct.cdf(-crit, df, nc)))  # scipy: nan far out

        return float(se * brentq(lambda nc: got(nc) - power, 0.0, crit + 20.0))

    return max(detectable((seed_sd ** 2 + discordance / (2 * n)) / seeds, 0.0),
               detectable(seed_sd ** 2 / seeds, discordance / n))


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL) -> tuple[float, float, float]:
    """p2 - p1 and Newcombe's hybrid score interval (method 10, 1998) for two independent proportions, from
    each one's `binom_interval`. For two measurements on the same images (positively correlated) it is wider
    than an interval that used the pairing, so a difference it excludes 0 for is there."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = binom_interval(k1, n1, level=level)
    l2, u2 = binom_interval(k2, n2, level=level)
    d = p2 - p1
    return d, d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
