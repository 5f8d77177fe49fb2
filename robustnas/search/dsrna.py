"""DSRNA (Hosseini, Yang & Xie, CVPR 2021): differentiable search of robust architectures.

DARTS with a robustness metric R in the alpha objective: min_alpha L_val - gamma * R, gamma = 0.01, first
order by default (each metric may have its own weight: gamma_jacobian, gamma_cb). R is one of (METHODS.md
section 4):

- "jacobian": R_Jac = -(eps/K) * mean_x sum_k ||grad_x f_k(x)||_q (robustnas.robustness.jacobian), exact or by random
  projection;
- "cb": R_CB = mean over the batch of the certified lower bound of the margin f_y - max_{j != y} f_j over
  the eps-ball, propagated through the supernet (robustnas.robustness.certify; a MixedOp's bound is the
  softmax(alpha)-weighted sum of its ops' bounds, so the bound is differentiable in alpha); by default
  a CROWN backward bound over forward linear intermediate bounds ("crown-fwd") on the first cb_n images
  (interval bounds, the first default, are vacuous on a deep supernet; CROWN intermediate bounds, the
  second, cost one backward pass per unstable neuron and do not finish on a 28x28 supernet);
- "combined": R_CB + R_Jac.

Both metrics are taken in eval mode (BatchNorm with running statistics), so that each sample's bound and
Jacobian are its own, as in the certified evaluation. Optionally (an unofficial reimplementation's
addition) the weights also maximise R: L_train - weight_reg * R after `weight_reg_start` epochs.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from robustnas.robustness.attacks import eval_mode
from robustnas.robustness.certify import margin_lower_bound
from robustnas.core.config import parse_eps
from robustnas.core.errors import UserError
from robustnas.robustness.jacobian import jacobian_metric
from robustnas.search.base import SearchContext, register
from robustnas.search.supernet import SearchBatch, SupernetConfig, SupernetSearch
from robustnas.training.loop import epoch_seed


def certified_bound_metric(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str = "crown-fwd",
                           form: Literal["margin", "asinh"] = "margin", window: Optional[int] = None) -> Tensor:
    """R_CB: the batch mean of the margin lower bound over the Linf eps-ball (within [0, 1]).

    Differentiable in the model's parameters, a supernet's alphas included. method "crown-fwd" takes the
    intermediate bounds from forward linear bounds (no gradient through them; the final backward pass
    carries it); "crown" from CROWN too (walking back at most `window` graph values, None: to the input);
    "crown-ibp" and "ibp" from intervals, which are vacuous on a deep supernet (docs/dsrna.md).
    form="asinh" averages asinh(bound) instead: the same sign and order, a bounded gradient.
    """
    bound = margin_lower_bound(model, x, y, eps, method, window=window if method == "crown" else None)
    if form == "asinh":
        bound = torch.asinh(bound)
    elif form != "margin":
        raise UserError(f"dsrna: unknown cb_form {form!r}; use margin or asinh")
    return bound.mean()


class DsrnaConfig(SupernetConfig):
    """DSRNA settings. SupernetConfig holds the shared DARTS ones (first order by default; PC-DARTS via
    partial_channels_k); published CIFAR-10 values in the comments."""

    metric: Literal["jacobian", "cb", "combined"] = "jacobian"
    gamma: float = Field(default=0.01, ge=0)                # 0.01
    # per-metric weights (None: gamma); the two metrics have different scales (docs/dsrna.md)
    gamma_jacobian: Optional[float] = Field(default=None, ge=0)
    gamma_cb: Optional[float] = Field(default=None, ge=0)
    # Jacobian metric: "projection" (one random product per sample) or "exact" (one product per class)
    jacobian_mode: Literal["exact", "projection"] = "projection"
    projections: int = Field(default=1, ge=1)
    projection: Literal["sphere", "gaussian"] = "sphere"
    # certified-bound metric: crown-fwd, CROWN over forward linear intermediate bounds (linear bounds as in the
    # paper; cost ~2 (input entries + 1) forward passes per image); crown: CROWN intermediate bounds (tighter on
    # small supernets, one backward pass per unstable neuron: unaffordable at 28x28); crown-ibp and ibp take
    # intermediate bounds from intervals (vacuous on a deep supernet). docs/dsrna.md has the measurements.
    cb_method: Literal["crown-fwd", "crown", "crown-ibp", "ibp"] = "crown-fwd"
    cb_window: Optional[int] = Field(default=30, ge=1)        # crown: graph values an intermediate bound
    #                                                            walks back (cost ~ linear in it); None: all
    cb_n: Optional[int] = Field(default=1, ge=1)            # images the cb metric sees (None: all); each costs
    #                                                         ~2 (D + 1) forward passes (crown-fwd)
    cb_eps: Optional[str] = None                            # None: the search's threat eps
    cb_form: Literal["margin", "asinh"] = "margin"          # margin: the paper's R_CB
    metric_n: Optional[int] = Field(default=None, ge=1)     # alpha-batch images the metric sees; None: all
    # optional weight regularisation (an unofficial reimplementation: 1e-4 after 10 warm-up epochs)
    weight_reg: float = Field(default=0.0, ge=0)
    weight_reg_start: int = Field(default=10, ge=0)
    # the metric on the first val_metric_n validation images, logged every epoch (0: off)
    val_metric_n: int = Field(default=32, ge=0)

    @field_validator("cb_eps", mode="before")
    @classmethod
    def _check_cb_eps(cls, v: Any) -> Any:
        if v is None:
            return v
        try:
            parse_eps(v, "Linf")  # the bounds' input box
        except UserError as e:  # a ValueError, so that the one-line message names the field
            raise ValueError(str(e)) from None
        return str(v)

    @model_validator(mode="after")
    def _check_weight_reg(self) -> "DsrnaConfig":
        if self.weight_reg > 0 and self.weight_reg_start >= self.epochs:
            raise ValueError(f"weight_reg_start={self.weight_reg_start} is past the last epoch "
                             f"(epochs={self.epochs}); lower it or set weight_reg: 0")
        return self


@register
class Dsrna(SupernetSearch):
    name = "dsrna"
    Config = DsrnaConfig

    def setup(self, ctx: SearchContext) -> None:
        if ctx.norm != "Linf" and self.cfg.metric in ("cb", "combined"):
            raise UserError(f"dsrna: the certified-bound metric bounds Linf balls only, but the threat norm is "
                            f"{ctx.norm}; use --metric jacobian for L2")
        super().setup(ctx)
        self.cb_eps = parse_eps(self.cfg.cb_eps) if self.cfg.cb_eps is not None else self.eps
        self._epoch = 0

    # ------------------------------------------------------------------------------------ the metric
    def metric(self, model: nn.Module, x: Tensor, y: Tensor, create_graph: bool = True,
               generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(R, its parts) on (x, y), in eval mode (the model's mode is restored); differentiable unless
        create_graph=False."""
        cfg = self.cfg
        parts: dict[str, Tensor] = {}
        with eval_mode(model), torch.set_grad_enabled(True):
            if cfg.metric in ("jacobian", "combined"):
                parts["metric_jacobian"] = jacobian_metric(
                    model, x, self.eps, self.norm, cfg.jacobian_mode, cfg.projections, cfg.projection,
                    generator=generator, create_graph=create_graph)
            if cfg.metric in ("cb", "combined"):
                n = cfg.cb_n or len(y)
                with torch.set_grad_enabled(create_graph):
                    parts["metric_cb"] = certified_bound_metric(model, x[:n], y[:n], self.cb_eps, cfg.cb_method,
                                                                cfg.cb_form, cfg.cb_window)
        r = sum(parts.values())
        if not create_graph:
            r, parts = r.detach(), {k: v.detach() for k, v in parts.items()}
        return r, parts

    def weighted_metric(self, parts: dict[str, Tensor]) -> Tensor:
        """sum over the metrics of gamma_<metric> * R_<metric> (gamma where a metric's own is not set)."""
        g = {"metric_jacobian": self.cfg.gamma_jacobian, "metric_cb": self.cfg.gamma_cb}
        return sum((self.cfg.gamma if g[k] is None else g[k]) * v for k, v in parts.items())

    def alpha_step(self, batch: SearchBatch) -> dict[str, Any]:
        """Descend L_val - sum gamma_m * R_m in the alphas (first or second order, through `hypergradients`)."""
        n = self.cfg.metric_n or len(batch.y_a)
        x_m, y_m = batch.x_a[:n], batch.y_a[:n]
        figures: dict[str, Tensor] = {}

        def loss(m: nn.Module) -> Tensor:
            ce = F.cross_entropy(m(batch.x_a), batch.y_a)
            r, parts = self.metric(m, x_m, y_m)
            figures.update({"ce_val": ce.detach(), "metric": r.detach(), **{k: v.detach() for k, v in parts.items()}})
            return ce - self.weighted_metric(parts)

        (grad,), (value,) = self.hypergradients(batch, loss)
        self.apply_alpha_gradient(grad)
        return {"alpha_loss": value, **figures}

    # ------------------------------------------------------------------------------------ weight step
    def search_step(self, x_w: Tensor, y_w: Tensor, x_a: Tensor, y_a: Tensor, lr: float, epoch: int = 0,
                    step: int = 0, update_alphas: bool = True) -> tuple[Tensor, Tensor, dict[str, Any]]:
        self._epoch = epoch  # the weight loss needs it (weight_reg_start)
        self._weight_metric: Optional[Tensor] = None
        loss, correct, info = super().search_step(x_w, y_w, x_a, y_a, lr, epoch, step, update_alphas)
        if self._weight_metric is not None:
            info = {**info, "weight_metric": self._weight_metric}
        return loss, correct, info

    def weight_reg_on(self) -> bool:
        return self.cfg.weight_reg > 0 and self._epoch >= self.cfg.weight_reg_start

    def weight_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """L_train, minus weight_reg * R once the weight regularisation is on (R unweighted by the gammas)."""
        loss, logits = super().weight_loss(model, x, y)
        if self.weight_reg_on():
            r, _ = self.metric(model, x, y)
            self._weight_metric = r.detach()
            loss = loss - self.cfg.weight_reg * r
        return loss, logits

    # ------------------------------------------------------------------------------------ logging
    def epoch_info(self, epoch: int) -> dict[str, Any]:
        """The metric on fixed validation images (the same ones every epoch; fixed projections)."""
        n = min(self.cfg.val_metric_n, len(self.ctx.data.val))
        if n == 0:
            return {}
        x = self.ctx.data.val.x[:n].to(self.device)
        y = self.ctx.data.val.y[:n].to(self.device)
        g = torch.Generator(device=self.device).manual_seed(epoch_seed(self.ctx.seed, 20_000))
        r, parts = self.metric(self.net, x, y, create_graph=False, generator=g)
        return {"val_metric": r.item(), **{f"val_{k}": v.item() for k, v in parts.items()}}
