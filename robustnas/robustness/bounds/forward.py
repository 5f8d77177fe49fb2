"""Forward linear bounds (symbolic intervals, the forward mode of LiRPA; Xu et al. 2020, "Automatic
Perturbation Analysis for Scalable Certified Robustness and Beyond", section 3) over a `BoundGraph`: the
intermediate bounds of the "crown-fwd" method.

Every graph value v carries two linear functions of the input x, L_v(x) <= v(x) <= U_v(x) for x in the input
box, stored as coefficient tensors of shape (N, D + 1, *value_shape): columns 0..D-1 are the coefficients of
the D input entries, column D the offset. The input starts as the identity. Then, step by step:

- linear step f(z) = W z + b: with mid = (L + U) / 2 and rad = (U - L) / 2 (rad >= 0 on the box),
  W mid - |W| rad <= f(z) - b <= W mid + |W| rad. W is applied to all D + 1 columns at once (torch.func.jvp
  of the step's own function at 0, vmapped over the columns: the op itself without its bias), |W| by the
  step's radius map (`Step.abs_fn`, the one the interval propagation uses); an elementwise step multiplies by
  its scales; a map with non-negative coefficients needs no radius (L -> W L, U -> W U);
- ReLU and max-pool: the linear relaxations of bounds/crown.py (one implementation of each), from the
  interval of the pre-activation, applied to L (lower line) and U (upper line);
- a value that feeds a ReLU or a max-pool is concretized over the input box, and its interval becomes the
  intersection with the interval that IBP propagated (both are sound), before its relaxation is chosen.

The cost is about 2 (D + 1) forward passes of the network per image, whatever the number of unstable
neurons (CROWN intermediate bounds cost one backward pass per unstable neuron). The final bound is then the
usual CROWN backward pass from the spec (certify.py), which uses these intervals in its relaxations.

Gradients: the forward coefficients are computed without autograd (keeping them differentiable would hold
every coefficient tensor of the graph in memory), and so is their intersection with the IBP intervals: the
intermediate intervals (and so the relaxation slopes) carry no gradient. The final backward pass carries it
through the linear steps (a supernet's softmax(alpha) weights included).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from robustnas.robustness.bounds.crown import maxpool_relaxation, relu_relaxation
from robustnas.robustness.bounds.graph import BoundGraph, Step


def _expand(s: object, a: Tensor) -> object:
    """A step's scale (a number, or a tensor shaped or broadcastable like the value) against (N, D+1, *shape)."""
    return s.unsqueeze(1) if isinstance(s, Tensor) and s.dim() == a.dim() - 1 else s


