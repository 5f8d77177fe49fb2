"""ARNAS (CVPR 2024; DSARA, arXiv 2212.14049): accurate and robust cells searched as two tasks.

The weights learn on PGD examples; each alpha step takes the natural and the adversarial validation
gradients, g_nat = grad_alpha CE(x) and g_adv = grad_alpha lambda*CE(x_adv), and steps along their
min-norm convex combination (MGDA for two tasks), which lowers both losses whenever neither gradient
opposes the other outright. See METHODS.md section 1.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from robustnas.attacks import pgd
from robustnas.search.base import register
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

    @model_validator(mode="after")
    def _check_stage(self) -> "ArnasConfig":
        if self.adv_only_epochs > self.epochs:
            raise ValueError(f"adv_only_epochs={self.adv_only_epochs} exceeds epochs={self.epochs}")
        return self


@register
class Arnas(SupernetSearch):
    name = "arnas"
    Config = ArnasConfig

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        return {"stage": "adv-only" if epoch < self.cfg.adv_only_epochs else "mgda"}

    def alpha_step(self, batch: SearchBatch) -> dict[str, Any]:
        cfg = self.cfg
        x, y = batch.x_a, batch.y_a
        steps = cfg.alpha_attack_steps or cfg.attack_steps
        x_adv = pgd(self.net, x, y, self.eps, steps=steps, step_size=self.step_size, norm=self.norm)
        self.net.train()

        def nat(m: torch.nn.Module) -> Tensor:
            return F.cross_entropy(m(x), y)

        def adv(m: torch.nn.Module) -> Tensor:
            return cfg.lambda_adv * F.cross_entropy(m(x_adv), y)

        if batch.epoch < cfg.adv_only_epochs:
            (g_adv,), (l_adv,) = self.hypergradients(batch, adv)
            self.apply_alpha_gradient(g_adv)
            return {"alpha_loss_adv": l_adv / cfg.lambda_adv, "gamma": 0.0}
        (g_nat, g_adv), (l_nat, l_adv) = self.hypergradients(batch, nat, adv)
        gamma = min_norm_two(g_nat, g_adv)
        self.apply_alpha_gradient([gamma * gn + (1 - gamma) * ga for gn, ga in zip(g_nat, g_adv)])
        return {"alpha_loss_nat": l_nat, "alpha_loss_adv": l_adv / cfg.lambda_adv, "gamma": gamma}
