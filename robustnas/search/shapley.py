"""Monte-Carlo Shapley values of players by removal orderings (LRNAS, METHODS.md section 2): for each random
ordering the nested subsets are valued (every player, then one fewer at a time, down to none) and each
player's drop at its removal is recorded; the players' value is the mean over orderings of their drops
z-scored across players. Also the per-group summaries of those values that the LRNAS report plots."""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

ValueFn = Callable[[Tensor], Tensor]  # active players (G, P) bool -> values (G, m) of those G subsets


def random_orderings(n_players: int, n: int, generator: torch.Generator) -> Tensor:
    """n random permutations of the players, one per row."""
    return torch.stack([torch.randperm(n_players, generator=generator) for _ in range(n)])


def nested_values(value_fn: ValueFn, order: Tensor, chunk: int = 16) -> Tensor:
    """Values (P+1, m) of the nested subsets of one ordering: row j has every player but order[:j]
    (row 0 the full set, row P the empty one). value_fn gets `chunk` subsets at a time."""
    P = len(order)
    pos = torch.empty(P, dtype=torch.long)
    pos[order] = torch.arange(P)
    out = []
    for start in range(0, P + 1, chunk):
        j = torch.arange(start, min(start + chunk, P + 1))
        out.append(value_fn(pos[None, :] >= j[:, None]))
    return torch.cat(out)


def removal_drops(values: Tensor, order: Tensor, marginal: Literal["previous", "full"] = "previous") -> Tensor:
    """Each player's drop (P, m), indexed by player, from the nested values of its ordering: against the
    subset before its removal ("previous": the Shapley marginal) or against the full set ("full")."""
    before = values[:-1] if marginal == "previous" else values[:1].expand(len(order), -1)
    drops = torch.empty_like(values[1:])
    drops[order] = before - values[1:]
    return drops


def zscore(t: Tensor, dim: int, unbiased: bool = False) -> Tensor:
    """(t - mean) / std along dim (population std unless unbiased); 0 where the std is 0 (nothing to rank)."""
    std = t.std(dim, unbiased=unbiased, keepdim=True)
    z = (t - t.mean(dim, keepdim=True)) / std
    return torch.where(std > 0, z, torch.zeros_like(z))


def contribution_values(drops: Tensor) -> Tensor:
    """LRNAS value of each player from drops (orderings, P, metrics): the mean over orderings of the sum
    over metrics of the drops z-scored across players."""
    return zscore(drops.double(), 1).sum(-1).mean(0)


def summarise_contributions(history: Sequence[dict], metric: Literal["value", "clean_drop", "fgsm_drop"] = "value"
                            ) -> dict[str, Any]:
    """Mean of a contribution metric per op type, per cell kind and per (kind, op), for every epoch of a
    search.jsonl history that has contributions: {"epochs", "by_op", "by_kind", "by_kind_op"}, each
    leaf a list over those epochs. What the report plots."""
    epochs: list[int] = []
    by_op: dict[str, list[float]] = {}
    by_kind: dict[str, list[float]] = {}
    by_kind_op: dict[str, dict[str, list[float]]] = {}
    for rec in history:
        c = rec.get("contributions")
        if not c:
            continue
        epochs.append(rec["epoch"])
        groups: dict[tuple[str, str], list[float]] = {}
        for name, v in zip(c["players"], c[metric]):
            kind, _, op = name.split("/")
            groups.setdefault((kind, op), []).append(v)
        kinds = list(dict.fromkeys(k for k, _ in groups))
        ops = list(dict.fromkeys(o for _, o in groups))
        for op in ops:
            vals = [v for (k, o), vs in groups.items() if o == op for v in vs]
            by_op.setdefault(op, []).append(sum(vals) / len(vals))
        for kind in kinds:
            vals = [v for (k, o), vs in groups.items() if k == kind for v in vs]
            by_kind.setdefault(kind, []).append(sum(vals) / len(vals))
            for op in ops:
                vs = groups[(kind, op)]
                by_kind_op.setdefault(kind, {}).setdefault(op, []).append(sum(vs) / len(vs))
    return {"metric": metric, "epochs": epochs, "by_op": by_op, "by_kind": by_kind, "by_kind_op": by_kind_op}