class ForwardBounds:
    """`TracedModel.propagate`'s forward hook: keeps (L, U) coefficients of the values still needed."""

    def __init__(self, x_lo: Tensor, x_hi: Tensor):
        n = x_lo.shape[0]
        self.d = x_lo[0].numel()
        self.center = ((x_lo + x_hi) / 2).reshape(n, self.d)
        self.radius = ((x_hi - x_lo) / 2).reshape(n, self.d)
        self.coeffs: dict[int, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------------------------ the hook
    def release(self, index: int) -> None:
        self.coeffs.pop(index, None)

    def step(self, graph: BoundGraph, index: int, feeds_nonlinear: bool) -> None:
        with torch.no_grad():
            step = graph.steps[index]
            if step.kind == "input":
                n = step.lo.shape[0]
                eye = torch.eye(self.d, self.d + 1, dtype=step.lo.dtype, device=step.lo.device).t()
                a = eye.reshape(1, self.d + 1, *step.lo.shape[1:]).expand(n, *([-1] * step.lo.dim()))
                self.coeffs[index] = (a, a)
                return
            if step.kind == "linear":
                lo, hi = self._linear(step)
            elif step.kind == "relu":
                lo, hi = self._relu(graph.steps[step.inputs[0]], *self.coeffs[step.inputs[0]])
            else:
                lo, hi = self._maxpool(step, graph.steps[step.inputs[0]], *self.coeffs[step.inputs[0]])
            self.coeffs[index] = (lo, hi)
            if feeds_nonlinear:
                c_lo, c_hi = self.concretize(lo, hi)
                step.lo, step.hi = torch.maximum(step.lo, c_lo), torch.minimum(step.hi, c_hi)

    def concretize(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """The interval of L over the box (its minimum) and of U (its maximum), each (N, *shape)."""
        def ends(a: Tensor) -> tuple[Tensor, Tensor]:
            flat = a.flatten(2)
            mid = torch.einsum("ndk,nd->nk", flat[:, : self.d], self.center) + flat[:, self.d]
            rad = torch.einsum("ndk,nd->nk", flat[:, : self.d].abs(), self.radius)
            return (mid - rad).view(a.shape[0], *a.shape[2:]), (mid + rad).view(a.shape[0], *a.shape[2:])

        return ends(lo)[0], ends(hi)[1]

    # ------------------------------------------------------------------------------------ step rules
    def _linear(self, step: Step) -> tuple[Tensor, Tensor]:
        ins = [self.coeffs[j] for j in step.inputs]
        zeros = [l.new_zeros(l.shape[0], *l.shape[2:]) for l, _ in ins]  # contiguous, as the op's input is
        bias = step.fn(*zeros)
        if step.batched is not None:  # one call over all columns (Step.batched; the radius map is batched too)
            (l, u), = ins

            def cols(f, t: Tensor) -> Tensor:
                return f(t.flatten(0, 1)).unflatten(0, t.shape[:2])

            if step.abs_fn is None:
                lo, hi = cols(step.batched, l), cols(step.batched, u)
            else:
                mid, rad = cols(step.batched, (l + u) / 2), cols(step.abs_fn, (u - l) / 2)
                lo, hi = mid - rad, mid + rad
        elif step.scales is not None:  # elementwise: out = sum_j s_j * in_j + bias
            lo = hi = None
            for (l, u), s in zip(ins, step.scales):
                s = _expand(s, l)
                if isinstance(s, Tensor):
                    s_pos, s_neg = s.clamp(min=0), s.clamp(max=0)
                    t_lo, t_hi = s_pos * l + s_neg * u, s_pos * u + s_neg * l
                else:
                    t_lo, t_hi = (s * l, s * u) if s >= 0 else (s * u, s * l)
                lo, hi = (t_lo, t_hi) if lo is None else (lo + t_lo, hi + t_hi)
        else:
            def linear_part(*t: Tensor) -> Tensor:
                return torch.func.jvp(step.fn, tuple(zeros), t)[1]

            lin = torch.func.vmap(linear_part, in_dims=1, out_dims=1)
            if step.abs_fn is None:  # non-negative coefficients
                lo, hi = lin(*[l for l, _ in ins]), lin(*[u for _, u in ins])
            else:
                mid = lin(*[(l + u) / 2 for l, u in ins])
                rad = torch.func.vmap(step.abs_fn, in_dims=1, out_dims=1)(*[(u - l) / 2 for l, u in ins])
                lo, hi = mid - rad, mid + rad
        return self._add_offset(lo, bias), self._add_offset(hi, bias)

    def _add_offset(self, a: Tensor, offset: Optional[Tensor]) -> Tensor:
        if offset is None or not (offset.requires_grad or bool(offset.any())):
            return a
        offset = offset.expand(a.shape[0], *a.shape[2:])
        return torch.cat([a[:, : self.d], (a[:, self.d] + offset).unsqueeze(1)], 1)

    def _relu(self, pre: Step, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        low_slope, up_slope, up_bias = relu_relaxation(pre)
        return lo * low_slope.unsqueeze(1), self._add_offset(hi * up_slope.unsqueeze(1), up_bias)

    def _maxpool(self, step: Step, pre: Step, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        where, dominant, u_max = maxpool_relaxation(pre, step.pool)
        n, c = where.shape[:2]
        out_shape = step.lo.shape[1:]
        index = where.unsqueeze(1).expand(n, self.d + 1, c, -1)
        new_lo = lo.reshape(n, self.d + 1, c, -1).gather(3, index)
        new_hi = hi.reshape(n, self.d + 1, c, -1).gather(3, index) * dominant.unsqueeze(1).to(hi.dtype)
        offset = torch.where(dominant, torch.zeros_like(u_max), u_max)
        new_lo = new_lo.view(n, self.d + 1, *out_shape)
        new_hi = self._add_offset(new_hi.view(n, self.d + 1, *out_shape), offset.view(n, *out_shape))
        return new_lo, new_hi
