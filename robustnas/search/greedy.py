"""LRNAS's greedy selection of the final cells under a parameter budget, counted on the FINAL network
(final C and layers) built on the meta device; the rules are described on GreedySelector and in
docs/lrnas.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor

from robustnas.data.datasets import DatasetMeta
from robustnas.core.errors import UserError
from robustnas.nets.genotypes import build_network
from robustnas.nets.size import count_params
from robustnas.core.config import format_count, parse_count
from robustnas.nets.spaces.darts import PRIMITIVES, Genotype


@dataclass
class Selection:
    """The greedy selection's genotype, its final network's parameter count, and one log entry per edge
    in the order it was considered: kind, edge, node, input, op, alpha, decision, params after it."""

    genotype: Genotype
    params: int
    log: list[dict] = field(default_factory=list)


# the ops the public code still adds once the network is past the budget (its PRIMITIVES[:4]); a
# skip_connect on a stride-2 edge is among them although it is a FactorizedReduce with weights
PUBLIC_FREE_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect")


class GreedySelector:
    """LRNAS's budgeted derivation; counts the FINAL network (final C and layers) built on the meta device.

    budget_rule "official" (the public code): an op goes in while the network BEFORE it is within the
    budget, so the op that crosses the budget is kept; past the budget only PUBLIC_FREE_OPS go in.
    "strict": the network is counted AFTER the addition and never exceeds the budget; after_budget then
    says what follows the first refusal: "free-only" adds only ops that add no parameters (counted),
    "fit" every later op that still fits.
    """

    def __init__(self, meta: DatasetMeta, C: int, layers: int, max_params: Optional[int] = None,
                 primitives: Sequence[str] = PRIMITIVES, steps: int = 4, multiplier: int = 4,
                 after_budget: Literal["free-only", "fit"] = "free-only", kinds: Sequence[str] = ("normal", "reduce"),
                 reduction_layers: Optional[Sequence[int]] = None,
                 budget_rule: Literal["official", "strict"] = "official"):
        if budget_rule == "official" and after_budget != "free-only":
            raise ValueError(f"after_budget={after_budget!r} applies to budget_rule 'strict' only")
        self.budget_rule = budget_rule
        self.meta, self.C, self.layers = meta, C, layers
        self.net_kw = {} if reduction_layers is None else {"reduction_layers": list(reduction_layers)}
        self.budget = math.inf if max_params is None else int(max_params)
        self.primitives = tuple(primitives)
        self.steps, self.multiplier, self.after_budget, self.kinds = steps, multiplier, after_budget, tuple(kinds)
        self.edges = [(node, j) for node in range(steps) for j in range(node + 2)]
        self._counts: dict[str, int] = {}
        self._last: Optional[tuple[bytes, Selection]] = None

    def count(self, genotype: Genotype) -> int:
        key = genotype.to_json(indent=None)
        if key not in self._counts:
            m = self.meta
            with torch.device("meta"):
                net = build_network(genotype, C=self.C, layers=self.layers, num_classes=m.num_classes,
                                    in_shape=m.shape, mean=m.mean, std=m.std, **self.net_kw)
            self._counts[key] = count_params(net)
        return self._counts[key]

    def _genotype(self, cells: dict[str, list[list[tuple[str, int]]]]) -> Genotype:
        """Genotype from per-node filled slots; unfilled slots get `none` on an input the node does not use."""
        out: dict[str, Any] = {}
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        for kind in self.kinds:
            pairs: list[tuple[str, int]] = []
            for node, filled in enumerate(cells[kind]):
                free = [j for j in range(node + 2) if j not in {i for _, i in filled}]
                pairs.extend(filled + [("none", free[k]) for k in range(2 - len(filled))])
            out[kind], out[f"{kind}_concat"] = pairs, concat
        return Genotype(**out)

    def empty_params(self) -> int:
        return self.count(self._genotype({k: [[] for _ in range(self.steps)] for k in self.kinds}))

    def check(self) -> None:
        """Refuse, before searching, a budget below the final network with every op `none`."""
        base = self.empty_params()
        if base > self.budget:
            raise UserError(f"max_params={format_count(int(self.budget))} is below the {format_count(base)} "
                            f"parameters of the final network with no op at all (C={self.C}, layers={self.layers}); "
                            f"raise max_params or lower final_C / final_layers")

    def select(self, alphas: dict[str, Tensor]) -> Selection:
        """Greedy selection on raw alphas {kind: (edges, ops)}; ties go to the lower kind/edge/op index."""
        key = b"".join(alphas[k].detach().cpu().double().numpy().tobytes() for k in self.kinds)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        cand = []
        for ki, kind in enumerate(self.kinds):
            a = alphas[kind].detach().cpu().double()
            for e in range(len(self.edges)):
                o = int(torch.argmax(a[e]))  # the first maximum
                cand.append((-float(a[e, o]), ki, e, o))
        cand.sort()
        cells = {k: [[] for _ in range(self.steps)] for k in self.kinds}
        params = self.empty_params()
        full = False
        log = []
        for neg, ki, e, o in cand:
            kind, (node, j), op = self.kinds[ki], self.edges[e], self.primitives[o]
            entry = {"kind": kind, "edge": e, "node": node, "input": j, "op": op, "alpha": -neg}
            if len(cells[kind][node]) == 2:
                entry["decision"] = "node full"
            elif self.budget_rule == "official":  # counted before the addition
                if params <= self.budget or op in PUBLIC_FREE_OPS:
                    cells[kind][node].append((op, j))
                    params = self.count(self._genotype(cells))
                    entry["decision"] = "added"
                else:
                    entry["decision"] = "over budget"
            else:
                cells[kind][node].append((op, j))
                n = self.count(self._genotype(cells))
                adds = n > params
                if n > self.budget or (adds and full and self.after_budget == "free-only"):
                    cells[kind][node].pop()
                    entry["decision"] = "over budget" if n > self.budget else "budget reached"
                    full = True
                else:
                    params = n
                    entry["decision"] = "added"
            entry["params"] = params
            log.append(entry)
        sel = Selection(self._genotype(cells), params, log)
        self._last = (key, sel)
        return sel


def select_under_budget(alphas: dict[str, Any], meta: DatasetMeta, max_params: Optional[str | int], C: int,
                        layers: int, after_budget: Literal["free-only", "fit"] = "free-only",
                        reduction_layers: Optional[Sequence[int]] = None,
                        budget_rule: Literal["official", "strict"] = "official") -> Selection:
    """The greedy selection for raw alphas {kind: edges x ops} (tensors or the nested lists of a search's
    `alpha_raw`) under another budget: the contributions do not depend on the budget, so one search
    serves every budget."""
    budget = parse_count(max_params) if max_params is not None else None
    selector = GreedySelector(meta, C, layers, budget, PRIMITIVES, after_budget=after_budget,
                              reduction_layers=reduction_layers, budget_rule=budget_rule)
    selector.check()
    return selector.select({k: torch.as_tensor(v, dtype=torch.float64) for k, v in alphas.items()})

