"""LRNAS (Feng et al., IEEE TNNLS 36(3), 2025): alphas set from Monte-Carlo Shapley contributions of the
ops, and a greedy selection of the final cells under a parameter budget. See METHODS.md section 2.

The supernet (DARTS space, partial channels) trains its weights on clean data with the shared loop of
SupernetSearch; the alphas get no gradient. After the warm-up, each epoch ends with a contribution
round: the players are the (cell kind, edge, op) triples (2 x 14 x 8 = 224); for each of n random
orderings, on one validation batch, the players are switched off one after the other (cumulative op
masks) and the drop of clean and FGSM accuracy at each removal is recorded. A player's value is the
mean over orderings of z(clean drop) + z(FGSM drop), z-scored across players within each ordering;
momentum then moves the alphas towards the values. The round runs in `epoch_info`, which the loop calls
after the epoch's training and validation and before it logs the alphas and saves the checkpoint.

Choices (documented in docs/lrnas.md):
- marginal="previous" (default) measures each drop against the previous subset (the Shapley marginal);
  "full" against the full supernet, as the public code does.
- fgsm="full-network" (default, the public code's choice, about 2.5x cheaper) makes the FGSM examples once
  per ordering against the full supernet, so the robust game is accuracy on fixed perturbed inputs;
  "per-subset" attacks every subset itself (the robust accuracy of that subnetwork).
- alpha_update="kind-zscore" (default, the public code): the values are z-scored within each cell kind
  and a momentum of the increments moves the alphas; "joint-l2": METHODS.md's formula, one L2
  normalisation over both kinds and a normalised momentum (every round moves the alphas by eta).
- The 225 nested subsets of an ordering are evaluated `eval_chunk` at a time in one batched masked forward
  (search/masked.py); `impl="naive"` is the reference: one masked forward of the supernet per subset.

The derivation (`LrnasSuperNet.genotype`) is the greedy selection: each edge's best op by raw alpha
(`none` allowed), edges of both cell kinds in decreasing alpha, filling the two input slots of each node;
the FINAL network (final_C, final_layers) is built on the meta device and counted. budget_rule="official"
(default, the public code) counts the network before the addition: while it is within max_params any op
goes in, so the last op may take it past the budget; past it only none, pools and skip_connect go in.
"strict" counts it after the addition and adds an op only when the network stays within max_params.

Machinery: search/shapley.py (orderings, nested values, drops), search/masked.py (masked subsets in one
forward, their clean / FGSM accuracy), search/greedy.py (the selection and its parameter counting).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import Tensor

from robustnas.core.config import ParamCount
from robustnas.core.faults import tick
from robustnas.data.datasets import DatasetMeta
from robustnas.nets.ops import has_parameters
from robustnas.search.base import SearchContext, SearchResult, register
from robustnas.search.greedy import GreedySelector, Selection, select_under_budget
from robustnas.search.masked import SubsetAccuracy, auto_chunk, player_names
from robustnas.search.shapley import (contribution_values, nested_values, random_orderings, removal_drops,
                                      summarise_contributions, zscore)
from robustnas.search.supernet import SearchBatch, SupernetConfig, SupernetSearch
from robustnas.core.config import parse_count
from robustnas.nets.spaces.darts import PRIMITIVES, Genotype, SuperNet
from robustnas.training.loop import epoch_seed


# ================================================================================================ alpha update
def momentum_update(alpha: Tensor, v: Tensor, values: Tensor, mu: float, eta: float) -> tuple[Tensor, Tensor]:
    """alpha_update "joint-l2" (METHODS.md): v <- (1 - mu) v + mu V/||V||;  alpha <- alpha + eta v/||v||
    (flat tensors, both cell kinds in one norm; a zero norm moves nothing)."""
    n = values.norm()
    v = (1 - mu) * v + mu * (values / n if n > 0 else torch.zeros_like(values))
    nv = v.norm()
    return (alpha + eta * v / nv if nv > 0 else alpha.clone()), v


def kind_zscore_update(alpha: Tensor, d: Tensor, values: Tensor, mu: float, eta: float,
                       kinds: int = 2) -> tuple[Tensor, Tensor]:
    """alpha_update "kind-zscore" (the public code's update_alpha): V z-scored within each of `kinds` equal
    parts (the cell kinds; std with Bessel's correction, as torch.std), d <- eta ((1 - mu) d + mu z),
    alpha <- alpha + d. The momentum is kept on the increment d itself (the public code hands its last
    increment back as the previous value), so the previous round weighs eta (1 - mu) = 0.08."""
    z = zscore(values.view(kinds, -1), 1, unbiased=True).flatten()
    d = eta * ((1 - mu) * d + mu * z)
    return alpha + d, d


# ================================================================================================ selection
class LrnasSuperNet(SuperNet):
    """The DARTS supernet whose derivation is the LRNAS greedy selection on the raw alphas."""

    def __init__(self, *args: Any, selector: GreedySelector, **kw: Any):
        super().__init__(*args, **kw)
        self.selector = selector

    def selection(self) -> Selection:
        return self.selector.select({k: a.detach() for k, a in self.alphas().items()})

    def genotype(self) -> Genotype:
        return Genotype.from_dict(self.selection().genotype.to_dict())  # a copy: callers set its source


# ================================================================================================ strategy
class LrnasConfig(SupernetConfig):
    """LRNAS settings; published CIFAR-10 values in the comments. The alpha-optimizer settings of
    SupernetConfig (alpha_lr, order, xi, ...) are unused: the alphas get no gradient."""

    space: Literal["darts"] = "darts"
    C: int = Field(default=8, ge=1)                   # 16
    layers: int = Field(default=5, ge=1)              # 8
    partial_channels_k: int = Field(default=4, ge=1)  # 4
    epochs: int = Field(default=10, ge=1)             # 50-60
    warmup_epochs: int = Field(default=3, ge=0)       # 15
    batch_size: int = Field(default=64, ge=1)         # 128
    w_lr: float = Field(default=0.025, gt=0)          # public code 0.1 (batch 128); DARTS 0.025
    w_lr_min: float = Field(default=0.001, ge=0)      # public code 0
    weight_adv: Literal["none", "pgd", "fgsm-rs"] = "none"  # clean weight training
    # --- contribution round
    orderings: int = Field(default=10, ge=1)          # 10
    contrib_batch_size: int = Field(default=64, ge=1)  # 64 (a validation batch per ordering)
    marginal: Literal["previous", "full"] = "previous"  # public code: "full"
    fgsm: Literal["full-network", "per-subset"] = "full-network"  # public code: full-network
    impl: Literal["batched", "naive"] = "batched"
    eval_chunk: Optional[int] = Field(default=None, ge=1)  # subsets per batched forward; None: auto_chunk
    mu: float = Field(default=0.2, ge=0, le=1)        # 0.2
    eta: float = Field(default=0.1, gt=0)             # 0.1
    alpha_update: Literal["kind-zscore", "joint-l2"] = "kind-zscore"  # public code: kind-zscore
    # --- greedy selection: counts the FINAL network (train it with these C and layers)
    max_params: ParamCount = None                     # 2.0M at final_C 36, final_layers 20; None: no budget
    final_C: int = Field(default=10, ge=2)            # 36
    final_layers: int = Field(default=8, ge=1)        # 20
    final_reduction_layers: Optional[list[int]] = None  # None: the DARTS rule (layers//3, 2*layers//3)
    budget_rule: Literal["official", "strict"] = "official"  # public code: official (may pass max_params by one op)
    after_budget: Literal["free-only", "fit"] = "free-only"  # strict only
    # the report also shows the selection under these budgets (one search serves every budget)
    report_budgets: list[str] = ["50k", "100k", "200k"]

    @model_validator(mode="after")
    def _check_channels(self) -> "LrnasConfig":
        if self.final_C % 2:
            raise ValueError(f"final_C={self.final_C} must be even (FactorizedReduce splits the channels)")
        if self.budget_rule == "official" and self.after_budget != "free-only":
            raise ValueError(f"after_budget={self.after_budget} applies to budget_rule: strict only")
        return self


@dataclass
class ContributionRound:
    """One epoch's estimate: per-player value, mean clean / FGSM drops, the full supernet's accuracies."""

    values: Tensor
    clean_drop: Tensor
    fgsm_drop: Tensor
    full_clean: float
    full_fgsm: float
    seconds: float


@register
class Lrnas(SupernetSearch):
    name = "lrnas"
    Config = LrnasConfig

    def build_supernet(self, meta: DatasetMeta) -> LrnasSuperNet:
        cfg = self.cfg
        budget = parse_count(cfg.max_params) if cfg.max_params is not None else None
        selector = GreedySelector(meta, cfg.final_C, cfg.final_layers, budget, PRIMITIVES,
                                  after_budget=cfg.after_budget, kinds=LrnasSuperNet.alpha_names,
                                  reduction_layers=cfg.final_reduction_layers, budget_rule=cfg.budget_rule)
        selector.check()
        return LrnasSuperNet(cfg.C, meta.num_classes, cfg.layers, meta.shape, meta.mean, meta.std,
                             partial_channels_k=cfg.partial_channels_k, selector=selector)

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        P = sum(a.numel() for a in self.alphas)
        if self.cfg.alpha_update == "kind-zscore":  # the public code starts its increments at 1e-3 N(0, 1)
            g = torch.Generator().manual_seed(ctx.seed)
            self.momentum = 1e-3 * torch.randn(P, generator=g, dtype=torch.float64)
        else:
            self.momentum = torch.zeros(P, dtype=torch.float64)

    def alpha_step(self, batch: SearchBatch) -> dict[str, Any]:
        return {}  # no gradient step: the alphas move once per epoch, in epoch_info

    def state_tensors(self) -> dict[str, Tensor]:
        return {"momentum": self.momentum}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "momentum" in tensors:
            self.momentum = tensors["momentum"].clone()

    # ---------------------------------------------------------------------------------------- contributions
    def contribution_round(self, epoch: int) -> ContributionRound:
        """n orderings, each on its own validation batch from the alpha half (seeded by seed and epoch)."""
        cfg, net = self.cfg, self.net
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(epoch_seed(self.ctx.seed, epoch) + 1)
        P = sum(a.numel() for a in self.alphas)
        orders = random_orderings(P, cfg.orderings, g)
        x_all, y_all = self.ctx.data.train.x, self.ctx.data.train.y
        drops, full = [], []
        for order in orders:
            pick = self.a_idx[torch.randperm(len(self.a_idx), generator=g)[:cfg.contrib_batch_size]]
            x, y = x_all[pick].to(self.device), y_all[pick].to(self.device)
            fn = SubsetAccuracy(net, x, y, self.eps, self.norm, cfg.fgsm, cfg.impl)
            chunk = cfg.eval_chunk or auto_chunk(net, x, 2 * len(y), backward=cfg.fgsm == "per-subset")
            values = nested_values(fn, order, chunk)
            drops.append(removal_drops(values, order, cfg.marginal))
            full.append(values[0])
            tick("item")  # a kill may land inside a round, between orderings (tests/test_resume.py)
        D = torch.stack(drops)
        F_ = torch.stack(full).mean(0)
        return ContributionRound(contribution_values(D), D[..., 0].mean(0), D[..., 1].mean(0),
                                 float(F_[0]), float(F_[1]), time.perf_counter() - t0)

    def apply_values(self, values: Tensor) -> None:
        cfg = self.cfg
        flat = torch.cat([a.detach().reshape(-1).double().cpu() for a in self.alphas])
        if cfg.alpha_update == "kind-zscore":
            new, self.momentum = kind_zscore_update(flat, self.momentum, values.double(), cfg.mu, cfg.eta,
                                                    len(self.alphas))
        else:
            new, self.momentum = momentum_update(flat, self.momentum, values.double(), cfg.mu, cfg.eta)
        with torch.no_grad():
            start = 0
            for a in self.alphas:
                a.copy_(new[start:start + a.numel()].view_as(a).to(a.dtype))
                start += a.numel()

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        if epoch < self.cfg.warmup_epochs:
            return {"stage": "warm-up"}
        r = self.contribution_round(epoch)
        self.apply_values(r.values)
        sel = self.net.selection()
        return {"stage": "contributions", "contrib_seconds": r.seconds,
                "contrib_full_clean": r.full_clean, "contrib_full_fgsm": r.full_fgsm,
                "contributions": {"players": player_names(self.net), "value": r.values.tolist(),
                                  "clean_drop": r.clean_drop.tolist(), "fgsm_drop": r.fgsm_drop.tolist()},
                "alpha_raw": {k: a.detach().cpu().tolist() for k, a in self.net.alphas().items()},
                "final_params": sel.params}

    def search(self, ctx: SearchContext, resume: bool = False) -> SearchResult:
        result = super().search(ctx, resume)
        sel = self.net.selection()
        result.extra.update({"final_params": sel.params, "selection": sel.log, "final_C": self.cfg.final_C,
                             "final_layers": self.cfg.final_layers,
                             "alpha_raw": {k: a.detach().cpu().tolist() for k, a in self.net.alphas().items()}})
        return result

    # ---------------------------------------------------------------------------------------- run / report
    def final_size(self) -> dict[str, int]:
        """The greedy selection counted this final network: `run` must train exactly it."""
        size = {"C": self.cfg.final_C, "layers": self.cfg.final_layers}
        if self.cfg.final_reduction_layers is not None:
            size["reduction_layers"] = list(self.cfg.final_reduction_layers)
        return size

    def report_sections(self, result: SearchResult, out: Path, meta: DatasetMeta) -> list[str]:
        """Contributions per op type and per cell kind over epochs, and the selection at other budgets."""
        from robustnas.core.plots import plot_heatmaps, plot_series

        lines: list[str] = []
        summary = summarise_contributions(result.history)
        if summary["epochs"]:
            ep = summary["epochs"]
            p1 = plot_series(ep, summary["by_op"], out / "plots" / "contributions_by_op.png",
                             "mean contribution per op type", "epoch", "z-scored contribution")
            p2 = plot_series(ep, summary["by_kind"], out / "plots" / "contributions_by_kind.png",
                             "mean contribution per cell kind", "epoch", "z-scored contribution")
            kinds = list(summary["by_kind_op"])
            ops = list(summary["by_op"])
            p3 = plot_heatmaps([("last epoch's contribution", [[summary["by_kind_op"][k][o][-1] for o in ops]
                                                               for k in kinds], kinds, ops)],
                               out / "plots" / "contributions_last.png")
            lines += ["## Component contributions (LRNAS)", "",
                      f"![by op](plots/{p1.name})", "", f"![by kind](plots/{p2.name})", "",
                      f"![last epoch](plots/{p3.name})", ""]
        alphas = result.extra.get("alpha_raw")
        if alphas:
            C, layers = self.cfg.final_C, self.cfg.final_layers
            lines += [f"## Greedy selection at other budgets (final network C={C}, {layers} cells)", "",
                      "| budget | final params | ops with parameters | parameter-free ops | none |",
                      "|---|---|---|---|---|"]
            budgets = list(dict.fromkeys([*self.cfg.report_budgets] + ([self.cfg.max_params] if self.cfg.max_params
                                                                      else [])))
            for b in budgets:
                sel = select_under_budget(alphas, meta, b, C, layers, self.cfg.after_budget,
                                          self.cfg.final_reduction_layers, self.cfg.budget_rule)
                edges = [(op, 2 if kind == "reduce" and j < 2 else 1)  # reduce cells' inputs at stride 2
                         for kind in self.net.alpha_names for op, j in getattr(sel.genotype, kind)]
                counts = {"param": sum(has_parameters(op, st) for op, st in edges),
                          "free": sum(op != "none" and not has_parameters(op, st) for op, st in edges),
                          "none": sum(op == "none" for op, _ in edges)}
                lines.append(f"| {b} | {sel.params:,} | {counts['param']} | {counts['free']} | {counts['none']} |")
            lines.append("")
        return lines

