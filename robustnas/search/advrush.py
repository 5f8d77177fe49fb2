"""AdvRush (Mok et al., ICCV 2021): DARTS whose alpha loss adds an input-loss-curvature penalty, so that
the search favours architectures with a smooth input loss landscape. Defaults follow the public code
(nutellamok/advrush: architect.py, regularizer.py, train_search.py and its README command):

    L_alpha = CE(x) + gamma * lambda * mean_x ||grad_u l(u + h z) - grad_u l(u)||_2,   z = sign(g) / ||sign(g)||_2

per image, with u = (x - mean) / std the network's (normalised) input, g = grad_u l(u) (detached), l the
per-image cross-entropy, gamma = 0.01 and lambda = 4: CURE's finite-difference curvature along the
gradient's sign direction (Moosavi-Dezfooli et al. 2019), on the alpha batch, in eval mode. The penalty
is differentiated through both gradients (create_graph), so it reaches the alphas. The paper's squared
norm, pixel-space steps, a warm-up and DARTS' split batches are options; docs/advrush.md compares them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from robustnas.robustness.attacks import eval_mode
from robustnas.core.errors import UserError
from robustnas.search.base import SearchContext, register
from robustnas.search.supernet import SearchBatch, SupernetConfig, SupernetSearch, term_share
from robustnas.training.loop import epoch_steps

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits, y) -> per-sample loss


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn, create_graph: bool) -> Tensor:
    """grad_x of the summed per-sample loss: each sample's own gradient when samples do not interact."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(model(x), y).sum(), x, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def curvature_direction(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn = _ce) -> Tensor:
    """z = sign(grad_x l(x)) / ||sign(grad_x l(x))||_2 per sample, detached (zero where the gradient is).
    The sign is the same in pixel and normalised coordinates (std > 0), so z is too."""
    s = torch.sign(_input_grad(model, x, y, loss, create_graph=False))
    norm = s.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return (s / norm).detach()


def curvature_step(model: nn.Module, x: Tensor, y: Tensor, h: float, loss: LossFn = _ce,
                   std: Optional[Tensor] = None) -> Tensor:
    """The pixel step std * h z of `curvature_penalty`: h z has L2 length h per image in the network's input
    space (u = (x - mean) / std with `std`, pixels without). Detached."""
    scale = x.new_ones(()) if std is None else std.to(x)
    return h * scale * curvature_direction(model, x, y, loss)


