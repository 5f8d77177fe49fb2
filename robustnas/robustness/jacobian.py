"""The input-Jacobian robustness metric of DSRNA (Hosseini, Yang & Xie, CVPR 2021), differentiable in the
model's weights and alphas.

To first order a perturbation d with ||d||_p <= eps moves logit k by at most eps * ||grad_x f_k(x)||_q,
q the dual of p (q = 1 for an Linf threat, q = 2 for L2). The metric is the negated average of that
bound over the classes and the batch:

    R_Jac = -(eps / K) * mean_x sum_k ||grad_x f_k(x)||_q            (higher = more robust)

"exact" takes one vector-Jacobian product per class (K backward passes). "projection" estimates the
Jacobian's squared Frobenius norm with one product per sample along a random direction v of the
logit space (Hoffman, Roberts & Yaida 2019): with v uniform on the unit sphere, K * ||v^T J||^2 is an
unbiased estimate of ||J||_F^2 (with v ~ N(0, I), ||v^T J||^2 is). The projection metric replaces
sum_k ||grad f_k||_q by its Cauchy-Schwarz bound c_q * sqrt(K) * ||J||_F (c_2 = 1, c_1 = sqrt(d), d the
input size, since ||g||_1 <= sqrt(d) ||g||_2), so both modes have the same sign, meaning and scale.

Every gradient is taken with create_graph=True, so a loss built from the metric can be differentiated
again, in weights or alphas. The metric uses the model in the mode it is given: in training mode
BatchNorm couples the samples of a batch (batch statistics), so callers that want each sample's own
Jacobian put the model in eval mode (the DSRNA strategy does).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from robustnas.core.errors import UserError

Norm = Literal["Linf", "L2"]
Mode = Literal["exact", "projection"]
Projection = Literal["sphere", "gaussian"]


def dual_order(norm: Norm) -> float:
    """q of the dual norm of a threat model: Linf -> 1, L2 -> 2."""
    if norm == "Linf":
        return 1.0
    if norm == "L2":
        return 2.0
    raise UserError(f"unknown threat norm {norm!r}; use Linf or L2")


def _logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(x as a fresh leaf that requires grad, the model's logits on it)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise UserError("jacobian: x must be a non-empty floating-point tensor of shape (N, ...)")
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():  # input gradients are needed even when the caller is under no_grad
        out = model(x)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UserError(f"jacobian: the model must return logits of shape (N, K); got {shape}")
    return x, out


def _vjp(out: Tensor, x: Tensor, v: Tensor, create_graph: bool) -> Tensor:
    """v^T (d out / d x) per sample: (N, *x.shape[1:]). Zeros when the output does not depend on x."""
    with torch.enable_grad():
        (g,) = torch.autograd.grad(out, x, grad_outputs=v, create_graph=create_graph, retain_graph=True,
                                   allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def jacobian_row_norms(model: nn.Module, x: Tensor, q: float = 1.0, create_graph: bool = True) -> Tensor:
    """(N, K): ||grad_x f_k(x_n)||_q, exactly, with one vector-Jacobian product per class k.

    Each product sums the class-k logit over the batch; that is each sample's own gradient as long as
    the samples do not interact (eval-mode BatchNorm).
    """
    if not (q >= 1):
        raise UserError(f"jacobian: the norm order q must be >= 1, got {q!r}")
    x, out = _logits(model, x)
    n, k = out.shape
    rows = []
    for c in range(k):
        v = torch.zeros_like(out)
        v[:, c] = 1.0
        g = _vjp(out, x, v, create_graph)
        rows.append(torch.linalg.vector_norm(g.reshape(n, -1), ord=q, dim=1))
    norms = torch.stack(rows, dim=1)
    return norms if create_graph else norms.detach()


def _frobenius(model: nn.Module, x: Tensor, projections: int, projection: str,
               generator: Optional[torch.Generator], create_graph: bool) -> tuple[Tensor, int]:
    if not isinstance(projections, int) or isinstance(projections, bool) or projections < 1:
        raise UserError(f"jacobian: projections must be a positive integer, got {projections!r}")
    if projection not in ("sphere", "gaussian"):
        raise UserError(f"jacobian: unknown projection {projection!r}; use sphere or gaussian")
    x, out = _logits(model, x)
    n, k = out.shape
    total = out.new_zeros(n)
    for _ in range(projections):
        where = generator.device if generator is not None else out.device
        v = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=where).to(out.device)
        if projection == "sphere":
            v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-12)
        est = _vjp(out, x, v, create_graph).reshape(n, -1).square().sum(1)
        total = total + (k * est if projection == "sphere" else est)
    total = total / projections
    return (total if create_graph else total.detach()), k


def frobenius_sq_estimate(model: nn.Module, x: Tensor, projections: int = 1, projection: Projection = "sphere",
                          generator: Optional[torch.Generator] = None, create_graph: bool = True) -> Tensor:
    """(N,) unbiased estimate of ||J(x_n)||_F^2, J = d logits / d x, from `projections` random products.

    sphere: v uniform on the unit sphere of R^K, estimate K * ||v^T J||^2 (E[v v^T] = I / K);
    gaussian: v ~ N(0, I_K), estimate ||v^T J||^2. Averaged over the projections.
    """
    return _frobenius(model, x, projections, projection, generator, create_graph)[0]


def jacobian_metric(model: nn.Module, x: Tensor, eps: float, norm: Norm = "Linf", mode: Mode = "exact",
                    projections: int = 1, projection: Projection = "sphere",
                    generator: Optional[torch.Generator] = None, create_graph: bool = True) -> Tensor:
    """R_Jac = -(eps / K) * mean_x sum_k ||grad_x f_k(x)||_q, a scalar (see the module docstring).

    mode="projection" uses c_q * sqrt(K * estimate of ||J||_F^2) per sample in place of the sum.
    """
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise UserError(f"jacobian: eps must be a finite number >= 0, got {eps!r}")
    q = dual_order(norm)
    if mode == "exact":
        norms = jacobian_row_norms(model, x, q, create_graph)
        per_sample, k = norms.sum(1), norms.shape[1]
    elif mode == "projection":
        fro2, k = _frobenius(model, x, projections, projection, generator, create_graph)
        c_q = math.sqrt(x[0].numel()) if q == 1.0 else 1.0
        per_sample = c_q * torch.sqrt(k * fro2 + 1e-20)  # the tiny floor keeps the gradient finite at 0
    else:
        raise UserError(f"jacobian: unknown mode {mode!r}; use exact or projection")
    return -(eps / k) * per_sample.mean()
