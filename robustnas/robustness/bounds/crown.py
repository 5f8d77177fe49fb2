"""CROWN: backward linear relaxation over a `BoundGraph` (Zhang et al. 2018, "Efficient Neural Network
Robustness Certification with General Activation Functions"), for DAGs.

A lower bound of spec . v (v a graph value) is built by walking the graph in reverse topological order with
one coefficient tensor A per value, of shape (N, S, *value_shape); a value with several users accumulates
the A of each before it is expanded. Through a linear step A moves by the step's vjp (conv, pooling,
slicing, cat, reshape, constant scaling all alike) and picks up A . f(0) as bias; through a ReLU or a
max-pool by a linear relaxation chosen per sign of A; at the input it is concretized over the box.

ReLU: upper line through (l, 0) and (u, u), lower line 0 or identity, whichever is closer (u > -l).
Max-pool: lower line x_j with j the window's argmax of the lower bounds; upper line x_j when that input
dominates the window (l_j >= u_i for all others), else the constant max(u). Both are sound; the upper one
is coarser than a full linear relaxation of max.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from robustnas.robustness.bounds.graph import BoundGraph, Step

# spec rows per backward pass when tightening intermediate bounds (caps memory at rows * largest value)
ROWS_PER_PASS = 512


def _dot(a: Tensor, t: Tensor) -> Tensor:
    """(N, S, *shape) . (N, *shape) -> (N, S)."""
    return (a * t.unsqueeze(1)).flatten(2).sum(2)


def backward_lower(graph: BoundGraph, start: int, spec: Tensor, stop: int = 0) -> Tensor:
    """Lower bound (N, S) of spec . value(start) over the input box; spec has shape (N, S, *value_shape).

    Values before index `stop` are not expanded: their coefficients are concretized over their intervals
    (sound, as every interval holds; cheaper and looser than walking back to the input).
    """
    steps = graph.steps
    coeffs: dict[int, Tensor] = {start: spec}
    lower = spec.new_zeros(spec.shape[:2])

    def push(index: int, a: Tensor) -> None:
        coeffs[index] = coeffs[index] + a if index in coeffs else a

    for i in range(start, -1, -1):
        a = coeffs.pop(i, None)
        if a is None:
            continue
        step = steps[i]
        if step.kind == "input" or i < stop:
            lower = lower + _dot(a.clamp(min=0), step.lo) + _dot(a.clamp(max=0), step.hi)
        elif step.kind == "linear":
            bias, vjp_fn = graph.vjp(i)
            if bias is not None:
                lower = lower + _dot(a, bias)
            if step.transpose is not None:
                push(step.inputs[0], step.transpose(a.flatten(0, 1)).view(*a.shape[:2], *steps[step.inputs[0]].lo.shape[1:]))
            elif vjp_fn is None:  # elementwise: A times the factor of each input
                for j, s in zip(step.inputs, step.scales):
                    if isinstance(s, Tensor):
                        push(j, a * (s.unsqueeze(1) if s.dim() == a.dim() - 1 else s))
                    elif s != 0:
                        push(j, a if s == 1 else a * s)
            else:
                for j, a_j in zip(step.inputs, torch.func.vmap(vjp_fn, in_dims=1, out_dims=1)(a)):
                    push(j, a_j)
        elif step.kind == "relu":
            a_in, bias = _relu_backward(a, steps[step.inputs[0]])
            lower = lower + bias
            push(step.inputs[0], a_in)
        elif step.kind == "maxpool":
            a_in, bias = _maxpool_backward(a, steps[step.inputs[0]], step.pool)
            lower = lower + bias
            push(step.inputs[0], a_in)
        else:  # pragma: no cover - graph.py creates only the kinds above
            raise AssertionError(step.kind)
    return lower


def relu_relaxation(pre: Step) -> tuple[Tensor, Tensor, Tensor]:
    """(lower slope, upper slope, upper bias): low_slope * z <= relu(z) <= up_slope * z + up_bias on pre's
    interval (the lines of the module docstring), each shaped like the value."""
    l, u = pre.lo, pre.hi
    active = (l >= 0).to(l.dtype)
    unstable = (l < 0) & (u > 0)
    up_slope = torch.where(unstable, u / (u - l).clamp_min(1e-12), active)
    up_bias = torch.where(unstable, -l * up_slope, torch.zeros_like(l))
    low_slope = torch.where(unstable, (u > -l).to(l.dtype), active)
    return low_slope, up_slope, up_bias


def _relu_backward(a: Tensor, pre: Step) -> tuple[Tensor, Tensor]:
    low_slope, up_slope, up_bias = relu_relaxation(pre)
    a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
    return a_pos * low_slope.unsqueeze(1) + a_neg * up_slope.unsqueeze(1), _dot(a_neg, up_bias)


def _windows(t: Tensor, pool: dict, fill: float) -> Tensor:
    """The pooling windows of t (N, C, H, W) as (N, C, K, L), padding with `fill`, as max_pool2d sees them."""
    k, s = _pair(pool["kernel_size"]), _pair(pool["stride"])
    p, d = _pair(pool["padding"]), _pair(pool["dilation"])
    extra = []
    for dim in range(2):
        size = t.shape[2 + dim]
        span = d[dim] * (k[dim] - 1) + 1
        out = (size + 2 * p[dim] - span) // s[dim] + 1
        if pool["ceil_mode"]:
            out = -(-(size + 2 * p[dim] - span) // s[dim]) + 1
            if (out - 1) * s[dim] >= size + p[dim]:
                out -= 1
        extra.append(max(0, (out - 1) * s[dim] + span - (size + 2 * p[dim])))
    padded = F.pad(t, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]), value=fill)
    cols = F.unfold(padded, k, dilation=d, stride=s)
    return cols.view(t.shape[0], t.shape[1], k[0] * k[1], -1)


def maxpool_relaxation(pre: Step, pool: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(where, dominant, u_max), each (N, C, L) over the L output positions: x_where <= max-pool, and
    max-pool <= x_where where dominant, else <= u_max (the lines of the module docstring); `where` is the
    flat index of x_j in the input's H * W."""
    l, u = pre.lo, pre.hi
    n, c, h, w = l.shape
    lw, uw = _windows(l, pool, float("-inf")), _windows(u, pool, float("-inf"))
    pos = _windows(torch.arange(h * w, dtype=l.dtype, device=l.device).view(1, 1, h, w), pool, -1.0)
    j = lw.argmax(2, keepdim=True)  # (N, C, 1, L)
    u_max = uw.max(2).values
    u_others = uw.scatter(2, j, float("-inf")).max(2).values
    dominant = lw.gather(2, j).squeeze(2) >= u_others
    where = pos.expand(n, c, -1, -1).gather(2, j).squeeze(2).long()
    return where, dominant, u_max


