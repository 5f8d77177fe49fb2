"""Zonotope intermediate bounds (DeepZ: Singh et al. 2018, "Fast and Effective Robustness Certification"), over a
`BoundGraph`: the intermediate bounds of the "crown-zono" method.

Every graph value v is held as an affine form of noise symbols e_i in [-1, 1]: v = c + sum_i g_i e_i, stored
as one tensor of shape (N, M, *value_shape): column D is the centre c, columns 0..D-1 the input symbols (the
input box is centre + radius * e), columns D+1.. the symbols that relaxations add on the way. Then:

- a linear step maps every column with its linear part and adds its bias to the centre: exact, with no
  |W| anywhere, so cancellations between paths survive (the forward linear bounds of bounds/forward.py carry
  a lower and an upper function whose gap |W| widens at every step, and through the many parallel paths of a
  DARTS supernet that gap grows like interval bounds do: docs/dsrna.md);
- ReLU on [l, u] with l < 0 < u: relu(z) = lam z + mu + mu e_new, lam = u / (u - l), mu = -lam l / 2
  (relu(z) - lam z lies in [0, -lam l]); one new symbol per unstable neuron;
- max-pool: the window's element j with the largest lower bound where it dominates the window (l_j >= every
  other u), else z_j + h + h e_new with h = (max u - l_j) / 2 (max - z_j lies in [0, max u - l_j]);
- a value that feeds a ReLU or a max-pool is concretized (c +- sum_i |g_i|) and its interval becomes the
  intersection with the interval that IBP propagated (both are sound), before its relaxation is chosen.

The cost is about D + 1 + (symbols added so far) forward passes of the network per image: like forward
linear bounds' 2 (D + 1) while few neurons are unstable, more as the ball grows. Past `max_columns` columns the
zonotope stops (`gave_up`): the values after that point keep their IBP intervals, which is sound and loose (a
radius search just finds the bound does not certify there).

Gradients: none (as in bounds/forward.py): the intervals, and so the relaxation slopes of the final CROWN pass,
carry no gradient; the final backward pass carries it through the linear steps (a supernet's alphas included).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from robustnas.robustness.bounds.crown import maxpool_relaxation
from robustnas.robustness.bounds.graph import BoundGraph, Step

# past this many columns (symbols + 1) an image the zonotope stops; a 28x28 input uses 785 at the start
MAX_COLUMNS = 32768


class ZonotopeBounds:
    """`TracedModel.propagate`'s forward hook: keeps the affine form of the values still needed."""

    def __init__(self, x_lo: Tensor, x_hi: Tensor, max_columns: Optional[int] = None):
        self.n = x_lo.shape[0]
        self.d = x_lo[0].numel()
        self.center = (x_lo + x_hi) / 2
        self.radius = (x_hi - x_lo) / 2
        self.forms: dict[int, Tensor] = {}
        self.columns = self.d + 1
        self.max_columns = MAX_COLUMNS if max_columns is None else max_columns
        self.gave_up = False

    # ------------------------------------------------------------------------------------ the hook
    def release(self, index: int) -> None:
        self.forms.pop(index, None)

    def step(self, graph: BoundGraph, index: int, feeds_nonlinear: bool) -> None:
        if self.gave_up:
            return
        with torch.no_grad():
            step = graph.steps[index]
            if step.kind == "input":
                n, d = self.n, self.d
                eye = torch.eye(d, dtype=step.lo.dtype, device=step.lo.device)
                gens = eye.unsqueeze(0) * self.radius.reshape(n, 1, d)  # column i: radius_i at entry i
                form = torch.cat([gens, self.center.reshape(n, 1, d)], 1)
                self.forms[index] = form.view(n, d + 1, *step.lo.shape[1:])
                return
            if step.kind == "linear":
                form = self._linear(step)
            elif step.kind == "relu":
                form = self._relu(graph.steps[step.inputs[0]], self.forms[step.inputs[0]])
            else:
                form = self._maxpool(step, graph.steps[step.inputs[0]], self.forms[step.inputs[0]])
            if form is None:
                return
            self.forms[index] = form
            if feeds_nonlinear:
                c_lo, c_hi = self.concretize(form)
                step.lo, step.hi = torch.maximum(step.lo, c_lo), torch.minimum(step.hi, c_hi)

    def concretize(self, form: Tensor) -> tuple[Tensor, Tensor]:
        """The interval of an affine form over the symbols' box, each (N, *shape)."""
        center = form[:, self.d]
        rad = form[:, : self.d].abs().sum(1) + form[:, self.d + 1:].abs().sum(1)
        return center - rad, center + rad

    # ------------------------------------------------------------------------------------ step rules
    def _width(self, form: Tensor, m: int) -> Tensor:
        """The form with m columns (symbols added after it was made have coefficient 0 in it)."""
        if form.shape[1] == m:
            return form
        return torch.cat([form, form.new_zeros(form.shape[0], m - form.shape[1], *form.shape[2:])], 1)

    def _linear(self, step: Step) -> Tensor:
        if step.batched is not None:  # one call over all columns; the bias goes to the centre
            f = self.forms[step.inputs[0]]
            out = step.batched(f.flatten(0, 1)).unflatten(0, f.shape[:2])
            bias = step.fn(f.new_zeros(f.shape[0], *f.shape[2:]))
            return self._add_bias(out, bias)
        m = max(self.forms[j].shape[1] for j in step.inputs)
        ins = [self._width(self.forms[j], m) for j in step.inputs]
        zeros = [f.new_zeros(f.shape[0], *f.shape[2:]) for f in ins]  # contiguous, as the op's input is
        bias = step.fn(*zeros)
        if step.scales is not None:  # elementwise: out = sum_j s_j * in_j + bias
            out = None
            for f, s in zip(ins, step.scales):
                s = s.unsqueeze(1) if isinstance(s, Tensor) and s.dim() == f.dim() - 1 else s
                out = s * f if out is None else out + s * f
        else:
            def linear_part(*t: Tensor) -> Tensor:
                return torch.func.jvp(step.fn, tuple(zeros), t)[1]

            out = torch.func.vmap(linear_part, in_dims=1, out_dims=1)(*ins)
        return self._add_bias(out, bias)

    def _add_bias(self, out: Tensor, bias: Tensor) -> Tensor:
        if bias.requires_grad or bool(bias.any()):
            out = out.clone()
            out[:, self.d] += bias.detach().expand(out.shape[0], *out.shape[2:])
        return out

    def _add_symbols(self, form: Tensor, where: Tensor, size: Tensor) -> Optional[Tensor]:
        """form plus one new symbol of coefficient `size` at each entry of the (N, *shape) mask `where`."""
        n = form.shape[0]
        flat = where.reshape(n, -1)
        k = int(flat.sum(1).max()) if flat.numel() else 0
        if k == 0:
            return form
        self.columns += k  # the widest image's count: every image of the batch gets k columns
        if self.columns > self.max_columns:
            self.gave_up = True
            self.forms.clear()
            return None
        idx = flat.to(form.dtype).topk(k, dim=1).indices  # (N, k) entries; rows with fewer get zero sizes
        sizes = torch.where(flat, size.reshape(n, -1), torch.zeros_like(size.reshape(n, -1))).gather(1, idx)
        new = form.new_zeros(n, k, flat.shape[1]).scatter_(2, idx.unsqueeze(2), sizes.unsqueeze(2))
        return torch.cat([form, new.view(n, k, *form.shape[2:])], 1)

    def _relu(self, pre: Step, form: Tensor) -> Optional[Tensor]:
        l, u = pre.lo, pre.hi
        unstable = (l < 0) & (u > 0)
        lam = torch.where(unstable, u / (u - l).clamp_min(1e-30), (l >= 0).to(l.dtype))
        mu = torch.where(unstable, -lam * l / 2, torch.zeros_like(l))
        out = form * lam.unsqueeze(1)
        out[:, self.d] += mu
        return self._add_symbols(out, mu > 0, mu)

    def _maxpool(self, step: Step, pre: Step, form: Tensor) -> Optional[Tensor]:
        where, dominant, u_max = maxpool_relaxation(pre, step.pool)  # (N, C, L) each
        n, c = where.shape[:2]
        m = form.shape[1]
        out_shape = step.lo.shape[1:]
        picked = form.reshape(n, m, c, -1).gather(3, where.unsqueeze(1).expand(n, m, c, -1))
        l_j = pre.lo.reshape(n, c, -1).gather(2, where)
        h = torch.where(dominant, torch.zeros_like(u_max), (u_max - l_j) / 2)
        picked[:, self.d] += h
        h = h.view(n, *out_shape)
        return self._add_symbols(picked.view(n, m, *out_shape), h > 0, h)
