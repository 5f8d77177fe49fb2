"""The ARNAS space (CVPR 2024): DARTS cells of three kinds placed by position.

With L cells numbered 0..L-1 and reductions at L//3 and 2L//3: normal cells before the second
reduction are `accurate` cells, normal cells after it are `robust` cells, and both reductions are
`reduce` cells. The width goes C -> 2C at the first reduction and stays 2C at the second (C:2C:2C
instead of DARTS' C:2C:4C). The op set is the DARTS set without `none`.

Genotypes of this space have space="arnas" and fill `accurate`, `robust` and `reduce`; their
`normal` field mirrors `accurate` so DARTS-only readers still see a valid cell (ARNAS networks
never read it).
"""

from __future__ import annotations

from typing import Sequence

from robustnas.nets.spaces.darts import PRIMITIVES, Genotype, Network, SuperNet
from robustnas.nets.spaces.registry import Space, register

ARNAS_PRIMITIVES: list[str] = [p for p in PRIMITIVES if p != "none"]


def arnas_plan(layers: int, reductions: Sequence[int]) -> list[tuple[str, bool, int]]:
    """(kind, is_reduction, width factor) per cell: accurate before the last reduction, robust after
    it; width C before the first reduction and 2C from it on."""
    first, last = min(reductions), max(reductions)
    plan = []
    for i in range(layers):
        width = 1 if i < first else 2
        if i in reductions:
            plan.append(("reduce", True, width))
        elif i < last:
            plan.append(("accurate", False, width))
        else:
            plan.append(("robust", False, width))
    return plan


class ArnasSuperNet(SuperNet):
    """Search network with three alpha sets: `accurate`, `robust` and `reduce` (see SuperNet)."""

    space = "arnas"
    alpha_names = ("accurate", "robust", "reduce")

    def __init__(self, C: int, num_classes: int, layers: int, in_shape: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3,
                 primitives: Sequence[str] = ARNAS_PRIMITIVES, partial_channels_k: int = 1,
                 reduction_layers: Sequence[int] | None = None):
        super().__init__(C, num_classes, layers, in_shape, mean, std, steps=steps, multiplier=multiplier,
                         stem_multiplier=stem_multiplier, primitives=primitives,
                         partial_channels_k=partial_channels_k, reduction_layers=reduction_layers)

    @staticmethod
    def _plan(layers: int, reductions: Sequence[int]) -> list[tuple[str, bool, int]]:
        return arnas_plan(layers, reductions)


class ArnasNetwork(Network):
    """Final ARNAS network from a space="arnas" genotype (same arguments and outputs as Network)."""

    space = "arnas"

    @staticmethod
    def _plan(layers: int, reductions: Sequence[int]) -> list[tuple[str, bool, int]]:
        return arnas_plan(layers, reductions)


def _network(genotype, C: int, layers: int, num_classes: int, in_shape: Sequence[int], mean: Sequence[float],
             std: Sequence[float], **kw) -> ArnasNetwork:
    return ArnasNetwork(genotype, C, num_classes, layers, in_shape, mean, std, **kw)


register(Space("arnas", Genotype.from_dict, _network, tuple(ARNAS_PRIMITIVES), supernet=ArnasSuperNet))