def _maxpool_backward(a: Tensor, pre: Step, pool: dict) -> tuple[Tensor, Tensor]:
    n, c, h, w = pre.lo.shape
    s = a.shape[1]
    where, dominant, u_max = maxpool_relaxation(pre, pool)
    dominant = dominant.unsqueeze(1)  # (N, 1, C, L)
    a = a.reshape(n, s, c, -1)
    a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
    coef = a_pos + torch.where(dominant, a_neg, torch.zeros_like(a_neg))
    bias = (torch.where(dominant, torch.zeros_like(a_neg), a_neg) * u_max.unsqueeze(1)).sum((2, 3))
    a_in = a.new_zeros(n, s, c, h * w).scatter_add(3, where.unsqueeze(1).expand(n, s, c, -1), coef)
    return a_in.view(n, s, c, h, w), bias


def tighten(graph: BoundGraph, index: int, only_unstable: bool, window: Optional[int] = None) -> None:
    """Replace the interval of value `index` by its intersection with the CROWN bounds (intermediate bounds).

    With `only_unstable`, only neurons whose interval straddles 0 are bounded (the others' ReLU is exact).
    """
    step = graph.steps[index]
    if step.kind == "input":
        return
    n = step.lo.shape[0]
    lo, hi = step.lo.reshape(n, -1), step.hi.reshape(n, -1)
    m = lo.shape[1]
    if only_unstable:
        mask = (lo < 0) & (hi > 0)
        rows = int(mask.sum(1).max())
        if rows == 0:
            return
        idx = mask.to(lo.dtype).topk(rows, dim=1).indices
    else:
        idx = torch.arange(m, device=lo.device).expand(n, m)
    new_lo, new_hi = [], []
    for part in idx.split(ROWS_PER_PASS, dim=1):
        eye = lo.new_zeros(n, part.shape[1], m).scatter_(2, part.unsqueeze(2), 1.0)
        spec = torch.cat([eye, -eye], 1).view(n, 2 * part.shape[1], *step.lo.shape[1:])
        res = backward_lower(graph, index, spec, 0 if window is None else max(0, index - window))
        new_lo.append(res[:, : part.shape[1]])
        new_hi.append(-res[:, part.shape[1]:])
    lo = lo.scatter(1, idx, torch.maximum(lo.gather(1, idx), torch.cat(new_lo, 1)))
    hi = hi.scatter(1, idx, torch.minimum(hi.gather(1, idx), torch.cat(new_hi, 1)))
    step.lo, step.hi = lo.view_as(step.lo), hi.view_as(step.hi)
