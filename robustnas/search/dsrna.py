"""DSRNA (Hosseini, Yang & Xie, CVPR 2021): differentiable search of robust architectures.

DARTS with a robustness metric R in the alpha objective: min_alpha L_val - gamma * R, gamma = 0.01, first
order by default (each metric may have its own weight: gamma_jacobian, gamma_cb). R is one of (METHODS.md
section 4):

- "jacobian": R_Jac = -(eps/K) * mean_x sum_k ||grad_x f_k(x)||_q (robustnas.robustness.jacobian), exact or by random
  projection;
- "cb": R_CB, a certified lower bound propagated through the supernet (robustnas.robustness.certify; a MixedOp's
  bound is the softmax(alpha)-weighted sum of its ops' bounds, so the bound is differentiable in alpha), on the
  first cb_n images. By default (cb_form "radius") the mean certified radius: the largest eps' <= eps whose
  margin bound (CROWN over zonotope intermediate bounds, "crown-zono") is >= 0, with its implicit-function
  gradient; cb_form "margin" is the batch mean of the margin bound f_y - max_{j != y} f_j at eps itself, which
  through a deep supernet at eps 0.1 is vacuous (-1e5 and worse) whatever the bound method (docs/dsrna.md);
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
from robustnas.robustness.certify import margin_lower_bound, radius_bracket
from robustnas.core.config import parse_eps
from robustnas.core.errors import UserError
from robustnas.robustness.jacobian import jacobian_metric
from robustnas.search.base import SearchContext, register
from robustnas.search.supernet import SearchBatch, SupernetConfig, SupernetSearch, term_share
from robustnas.training.loop import epoch_seed


def certified_bound_metric(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str = "crown-zono",
                           form: Literal["radius", "margin", "asinh"] = "radius", window: Optional[int] = None,
                           rtol: float = 0.1) -> Tensor:
    """R_CB over the Linf eps-ball (within [0, 1]), differentiable in the model's parameters, a supernet's alphas
    included.

    form="radius": the batch mean of the certified radius, the largest eps' <= eps whose margin lower bound is
    >= 0 (0 for a misclassified image), found by bisection in log eps to the relative tolerance rtol
    (certify.radius_bracket). Its gradient is the implicit-function one: at the radius r the bound m(r, alpha)
    is 0, so dr/dalpha = (dm/dalpha) / |dm/dr|, dm/dr taken as the secant of the bound over [r, r (1 + max(rtol, 0.01))].
    form="margin": the batch mean of the margin lower bound at eps (METHODS.md's R_CB); "asinh": of
    asinh(margin bound), the same sign and order with a bounded gradient.
    method: how the bound is computed ("crown-zono": CROWN final bound over zonotope intermediate bounds (no
    gradient through them); "crown-ibp": over interval intermediate bounds; "crown-fwd": over forward linear
    intermediate bounds (no gradient through them); "crown": over CROWN intermediate bounds walking back at most
    `window` graph values; "ibp": intervals). docs/dsrna.md.
    """
    window = window if method == "crown" else None
    if form == "radius":
        return _radius_metric(model, x, y, eps, method, window, rtol)
    bound = margin_lower_bound(model, x, y, eps, method, window=window)
    if form == "asinh":
        bound = torch.asinh(bound)
    elif form != "margin":
        raise UserError(f"dsrna: unknown cb_form {form!r}; use radius, margin or asinh")
    return bound.mean()


def _radius_metric(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str, window: Optional[int],
                   rtol: float) -> Tensor:
    """The mean certified radius, with the implicit-function gradient (certified_bound_metric)."""
    lo, hi = radius_bracket(model, x, y, method, eps, rtol=rtol, window=window)
    inner = (lo > 0) & (lo < hi)  # bracketed radii; 0 (misclassified / not certified) and eps itself are flat
    total = lo[~inner].sum()
    if bool(inner.any()) and torch.is_grad_enabled():
        xi, yi, r = x[inner], y[inner], lo[inner]
        m = margin_lower_bound(model, xi, yi, r, method, window=window)
        # dm/dr: the secant over [r, r (1 + w)], at least 1% wide (over a narrower one the difference of two
        # float32 bounds near 0 is noise); CROWN bounds are kinked in eps, a secant smooths over the kinks
        w = max(rtol, 0.01)
        with torch.no_grad():
            slope = (margin_lower_bound(model, xi, yi, r * (1 + w), method, window=window) - m.detach()) / (r * w)
        step = torch.where(slope < 0, (m - m.detach()) / -slope.clamp(max=-1e-12), torch.zeros_like(m))
        total = total + (r + step).sum()
    else:
        total = total + lo[inner].sum()
    return total / x.shape[0]


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
    # certified-bound metric. cb_form radius (default): the mean certified radius (largest eps' <= cb_eps whose
    # margin bound is >= 0, by bisection in log eps to cb_rtol, ~10 bounds an image) with its implicit-function
    # gradient; margin: the margin lower bound at cb_eps (vacuous through a deep supernet at eps 0.1: docs/dsrna.md);
    # asinh: asinh of it. cb_method: crown-zono (CROWN final bound over zonotope intermediate bounds: as tight as
    # full CROWN within ~15% of the radius on a trained supernet, where crown-ibp and crown-fwd certify nothing),
    # crown-ibp (interval intermediate bounds: cheap, radius 0 on trained supernets), crown-fwd (forward linear
    # intermediate bounds), crown (CROWN intermediate bounds, cb_window below; unaffordable at 28x28), ibp.
    # docs/dsrna.md has the measurements.
    cb_form: Literal["radius", "margin", "asinh"] = "radius"
    cb_method: Literal["crown-zono", "crown-ibp", "crown-fwd", "crown", "ibp"] = "crown-zono"
    cb_rtol: float = Field(default=0.1, gt=0)              # radius: relative width of the final bisection bracket
    cb_window: Optional[int] = Field(default=30, ge=1)        # crown: graph values an intermediate bound
    #                                                            walks back (cost ~ linear in it); None: all
    cb_n: Optional[int] = Field(default=1, ge=1)            # images the cb metric sees (None: all)
    cb_eps: Optional[str] = None                            # None: the search's threat eps (radius: its cap)
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
    step_series = ("metric_cb", "metric_share")  # search.jsonl: metric_cb_steps, metric_share_steps

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
                                                                cfg.cb_form, cfg.cb_window, cfg.cb_rtol)
        r = sum(parts.values())
        if not create_graph:
            r, parts = r.detach(), {k: v.detach() for k, v in parts.items()}
        return r, parts

    def weighted_metric(self, parts: dict[str, Tensor]) -> Tensor:
        """sum over the metrics of gamma_<metric> * R_<metric> (gamma where a metric's own is not set)."""
        g = {"metric_jacobian": self.cfg.gamma_jacobian, "metric_cb": self.cfg.gamma_cb}
        return sum((self.cfg.gamma if g[k] is None else g[k]) * v for k, v in parts.items())

    def alpha_step(self, batch: SearchBatch) -> dict[str, Any]:
        """Descend L_val - sum gamma_m * R_m in the alphas (first or second order, through `hypergradients`). Logs
        the metric's parts and how much it steers: the alpha-gradient norms of L_val and of the metric term,
        the term's share and their cosine (`term_share`)."""
        n = self.cfg.metric_n or len(batch.y_a)
        x_m, y_m = batch.x_a[:n], batch.y_a[:n]
        figures: dict[str, Tensor] = {}

        def ce(m: nn.Module) -> Tensor:
            return F.cross_entropy(m(batch.x_a), batch.y_a)

        def reg(m: nn.Module) -> Tensor:
            r, parts = self.metric(m, x_m, y_m)
            figures.update({"metric": r.detach(), **{k: v.detach() for k, v in parts.items()}})
            return -self.weighted_metric(parts)

        (g_ce, g_reg), (ce_val, reg_val) = self.hypergradients(batch, ce, reg)
        self.apply_alpha_gradient([a + b for a, b in zip(g_ce, g_reg)])
        return {"alpha_loss": ce_val + reg_val, "ce_val": ce_val, **figures, **term_share(g_ce, g_reg, "metric")}

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

    # ------------------------------------------------------------------------------------ verdict
    def decision(self, alphas: dict[str, list[list[float]]], val_clean: float,
                 record: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The supernet verdict, plus an "inert" line when the certified-bound term steered nothing in this
        epoch's alpha steps: the radius was 0 at every step (no image certified at any radius the bisection can
        resolve), the margin form's gamma_cb * R_CB outweighed the validation loss 100-fold (the alphas then
        follow a vacuous bound alone), or the metric term's share of the alpha gradient was under 1%."""
        out = super().decision(alphas, val_clean, record)
        r, cfg = record or {}, self.cfg
        if not out or not r.get("alpha_updates"):
            return out
        gamma = cfg.gamma if cfg.gamma_cb is None else cfg.gamma_cb
        cb = cfg.metric != "jacobian" and "metric_cb" in r
        if cb and cfg.cb_form == "radius" and r["metric_cb"] == 0.0:
            line = (f"the certified-bound metric was 0 at every alpha step of the epoch: no image was certified at "
                    f"any radius from {self.cb_eps * 1e-6:.1e} up, so it steered nothing (the alphas follow the "
                    f"validation loss{' and the Jacobian term' if cfg.metric == 'combined' else ''} alone; "
                    f"docs/dsrna.md)")
        elif cb and cfg.cb_form != "radius" and abs(gamma * r["metric_cb"]) > 100 * abs(r.get("ce_val", 0.0)):
            line = (f"gamma_cb * R_CB ({gamma * r['metric_cb']:.3g}) outweighs the validation loss "
                    f"({r.get('ce_val', 0.0):.3g}) more than 100-fold: the alphas follow the certified bound alone, "
                    f"which at this size is vacuous (docs/dsrna.md)")
        elif r.get("metric_share") is not None and r["metric_share"] < 0.01:
            line = (f"the metric term's share of the alpha gradient was {100 * r['metric_share']:.2g}% (< 1%) over "
                    f"the epoch: the alphas followed the validation loss; raise gamma (gamma_cb, gamma_jacobian) to "
                    f"let it steer (docs/dsrna.md)")
        else:
            return out
        return {**out, "inert": [*out.get("inert", []), line]}

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
