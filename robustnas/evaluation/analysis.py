"""Summary figures over evaluated models: the harmonic robustness score, Pareto fronts, and whether a
search decided anything (its alphas away from uniform, its supernet away from chance)."""

from __future__ import annotations

import math
from typing import Optional, Sequence


def hrs(clean: float, robust: float) -> float:
    """Harmonic robustness score 2CR / (C + R) (Devaguptapu et al.): high only when both are high."""
    return 0.0 if clean + robust <= 0 else 2 * clean * robust / (clean + robust)


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """a is at least as good as b in every objective and better in one."""
    better = False
    for u, v, up in zip(a, b, maximize):
        if not up:
            u, v = -u, -v
        if u < v:
            return False
        better |= u > v
    return better


def pareto_front(points: Sequence[Sequence[float]], maximize: Optional[Sequence[bool]] = None) -> list[int]:
    """Indices of the points no other point dominates, in input order (duplicates all stay).

    `maximize` says per objective whether larger is better (default: all), e.g. (True, True, False) for
    (clean accuracy, robust accuracy, parameters).
    """
    pts = [tuple(float(v) for v in p) for p in points]
    if not pts:
        return []
    up = tuple(maximize) if maximize is not None else (True,) * len(pts[0])
    if any(len(p) != len(up) for p in pts):
        raise ValueError("every point needs one value per objective")
    return [i for i, p in enumerate(pts) if not any(dominates(q, p, up) for q in pts)]


def op_by_position(genotype) -> dict[str, dict[str, int]]:
    """How often each operation appears in each cell kind of a DARTS-space genotype.

    For ARNAS genotypes the kinds are accurate / robust / reduce: the published finding is that accurate
    cells (near the input) favour separable convs and skips, robust cells (near the output) dilated convs.
    """
    from collections import Counter

    from robustnas.nets.spaces.darts import CELL_KINDS

    table: dict[str, dict[str, int]] = {}
    for kind in CELL_KINDS[genotype.space]:
        ops, _ = genotype.cell(kind)
        table[kind] = dict(Counter(op for op, _ in ops))
    return table


# ----------------------------------------------------------------------------- did a search decide?
# softmax(alpha) with every entry within NEAR_UNIFORM of 1/K: an op's weight differs from the others' by
# at most 2% (absolute), so the argmax that derives the cell is set by noise (the issue-16 demo ended 0.0008
# away). A search whose largest deviation is below it decided nothing by its alphas.
NEAR_UNIFORM = 0.01
# a supernet whose validation accuracy interval (95%) reaches chance + CHANCE_MARGIN cannot be told apart from
# one a little above guessing; its losses and alpha gradients carry little about the ops.
CHANCE_MARGIN = 0.05


def alpha_spread(alphas: dict[str, list[list[float]]]) -> dict:
    """How far softmax(alpha) moved from uniform, over every edge of every alpha set: the largest and mean
    |p - 1/K|, the mean top-1 minus top-2 weight per edge, the mean entropy over log K (1 = uniform)."""
    devs, margins, ratios = [], [], []
    for rows in alphas.values():
        for row in rows:
            k = len(row)
            if k < 2:
                continue
            devs.extend(abs(p - 1.0 / k) for p in row)
            top = sorted(row, reverse=True)
            margins.append(top[0] - top[1])
            total = sum(row)
            ratios.append(-sum(p / total * math.log(p / total) for p in row if p > 0) / math.log(k))
    if not devs:
        return {}
    return {"max_dev": max(devs), "mean_dev": sum(devs) / len(devs), "mean_margin": sum(margins) / len(margins),
            "entropy_ratio": sum(ratios) / len(ratios), "edges": len(margins),
            "near_uniform": max(devs) < NEAR_UNIFORM}


