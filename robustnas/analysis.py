"""Summary figures over evaluated models: the harmonic robustness score and Pareto fronts."""

from __future__ import annotations

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

    from robustnas.spaces.darts import CELL_KINDS

    table: dict[str, dict[str, int]] = {}
    for kind in CELL_KINDS[genotype.space]:
        ops, _ = genotype.cell(kind)
        table[kind] = dict(Counter(op for op, _ in ops))
    return table
