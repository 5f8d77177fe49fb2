"""ARNAS (CVPR 2024; DSARA, arXiv 2212.14049): accurate and robust cells searched as two tasks.

The weights learn on PGD examples; each alpha step takes the natural and the adversarial validation
gradients, g_nat = grad_alpha CE(x) and g_adv = grad_alpha lambda*CE(x_adv), and steps along their
min-norm convex combination (MGDA for two tasks), which lowers both losses whenever neither gradient
opposes the other outright. See METHODS.md section 1 and docs/arnas.md.

Defaults follow the authors' code (fyqsama/ARNAS): the search-time PGD (weights and alpha batch alike)
runs on the supernet in train mode (batch statistics; running statistics updated), 7 steps of eps/4
(2/255 at 8/255), uniform random start, no clipping to [0, 1]; the second-order step unrolls with the
weight optimizer's momentum and weight decay. gamma is logged for every alpha step (`gamma_steps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from robustnas.search.base import SearchResult, register
from robustnas.search.supernet import SearchBatch, SupernetConfig, SupernetSearch


def min_norm_two(g1: Union[Tensor, Sequence[Tensor]], g2: Union[Tensor, Sequence[Tensor]]) -> float:
    """The gamma in [0, 1] minimising ||gamma*g1 + (1-gamma)*g2|| (closed form, Sener & Koltun 2018).

    g1, g2 are tensors or lists of tensors (one per alpha set), flattened and concatenated. The
    unclipped minimiser is ((g2 - g1) . g2) / ||g2 - g1||^2; when g1 == g2 every gamma is optimal and
    0.5 is returned.
    """
    a = torch.cat([t.reshape(-1) for t in g1]) if not isinstance(g1, Tensor) else g1.reshape(-1)
    b = torch.cat([t.reshape(-1) for t in g2]) if not isinstance(g2, Tensor) else g2.reshape(-1)
    a, b = a.double(), b.double()
    diff = b - a
    denom = diff.dot(diff).item()
    if denom == 0.0:
        return 0.5
    return min(max(diff.dot(b).item() / denom, 0.0), 1.0)


class ArnasConfig(SupernetConfig):
    """ARNAS settings; published CIFAR-10 values in the comments (SupernetConfig holds the shared ones)."""

    space: Literal["darts", "arnas"] = "arnas"               # three alpha sets: accurate / robust / reduce
    C: int = Field(default=8, ge=1)                          # 24
    layers: int = Field(default=5, ge=1)                     # 8 (5 is the smallest with every cell kind)
    weight_adv: Literal["none", "pgd", "fgsm-rs"] = "pgd"    # PGD-7 adversarial training of the weights
    attack_steps: int = Field(default=7, ge=1)               # 7
    lambda_adv: float = Field(default=0.1, gt=0)             # lambda in g_adv = grad lambda*CE(x_adv): 0.1
    alpha_attack_steps: Optional[int] = Field(default=None, ge=1)  # PGD steps for x_val_adv; None: attack_steps
    adv_only_epochs: int = Field(default=0, ge=0)            # optional first stage on the adversarial loss alone
    # the search-time attack as the authors' code runs it (SupernetConfig says what each option does)
    step_size_fraction: Optional[float] = Field(default=0.25, gt=0)  # 2/255 at eps 8/255
    attack_bn_mode: Literal["eval", "train"] = "train"
    attack_clip: bool = False
    unrolled_momentum: bool = True                           # second order: DARTS' unrolled step, as the code

    @model_validator(mode="after")
    def _check_stage(self) -> "ArnasConfig":
        if self.adv_only_epochs > self.epochs:
            raise ValueError(f"adv_only_epochs={self.adv_only_epochs} exceeds epochs={self.epochs}")
        return self


def gamma_summary(values: Sequence[float]) -> dict[str, Any]:
    """n alpha steps, the share of them with gamma clipped to 0 (the step follows g_adv alone) and to 1
    (g_nat alone), and the mean gamma."""
    n = len(values)
    if n == 0:
        return {"n": 0, "at_0": None, "at_1": None, "mean": None}
    return {"n": n, "at_0": sum(v == 0.0 for v in values) / n, "at_1": sum(v == 1.0 for v in values) / n,
            "mean": sum(values) / n}


@register
class Arnas(SupernetSearch):
    name = "arnas"
    Config = ArnasConfig
    step_series = ("gamma",)

    def series_info(self, series: dict[str, list[float]]) -> dict[str, Any]:
        info = super().series_info(series)
        if "gamma" in series:
            summary = gamma_summary(series["gamma"])
            info.update({"gamma_at_0": summary["at_0"], "gamma_at_1": summary["at_1"]})
        return info

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        return {"stage": "adv-only" if epoch < self.cfg.adv_only_epochs else "mgda"}

    def alpha_step(self, batch: SearchBatch) -> dict[str, Any]:
        cfg = self.cfg
        x, y = batch.x_a, batch.y_a
        steps = cfg.alpha_attack_steps or cfg.attack_steps
        x_adv = self.attack(x, y, steps)
        self.net.train()

        def nat(m: torch.nn.Module) -> Tensor:
            return F.cross_entropy(m(x), y)

        def adv(m: torch.nn.Module) -> Tensor:
            return cfg.lambda_adv * F.cross_entropy(m(x_adv), y)

        if batch.epoch < cfg.adv_only_epochs:
            (g_adv,), (l_adv,) = self.hypergradients(batch, adv)
            self.apply_alpha_gradient(g_adv)
            return {"alpha_loss_adv": l_adv / cfg.lambda_adv}  # no gamma: no multi-objective step
        (g_nat, g_adv), (l_nat, l_adv) = self.hypergradients(batch, nat, adv)
        gamma = min_norm_two(g_nat, g_adv)
        self.apply_alpha_gradient([gamma * gn + (1 - gamma) * ga for gn, ga in zip(g_nat, g_adv)])
        return {"alpha_loss_nat": l_nat, "alpha_loss_adv": l_adv / cfg.lambda_adv, "gamma": gamma}

    def report_sections(self, result: SearchResult, out: Path, meta: Any = None) -> list[str]:
        """gamma per alpha step: how often the multi-objective step is only the adversarial one."""
        from robustnas.core.plots import plot_gamma

        values = [v for h in result.history for v in h.get("gamma_steps", [])]
        if not values:
            return []
        s = gamma_summary(values)
        p = plot_gamma(result.history, out / "plots" / "gamma.png")
        lines = ["## MGDA weight gamma per alpha step (ARNAS)", "",
                 f"{s['n']} alpha steps: gamma = 0 on {s['at_0']:.1%} (the step follows the adversarial gradient "
                 f"alone), gamma = 1 on {s['at_1']:.1%} (the natural gradient alone), mean {s['mean']:.3f}. "
                 "Where gamma sits at 0, the multi-objective part of the search is inert.", "",
                 "| epoch | steps | gamma = 0 | gamma = 1 | mean |", "|---|---|---|---|---|"]
        for h in result.history:
            if h.get("gamma_steps"):
                e = gamma_summary(h["gamma_steps"])
                lines.append(f"| {h['epoch']} | {e['n']} | {e['at_0']:.1%} | {e['at_1']:.1%} | {e['mean']:.3f} |")
        return lines + ["", f"![gamma](plots/{p.name})", ""]