def curvature_penalty(model: nn.Module, x: Tensor, y: Tensor, h: float, loss: LossFn = _ce,
                      penalty: Literal["norm", "squared"] = "norm", std: Optional[Tensor] = None,
                      create_graph: bool = True) -> Tensor:
    """mean over images of ||grad_u l(u + h z) - grad_u l(u)||_2 (penalty="norm", the public code's) or its
    square ("squared", the paper's), z from `curvature_direction`.

    u is the network's input: with `std` (the model's per-channel normalisation, broadcastable to x) u =
    (x - mean) / std, so the pixel step is std * h z and grad_u = std * grad_x; without it u = x (pixels).
    Differentiable in the model's parameters when create_graph. Uses the model in the mode it is given
    (AdvRush: eval mode)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise UserError("advrush: x must be a non-empty floating-point tensor of shape (N, ...)")
    if not isinstance(h, (int, float)) or isinstance(h, bool) or not h >= 0:
        raise UserError(f"advrush: the step h must be a number >= 0, got {h!r}")
    if penalty not in ("squared", "norm"):
        raise UserError(f"advrush: unknown penalty {penalty!r}; use norm or squared")
    if h == 0:  # the two gradients coincide; the penalty is 0
        return x.new_zeros(())
    scale = x.new_ones(()) if std is None else std.to(x)
    step = curvature_step(model, x, y, h, loss, std)
    g_step = _input_grad(model, x + step, y, loss, create_graph)
    g_here = _input_grad(model, x, y, loss, create_graph)
    diff = (scale * (g_step - g_here)).flatten(1)
    per_sample = diff.norm(dim=1) if penalty == "norm" else diff.square().sum(1)
    return per_sample.mean()


class AdvrushConfig(SupernetConfig):
    """AdvRush settings. Defaults follow the public code; its CIFAR-10 values (train_search.py run with the
    README's flags) in the comments. SupernetConfig holds the shared DARTS ones (published: batch 32,
    60 epochs, C 16, 8 layers, first order); `warmup_epochs` there freezes the alphas, `reg_warmup_epochs`
    here only delays the penalty (the alphas descend CE alone before it)."""

    gamma: float = Field(default=0.01, ge=0)             # a_gamma 0.01
    penalty: Literal["norm", "squared"] = "norm"         # code: norm; paper: squared
    penalty_scale: float = Field(default=4.0, gt=0)      # code: loss_cure lambda_ = 4 (1 with the paper's form)
    # network input space ("normalized": u = (x - mean) / std, as the code's CIFAR Normalize transform) or
    # pixels in [0, 1] ("pixel"): where z has L2 length h and the gradients are taken
    h_space: Literal["normalized", "pixel"] = "normalized"
    # README: --a_warmup_epochs 0 (train_search.py's own default is 50); None: floor(5/6 * epochs), at
    # most epochs - 1 (50 of 60)
    reg_warmup_epochs: Optional[int] = Field(default=0, ge=0)
    h_max: float = Field(default=1.5, ge=0)              # 1.5
    # "code": h = h_max * min(1, epoch / h_ramp_epochs) by absolute epoch (h_all = 0, 0.3, ..., 1.5, then
    # 1.5); "after-warmup": the ramp starts with the penalty, h_max * min(1, (epoch - reg_warmup + 1) / ramp)
    h_schedule: Literal["code", "after-warmup"] = "code"
    h_ramp_epochs: int = Field(default=5, ge=1)          # 5
    # "fixed": the alphas always use the first batch_size training images and the weights every training
    # image (the code: an unshuffled loader over the training set, next(iter(...)) each step);
    # "split": DARTS' halves (train_portion), a new alpha batch each step
    alpha_batch: Literal["fixed", "split"] = "fixed"
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

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        cfg = self.cfg
        meta = ctx.data.meta
        self.std = (torch.tensor(meta.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
                    if cfg.h_space == "normalized" else None)
        if cfg.alpha_batch == "fixed":
            n = len(ctx.data.train)
            self.w_idx = self.a_idx = torch.arange(n)  # the loop shuffles w_idx per epoch; a_idx is unused
            self.steps_per_epoch = self.steps_for(n)
            self.x_fixed = ctx.data.train.x[:cfg.batch_size].to(self.device)
            self.y_fixed = ctx.data.train.y[:cfg.batch_size].to(self.device)

    def steps_for(self, train_size: int) -> int:
        """With a fixed alpha batch the weights see the whole training split each epoch; else DARTS' halves."""
        if self.cfg.alpha_batch == "fixed":
            return epoch_steps(train_size, self.cfg.batch_size, self.cfg.max_batches_per_epoch)
        return super().steps_for(train_size)

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
        """penalty_scale * curvature penalty, in eval mode (as the public code); the mode is restored."""
        with eval_mode(model), torch.set_grad_enabled(True):
            p = curvature_penalty(model, x, y, h, penalty=self.cfg.penalty, std=self.std,
                                  create_graph=create_graph)
        p = self.cfg.penalty_scale * p
        return p if create_graph else p.detach()

    def alpha_step(self, batch: SearchBatch) -> dict[str, Any]:
        """CE on the alpha batch (train mode), plus gamma * the penalty once it is on. Logs the penalty and
        the alpha-gradient norms of both terms, the penalty's share ||g_pen|| / (||g_ce|| + ||g_pen||) and
        their cosine."""
        cfg = self.cfg
        if cfg.alpha_batch == "fixed":
            batch = dataclasses.replace(batch, x_a=self.x_fixed, y_a=self.y_fixed)
        h = self.h_at(batch.epoch)
        if not self.penalty_on(batch.epoch):
            return super().alpha_step(batch)  # DARTS: CE alone
        n = cfg.reg_n or len(batch.y_a)
        x_a, y_a = batch.x_a, batch.y_a
        figures: dict[str, Tensor] = {}

        def ce(m: nn.Module) -> Tensor:
            return F.cross_entropy(m(x_a), y_a)

        def reg(m: nn.Module) -> Tensor:
            p = self.penalty(m, x_a[:n], y_a[:n], h)
            figures["curvature"] = p.detach()
            return cfg.gamma * p

        if h == 0:  # the penalty is 0, with no graph to differentiate
            (g_ce,), (ce_val,) = self.hypergradients(batch, ce)
            g_reg, reg_val = [torch.zeros_like(g) for g in g_ce], ce_val.new_zeros(())
            figures["curvature"] = reg_val
        else:
            (g_ce, g_reg), (ce_val, reg_val) = self.hypergradients(batch, ce, reg)
        self.apply_alpha_gradient([a + b for a, b in zip(g_ce, g_reg)])
        return {"alpha_loss": ce_val + reg_val, "ce_val": ce_val, **figures, **term_share(g_ce, g_reg, "curv")}

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        info: dict[str, Any] = {"h": self.h_at(epoch), "penalty_on": self.penalty_on(epoch)}
        n = min(self.cfg.val_curvature_n, len(self.ctx.data.val))
        if n > 0 and self.cfg.h_max > 0:
            x = self.ctx.data.val.x[:n].to(self.device)
            y = self.ctx.data.val.y[:n].to(self.device)
            info["val_curvature"] = self.penalty(self.net, x, y, self.cfg.h_max, create_graph=False).item()
        return info
