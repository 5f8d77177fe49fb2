"""Statistics of accuracies measured on a finite set of test images: intervals, paired tests, seeds, power.

An accuracy is k correct out of n images; its interval is a binomial one (scipy's Wilson or Clopper-Pearson).
Two networks evaluated on the same images are compared image by image: only the discordant images (right
for one, wrong for the other) carry information, so the test is McNemar's exact test (a binomial test on
the discordant counts) and the interval of the difference is Agresti & Min's (2005) adjusted Wald interval
for matched proportions. Several comparisons at once are corrected with Holm's step-down method. A member
trained with several seeds is summarised by a bootstrap over seeds and images (both are sources of
variance), and two such members are compared with the same bootstrap, images paired.

"A difference smaller than its interval is not a result": `paired_difference` says whether zero is inside.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.stats import binomtest, norm

LEVEL = 0.95
INTERVALS = ("wilson", "exact")  # scipy's names; "exact" is Clopper-Pearson


def binom_interval(k: int, n: int, method: str = "wilson", level: float = LEVEL) -> tuple[float, float]:
    """Interval for a proportion of k successes in n trials (scipy's binomtest.proportion_ci)."""
    if method not in INTERVALS:
        raise ValueError(f"unknown interval {method!r}; use one of {', '.join(INTERVALS)}")
    if n <= 0:
        return (0.0, 1.0)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method=method)
    return (float(ci.low), float(ci.high))


def accuracy_interval(acc: float, n: int, method: str = "wilson", level: float = LEVEL) -> dict:
    """{"value", "n", "low", "high"} for an accuracy measured on n images."""
    k = round(acc * n)
    lo, hi = binom_interval(k, n, method, level)
    return {"value": acc, "n": n, "low": lo, "high": hi}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (A right, B wrong) and c (A wrong, B right)."""
    if b + c == 0:
        return 1.0
    return float(binomtest(int(b), int(b + c), 0.5).pvalue)


def paired_counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """The 2x2 table of two per-image correctness vectors: (both right, a only, b only, both wrong)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError("paired results need the same images")
    return (int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum()))


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> dict:
    """Accuracy of a minus accuracy of b on the same images, with Agresti-Min's interval (0.5 added to each
    cell of the 2x2 table, then Wald) and McNemar's exact p-value."""
    n11, n10, n01, n00 = paired_counts(a, b)
    n = n11 + n10 + n01 + n00
    z = float(norm.ppf(0.5 + level / 2))
    m = n + 2.0
    p10, p01 = (n10 + 0.5) / m, (n01 + 0.5) / m
    d_adj = p10 - p01
    se = math.sqrt(max(p10 + p01 - d_adj ** 2, 0.0) / m)
    diff = (n10 - n01) / n if n else 0.0
    lo, hi = max(d_adj - z * se, -1.0), min(d_adj + z * se, 1.0)
    return {"diff": diff, "low": lo, "high": hi, "n": n, "a_only": n10, "b_only": n01,
            "p": mcnemar_exact(n10, n01), "test": "mcnemar-exact", "excludes_zero": bool(lo > 0 or hi < 0)}


def paired_exact_interval(only_a: int, only_b: int, n: int, level: float = LEVEL) -> tuple[float, float, float]:
    """acc(a) - acc(b) on n shared images from the discordant counts, with a conditional exact interval.

    Only the d = only_a + only_b images on which the two disagree carry information; given d, only_a is
    binomial, and its Clopper-Pearson interval scaled by d / n bounds the difference. The interval excludes 0
    exactly when McNemar's exact test rejects at 1 - level (the sanity checks compare attacks with it)."""
    d = only_a + only_b
    diff = (only_a - only_b) / max(n, 1)
    if d == 0:
        return diff, 0.0, 0.0
    ci = binomtest(int(only_a), int(d)).proportion_ci(confidence_level=level, method="exact")
    return diff, d / n * (2 * ci.low - 1), d / n * (2 * ci.high - 1)


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