def accuracy_vs_chance(acc: float, n: int, num_classes: int) -> dict:
    """An accuracy on n images beside chance (1/num_classes), with its 95% interval; near chance when the
    interval's lower end is below chance + CHANCE_MARGIN."""
    from robustnas.core.stats import binom_interval

    chance = 1.0 / num_classes
    low, high = binom_interval(round(acc * n), n)
    return {"acc": acc, "n": n, "low": low, "high": high, "chance": chance,
            "near_chance": low < chance + CHANCE_MARGIN}


def search_decision(alphas: Optional[dict] = None, acc: Optional[float] = None, n: int = 0,
                    num_classes: int = 0, what: str = "supernet") -> dict:
    """A method-independent summary of what a search decided: the alphas' spread (DARTS-space methods) and
    the accuracy of what it scored candidates with (`what`: its supernet, a proxy) against chance, with a
    warning line for each that says it decided nothing; {} when neither was measured."""
    out: dict = {"warnings": []}
    if alphas:
        spread = alpha_spread(alphas)
        if spread:
            out["alphas"] = spread
            if spread["near_uniform"]:
                out["warnings"].append(f"alphas near uniform: softmax(alpha) at most {spread['max_dev']:.4f} from "
                                       f"1/K (< {NEAR_UNIFORM}); the derived cell is effectively random")
    if acc is not None and n > 0 and num_classes > 1 and not math.isnan(acc):
        c = accuracy_vs_chance(acc, n, num_classes)
        out["accuracy"] = {"of": what, **c}
        if c["near_chance"]:
            out["warnings"].append(f"{what} near chance: validation accuracy {acc:.3f} (95% CI {c['low']:.3f}-"
                                   f"{c['high']:.3f}, n = {n}) vs chance {c['chance']:.3f} + {CHANCE_MARGIN}")
    if "alphas" not in out and "accuracy" not in out:
        return {}  # nothing measured: no verdict either way
    out["decided"] = not out["warnings"]
    return out


def training_convergence(history: Sequence[dict], val_n: int, level: float = 0.95) -> dict:
    """Had a training run stopped improving? Its robust validation accuracy (the same `val_n` images and attack
    noise every epoch) at the last epoch against epoch ceil(E/2), with Newcombe's interval of the gain
    (stats.newcombe_difference, which ignores that the images are the same: wide rather than narrow).
    "still improving" when the interval lies above 0; otherwise "no gain shown over the second half" (the
    interval says how large a gain is still possible). Fewer than 2 epochs: "unknown"."""
    from robustnas.core.stats import newcombe_difference

    rows = [h for h in history if h.get("val_robust") is not None]
    if len(rows) < 2 or val_n <= 0:
        return {"status": "unknown", "epochs": len(rows), "why": "fewer than 2 validated epochs"}
    mid, last = rows[math.ceil(len(rows) / 2) - 1], rows[-1]
    k_mid, k_last = round(mid["val_robust"] * val_n), round(last["val_robust"] * val_n)
    gain, lo, hi = newcombe_difference(k_mid, val_n, k_last, val_n, level)
    return {"status": "still improving" if lo > 0 else "no gain shown over the second half",
            "epochs": len(rows), "mid_epoch": mid.get("epoch"), "last_epoch": last.get("epoch"),
            "mid": mid["val_robust"], "last": last["val_robust"], "gain": gain, "low": lo, "high": hi,
            "val_n": val_n, "level": level}


def convergence_line(label: str, c: dict) -> str:
    """One line of a report on a training's convergence (`training_convergence`)."""
    if c["status"] == "unknown":
        return f"- {label}: convergence unknown ({c['why']})"
    mark = "**still improving**" if c["status"] == "still improving" else c["status"]
    return (f"- {label}: robust validation accuracy {c['mid']:.3f} at epoch {c['mid_epoch']} -> {c['last']:.3f} at "
            f"epoch {c['last_epoch']} (n = {c['val_n']}; gain {c['gain']:+.3f}, {c['level']:.0%} interval "
            f"[{c['low']:+.3f}, {c['high']:+.3f}]): {mark}")
