"""AdvRush (Mok et al., ICCV 2021): DARTS whose alpha loss, after a warm-up, adds an input-loss-curvature
penalty, so that the search favours architectures with a smooth input loss landscape.

    L_alpha = L_val + gamma * mean_x ||grad_x l(x + h z) - grad_x l(x)||^2,   z = sign(g) / ||sign(g)||_2

with g = grad_x l(x) (detached), l the per-sample cross-entropy and gamma = 0.01: a finite-difference
estimate of the curvature along the gradient's sign direction (CURE, Moosavi-Dezfooli et al. 2019).
z has unit L2 norm per sample, so h is the L2 length of the step in pixel units (each pixel moves by
h / sqrt(d), d the input size). The penalty is differentiated through both gradients (create_graph), so
it reaches the alphas. See docs/advrush.md for where this follows the published code and where not.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from robustnas.attacks import eval_mode
from robustnas.errors import UserError
from robustnas.search.base import register
from robustnas.search.supernet import SearchBatch, SupernetConfig, SupernetSearch

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits, y) -> per-sample loss


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn, create_graph: bool) -> Tensor:
    """grad_x of the summed per-sample loss: each sample's own gradient when samples do not interact."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(model(x), y).sum(), x, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def curvature_direction(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn = _ce) -> Tensor:
    """z = sign(grad_x l(x)) / ||sign(grad_x l(x))||_2 per sample, detached (zero where the gradient is)."""
    s = torch.sign(_input_grad(model, x, y, loss, create_graph=False))
    norm = s.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return (s / norm).detach()


def curvature_penalty(model: nn.Module, x: Tensor, y: Tensor, h: float, loss: LossFn = _ce,
                      penalty: Literal["squared", "norm"] = "squared", create_graph: bool = True) -> Tensor:
    """mean_x ||grad_x l(x + h z) - grad_x l(x)||_2^2 (penalty="squared", the paper's) or the plain norm
    ("norm", the published code's), z from `curvature_direction`. Differentiable in the model's
    parameters when create_graph. Uses the model in the mode it is given (AdvRush: eval mode)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise UserError("advrush: x must be a non-empty floating-point tensor of shape (N, ...)")
    if not isinstance(h, (int, float)) or isinstance(h, bool) or not h >= 0:
        raise UserError(f"advrush: the step h must be a number >= 0, got {h!r}")
    if penalty not in ("squared", "norm"):
        raise UserError(f"advrush: unknown penalty {penalty!r}; use squared or norm")
    if h == 0:  # the two gradients coincide; the norm's derivative at 0 is undefined, the penalty is 0
        return x.new_zeros(())
    z = curvature_direction(model, x, y, loss)
    g_step = _input_grad(model, x + h * z, y, loss, create_graph)
    g_here = _input_grad(model, x, y, loss, create_graph)
    diff = (g_step - g_here).flatten(1)
    per_sample = diff.square().sum(1) if penalty == "squared" else diff.norm(dim=1)
    return per_sample.mean()


class AdvrushConfig(SupernetConfig):
    """AdvRush settings; published CIFAR-10 values (its train_search.py) in the comments. SupernetConfig
    holds the shared DARTS ones; `warmup_epochs` there freezes the alphas, `reg_warmup_epochs` here only
    delays the penalty (AdvRush updates the alphas on L_val alone before it)."""

    gamma: float = Field(default=0.01, ge=0)             # a_gamma 0.01
    # a_warmup_epochs 50 of 60; None: the same share, floor(5/6 * epochs), at most epochs - 1
    reg_warmup_epochs: Optional[int] = Field(default=None, ge=0)
    h_max: float = Field(default=1.5, ge=0)              # 1.5
    # "code": h = h_max * min(1, epoch / h_ramp_epochs) from the first epoch (the published h_all =
    # 0, 0.3, ..., 1.5, then 1.5); "after-warmup": the ramp starts with the penalty,
    # h = h_max * min(1, (epoch - reg_warmup_epochs + 1) / h_ramp_epochs)
    h_schedule: Literal["code", "after-warmup"] = "code"
    h_ramp_epochs: int = Field(default=5, ge=1)          # 5
    penalty: Literal["squared", "norm"] = "squared"      # paper: squared; code: norm (with penalty_scale 4)
    penalty_scale: float = Field(default=1.0, gt=0)      # code: lambda_ = 4
    reg_n: Optional[int] = Field(default=None, ge=1)     # alpha-batch images the penalty sees; None: all
    val_curvature_n: int = Field(default=32, ge=0)       # penalty at h_max on fixed validation images, per epoch

    @model_validator(mode="after")
    def _check_reg_warmup(self) -> "AdvrushConfig":
        if self.reg_warmup_epochs is not None and self.reg_warmup_epochs >= self.epochs:
            raise ValueError(f"reg_warmup_epochs={self.reg_warmup_epochs} leaves no epoch for the curvature "
                             f"penalty (epochs={self.epochs})")
        return self


@register
class Advrush(SupernetSearch):
    name = "advrush"
    Config = AdvrushConfig

    @property
    def reg_warmup(self) -> int:
        """Epochs before the penalty starts."""
        cfg = self.cfg
        if cfg.reg_warmup_epochs is not None:
            return cfg.reg_warmup_epochs
        return min(5 * cfg.epochs // 6, cfg.epochs - 1)

    def h_at(self, epoch: int) -> float:
        cfg = self.cfg
        if cfg.h_schedule == "code":
            return cfg.h_max * min(1.0, epoch / cfg.h_ramp_epochs)
        return cfg.h_max * min(1.0, max(0, epoch - self.reg_warmup + 1) / cfg.h_ramp_epochs)

    def penalty_on(self, epoch: int) -> bool:
        return epoch >= self.reg_warmup

    def penalty(self, model: nn.Module, x: Tensor, y: Tensor, h: float, create_graph: bool = True) -> Tensor:
        """penalty_scale * curvature penalty, in eval mode (as the published code); the mode is restored."""
        with eval_mode(model), torch.set_grad_enabled(True):
            p = curvature_penalty(model, x, y, h, penalty=self.cfg.penalty, create_graph=create_graph)
        p = self.cfg.penalty_scale * p
        return p if create_graph else p.detach()

    def alpha_step(self, batch: SearchBatch) -> dict[str, Any]:
        cfg = self.cfg
        if not self.penalty_on(batch.epoch):
            return super().alpha_step(batch)  # DARTS: L_val alone
        h = self.h_at(batch.epoch)
        n = cfg.reg_n or len(batch.y_a)
        figures: dict[str, Tensor] = {}

        def loss(m: nn.Module) -> Tensor:
            ce = F.cross_entropy(m(batch.x_a), batch.y_a)
            pen = self.penalty(m, batch.x_a[:n], batch.y_a[:n], h)
            figures.update(ce_val=ce.detach(), curvature=pen.detach())
            return ce + cfg.gamma * pen

        (grad,), (value,) = self.hypergradients(batch, loss)
        self.apply_alpha_gradient(grad)
        return {"alpha_loss": value, **figures}

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        info: dict[str, Any] = {"h": self.h_at(epoch), "penalty_on": self.penalty_on(epoch)}
        n = min(self.cfg.val_curvature_n, len(self.ctx.data.val))
        if n > 0 and self.cfg.h_max > 0:
            x = self.ctx.data.val.x[:n].to(self.device)
            y = self.ctx.data.val.y[:n].to(self.device)
            info["val_curvature"] = self.penalty(self.net, x, y, self.cfg.h_max, create_graph=False).item()
        return info