def _bootstrap_means(per_seed: np.ndarray, seed_idx: np.ndarray, image_w: np.ndarray) -> np.ndarray:
    """Accuracy under each resample: seeds drawn by seed_idx (B x s), images weighted by image_w (B x n)."""
    per_image = per_seed[seed_idx].mean(1)  # B x n: each image's accuracy over the drawn seeds
    return (per_image * image_w).sum(1) / image_w.sum(1)


def bootstrap_draws(per_seed: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0,
                    chunk: int = 250) -> np.ndarray:
    """Resampled accuracies of one or more members on the same images: images resampled jointly (paired),
    each member's seeds resampled on their own. `per_seed[j]` is member j's seeds x images correctness;
    returns n_boot x members."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(a, np.float32) for a in per_seed]
    n = arrays[0].shape[1]
    out = np.empty((n_boot, len(arrays)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float32)
        for j, a in enumerate(arrays):
            idx = rng.integers(0, len(a), size=(b, len(a)))
            out[start:start + b, j] = _bootstrap_means(a, idx, w)
    return out


def seed_summary(per_seed: np.ndarray, level: float = LEVEL, n_boot: int = 2000, seed: int = 0) -> dict:
    """A member trained with several seeds (rows of `per_seed`, seeds x images, True = correct): the mean
    accuracy, the spread across seeds (sample sd) and a percentile interval from a bootstrap over seeds and
    images. One seed: the Wilson interval."""
    a = np.asarray(per_seed, bool)
    accs = a.mean(1)
    n = a.shape[1]
    if len(a) == 1:
        iv = accuracy_interval(float(accs[0]), n, level=level)
        return {"mean": float(accs[0]), "sd": None, "seeds": 1, "n": n, "low": iv["low"], "high": iv["high"],
                "per_seed": accs.tolist(), "interval": "wilson"}
    draws = bootstrap_draws([a], n_boot, seed)[:, 0]
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(accs.mean()), "sd": float(accs.std(ddof=1)), "seeds": len(a), "n": n,
            "low": float(lo), "high": float(hi), "per_seed": accs.tolist(), "interval": "bootstrap seeds x images"}


def bootstrap_difference(a: np.ndarray, b: np.ndarray, level: float = LEVEL, n_boot: int = 2000,
                         seed: int = 0) -> dict:
    """Mean accuracy of member a minus member b (seeds x images each, same images): percentile interval and
    a two-sided bootstrap p-value: twice the smaller tail at zero, counted as (k + 1) / (n_boot + 1) so that a
    finite bootstrap never claims p = 0 (its smallest p is 2 / (n_boot + 1))."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    draws = bootstrap_draws([a, b], n_boot, seed)
    d = draws[:, 0] - draws[:, 1]
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    p = min(1.0, 2 * (tail + 1) / (n_boot + 1))
    return {"diff": float(a.mean() - b.mean()), "low": float(lo), "high": float(hi), "n": a.shape[1],
            "p": float(p), "test": "bootstrap seeds x images", "excludes_zero": bool(lo > 0 or hi < 0)}


def compare_members(a: np.ndarray, b: np.ndarray, level: float = LEVEL, seed: int = 0) -> dict:
    """Paired comparison of two members (seeds x images each): McNemar + Agresti-Min with one seed each,
    the seeds-and-images bootstrap otherwise."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if len(a) == 1 and len(b) == 1:
        return paired_difference(a[0], b[0], level)
    return bootstrap_difference(a, b, level, seed=seed)


def detectable_difference(n: int, seeds: int = 1, discordance: float = 0.2, seed_sd: float = 0.0,
                          alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest accuracy difference a two-sided paired test at `alpha` detects with `power` on n shared
    images and `seeds` seeds per member (normal approximation): the per-pair variance is discordance / n
    (McNemar: the share of images on which two members disagree) plus 2 seed_sd^2 / seeds (the run-to-run
    spread of one member's accuracy)."""
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return float(z * math.sqrt(discordance / n + 2 * seed_sd ** 2 / max(seeds, 1)))
