"""Certified bounds on a model's logits over the Linf ball around x intersected with the pixel box.

Two bound methods, both written here (no auto_LiRPA):
- IBP (interval bound propagation, Gowal et al. 2018): cheap, differentiable, loose.
- CROWN (backward linear relaxation, Zhang et al. 2018) for the logits or a spec C @ logits, with
  intermediate ReLU bounds from IBP ("crown-ibp", Zhang et al. 2020), from CROWN itself ("crown": tighter,
  one backward pass per unstable neuron: fine on small nets), from forward linear bounds ("crown-fwd":
  bounds/forward.py, about 2 (D + 1) forward passes per image for an input of D entries, whatever the
  number of neurons), or from zonotopes ("crown-zono": bounds/zonotope.py, about D + 1 + (unstable neurons
  and undecided max-pool windows) forward passes per image; on a trained DARTS supernet as tight as "crown"
  within ~15% of the radius at a fraction of its cost, where the other two certify nothing).

The model is traced with torch.fx and interpreted node by node (robustnas/bounds/graph.py), so any model
made of the supported ops works, including a DARTS supernet whose MixedOp is
`sum(w * op(x) for w, op in zip(F.softmax(alpha, -1), ops))`: constants keep their autograd history, so
the bounds are differentiable in alpha (the DSRNA certified-bound regulariser). Max-pool in CROWN uses a
sound but coarse linear relaxation (see bounds/crown.py). By default CROWN bounds are intersected with the
IBP bounds (both are sound), so they are never looser than IBP.

Bounds are computed in eval mode (BatchNorm with running statistics, no dropout); the caller's mode is
restored afterwards.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Iterator, Literal, Optional, Union

import torch
from torch import Tensor, nn

from robustnas.robustness.bounds import BoundGraph, ForwardBounds, TracedModel, ZonotopeBounds, tighten
from robustnas.robustness.bounds.crown import backward_lower
from robustnas.core.errors import UserError

Method = Literal["ibp", "crown", "crown-ibp", "crown-fwd", "crown-zono"]
METHODS = ("ibp", "crown", "crown-ibp", "crown-fwd", "crown-zono")
# crown-fwd, crown-zono: images bounded together, so that images x (input entries + 1) stays under this (memory)
FORWARD_COLUMNS = 1024
_INTERMEDIATE = {"ibp": None, "crown-ibp": "ibp", "crown": "crown", "crown-fwd": "forward", "crown-zono": "zonotope"}
Eps = Union[float, Tensor]
Clip = Optional[tuple[float, float]]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _input_box(x: Tensor, eps: Eps, clip: Clip) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise UserError("certify: x must be a floating-point tensor of shape (N, ...) with a batch dimension")
    if isinstance(eps, Tensor):
        if eps.numel() not in (1, x.shape[0]):
            raise UserError(f"certify: eps must be a number or one value per sample ({x.shape[0]}), "
                            f"got {eps.numel()} values")
        if bool((eps < 0).any()) or not bool(torch.isfinite(eps).all()):
            raise UserError("certify: eps must be finite and >= 0")
        eps = eps.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    elif not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise UserError(f"certify: eps must be a finite number >= 0, got {eps!r}")
    lo, hi = x - eps, x + eps
    if clip is not None:
        c_lo, c_hi = clip
        if c_lo > c_hi:
            raise UserError(f"certify: clip {clip} is empty; pass (low, high) with low <= high")
        if bool((x < c_lo - 1e-6).any()) or bool((x > c_hi + 1e-6).any()):
            raise UserError(f"certify: inputs lie outside clip {tuple(clip)}; pass pixels in [0, 1] "
                            "(normalization belongs inside the model) or clip=None")
        lo, hi = lo.clamp(min=c_lo), hi.clamp(max=c_hi)
    return lo, hi


def _check_intermediate(intermediate: str) -> None:
    if intermediate not in ("ibp", "crown", "forward", "zonotope"):
        raise UserError(f"certify: intermediate must be 'ibp', 'crown', 'forward' or 'zonotope', "
                        f"got {intermediate!r}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"certify: unknown bound method {method!r}; known: {', '.join(METHODS)}")


def _check_window(window: Optional[int]) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UserError(f"certify: window must be a positive number of graph values or None, got {window!r}")


def _graph(traced: TracedModel, x: Tensor, eps: Eps, clip: Clip, intermediate: Optional[str],
           window: Optional[int] = None) -> BoundGraph:
    lo, hi = _input_box(x, eps, clip)
    refine = functools.partial(tighten, window=window) if intermediate == "crown" else None
    forward = {"forward": ForwardBounds, "zonotope": ZonotopeBounds}.get(intermediate)
    forward = forward(lo, hi) if forward is not None else None
    graph = traced.propagate(lo, hi, refine, keep_steps=intermediate is not None, forward=forward)
    out = graph.steps[graph.output]
    if out.lo.dim() != 2 and intermediate is not None:
        raise UserError(f"certify: the model output has shape {tuple(out.lo.shape)}; expected logits (N, K)")
    return graph


def _ibp_spec(lo: Tensor, hi: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds of C @ z for z in [lo, hi]; C (N, S, K)."""
    c_pos, c_neg = C.clamp(min=0), C.clamp(max=0)
    lower = torch.einsum("nsk,nk->ns", c_pos, lo) + torch.einsum("nsk,nk->ns", c_neg, hi)
    upper = torch.einsum("nsk,nk->ns", c_pos, hi) + torch.einsum("nsk,nk->ns", c_neg, lo)
    return lower, upper


def _crown_spec(graph: BoundGraph, C: Tensor, upper: bool, intersect_ibp: bool) -> tuple[Tensor, Optional[Tensor]]:
    s = C.shape[1]
    res = backward_lower(graph, graph.output, torch.cat([C, -C], 1) if upper else C)
    lower, up = res[:, :s], (-res[:, s:] if upper else None)
    if intersect_ibp:
        out = graph.steps[graph.output]
        ibp_lo, ibp_hi = _ibp_spec(out.lo, out.hi, C)
        lower = torch.maximum(lower, ibp_lo)
        up = torch.minimum(up, ibp_hi) if upper else None
    return lower, up


# ------------------------------------------------------------------------------------------- public API
def ibp_bounds(model: nn.Module, x: Tensor, eps: Eps, clip: Clip = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """Interval bounds (lower, upper) of the logits, each (N, K), over ||x' - x||_inf <= eps within clip.

    eps is a number or one value per sample. Differentiable in the model's parameters and constants.
    """
    with _eval_mode(model):
        graph = _graph(TracedModel(model), x, eps, clip, None)
    out = graph.steps[graph.output]
    return out.lo, out.hi


def crown_bounds(
    model: nn.Module,
    x: Tensor,
    eps: Eps,
    clip: Clip = (0.0, 1.0),
    C: Optional[Tensor] = None,
    intermediate: Literal["ibp", "crown", "forward", "zonotope"] = "ibp",
    intersect_ibp: bool = True,
) -> tuple[Tensor, Tensor]:
    """CROWN bounds (lower, upper) of the logits (N, K), or of C @ logits (N, S) for a spec C of shape
    (N, S, K) or (S, K).

    intermediate="ibp" takes ReLU pre-activation bounds from IBP (CROWN-IBP); "crown" computes them with
    CROWN too (tighter, costlier); "forward" with forward linear bounds (bounds/forward.py; all images in
    one pass); "zonotope" with zonotopes (bounds/zonotope.py). intersect_ibp=False returns the raw
    linear-relaxation bounds.
    """
    _check_intermediate(intermediate)
    with _eval_mode(model):
        graph = _graph(TracedModel(model), x, eps, clip, intermediate)
        k = graph.steps[graph.output].lo.shape[1]
        n = x.shape[0]
        if C is None:
            spec = torch.eye(k, dtype=x.dtype, device=x.device).expand(n, k, k)
        else:
            if not isinstance(C, Tensor) or C.dim() not in (2, 3) or C.shape[-1] != k \
                    or (C.dim() == 3 and C.shape[0] != n):
                raise UserError(f"certify: C must have shape (N, S, K) or (S, K) with N={n}, K={k}, "
                                f"got {tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__}")
            spec = (C if C.dim() == 3 else C.expand(n, *C.shape)).to(x.dtype)
        lower, upper = _crown_spec(graph, spec, True, intersect_ibp)
    return lower, upper


def _margin_spec(y: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """Rows e_y - e_j for the K-1 classes j != y: (N, K-1, K)."""
    n = y.shape[0]
    classes = torch.arange(k, device=y.device).expand(n, k)
    others = classes[classes != y[:, None]].view(n, k - 1)
    eye = torch.eye(k, dtype=dtype, device=y.device)
    return eye[y][:, None, :] - eye[others]


def _check_labels(x: Tensor, y: Tensor) -> None:
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise UserError(f"certify: y must be integer labels of shape ({x.shape[0]},)")


def _margin(traced: TracedModel, x: Tensor, y: Tensor, eps: Eps, method: str, clip: Clip,
            window: Optional[int] = None) -> Tensor:
    if method in ("crown-fwd", "crown-zono"):  # coefficients are (images, input entries + 1, ...): chunk the images
        per = max(1, FORWARD_COLUMNS // (x[0].numel() + 1))
        if x.shape[0] > per:
            per_sample = isinstance(eps, Tensor) and eps.numel() > 1
            return torch.cat([_margin_of(traced, x[i:i + per], y[i:i + per], eps[i:i + per] if per_sample else eps,
                                         method, clip, window) for i in range(0, x.shape[0], per)])
    return _margin_of(traced, x, y, eps, method, clip, window)


def _margin_of(traced: TracedModel, x: Tensor, y: Tensor, eps: Eps, method: str, clip: Clip,
               window: Optional[int] = None) -> Tensor:
    graph = _graph(traced, x, eps, clip, _INTERMEDIATE[method], window)
    out = graph.steps[graph.output]
    if out.lo.dim() != 2 or out.lo.shape[1] < 2:
        raise UserError(f"certify: the model output has shape {tuple(out.lo.shape)}; expected logits (N, K>=2)")
    k = out.lo.shape[1]
    if bool((y < 0).any()) or bool((y >= k).any()):
        raise UserError(f"certify: labels must lie in [0, {k - 1}]")
    C = _margin_spec(y, k, out.lo.dtype)
    if method == "ibp":
        lower, _ = _ibp_spec(out.lo, out.hi, C)
    else:
        lower, _ = _crown_spec(graph, C, False, True)
    return lower.min(1).values


def margin_lower_bound(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, method: Method = "ibp",
                       clip: Clip = (0.0, 1.0), window: Optional[int] = None) -> Tensor:
    """(N,) lower bound of f_y(x') - max_{j != y} f_j(x') over the ball; > 0 certifies the sample.

    CROWN methods bound the differences e_y - e_j directly (the spec C), tighter than subtracting logit
    bounds. Differentiable (e.g. in a supernet's alphas; "crown-fwd" through its final backward pass, its
    forward intermediate bounds carry no gradient: bounds/forward.py). `window` (method "crown" only): each
    intermediate bound walks back at most that many graph values and takes the intervals there
    (cost linear instead of quadratic in depth; looser); None walks back to the input.
    """
    _check_method(method)
    _check_labels(x, y)
    _check_window(window)
    with _eval_mode(model):
        return _margin(TracedModel(model), x, y, eps, method, clip, window)


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"certify: batch_size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def certified_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, method: Method = "ibp",
                       batch_size: int = 256, clip: Clip = (0.0, 1.0), window: Optional[int] = None) -> float:
    """Fraction of samples that are classified correctly and whose margin lower bound at eps is > 0.

    Only the correctly classified samples are bounded."""
    _check_method(method)
    _check_labels(x, y)
    _check_batch(batch_size)
    _check_window(window)
    certified = 0
    with _eval_mode(model):
        traced = TracedModel(model)
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            eb = eps[i:i + batch_size] if isinstance(eps, Tensor) and eps.numel() > 1 else eps
            correct = model(xb).argmax(1) == yb
            if bool(correct.any()):
                eb = eb[correct] if isinstance(eb, Tensor) and eb.numel() > 1 else eb
                certified += int((_margin(traced, xb[correct], yb[correct], eb, method, clip, window) > 0).sum())
    return certified / max(len(x), 1)


def _bracket(model: nn.Module, traced: TracedModel, x: Tensor, y: Tensor, method: str, max_eps: float, tol: float,
             rtol: Optional[float], min_eps: float, clip: Clip, window: Optional[int]) -> tuple[Tensor, Tensor]:
    """(lo, hi) per sample, both (N,): lo is certified (0: misclassified, or not certified at the floor), hi is not
    (hi = lo = max_eps where max_eps is certified). Bisection on [0, max_eps] at the midpoint until hi - lo <= tol
    (rtol None), or on [min_eps, max_eps] at the geometric mean until hi <= lo (1 + rtol). max_eps is bounded only
    where the bisection never lowered hi, min_eps only where the first probe failed (radius 0 then costs two
    bounds, as before; any other radius two fewer); the bisection, like the radius, takes the bound as monotone
    in eps."""
    n = x.shape[0]

    def certified(e: Tensor, which: Tensor) -> Tensor:
        """Whether the bound at e (one value per sample) certifies each sample of the mask `which`."""
        ok = torch.zeros(n, dtype=torch.bool, device=x.device)
        if bool(which.any()):
            ok[which] = _margin(traced, x[which], y[which], e[which], method, clip, window) > 0
        return ok

    def wide(lo: Tensor, hi: Tensor) -> Tensor:
        return (hi - lo) > tol if rtol is None else hi > lo * (1 + rtol)

    correct = model(x).argmax(1) == y
    top = torch.full((n,), float(max_eps), dtype=x.dtype, device=x.device)
    floor = torch.zeros_like(top) if rtol is None else torch.full_like(top, float(min_eps))
    lo, hi = floor.clone(), top.clone()
    # the floor holds where a probe above it was certified; eps 0 (rtol None) always does; min_eps is bounded
    # only for a sample whose first probe failed, and where it fails too the radius is 0 (no more probes)
    floor_ok = correct.clone() if rtol is None else torch.zeros_like(correct)
    live = correct.clone()
    while True:
        open_ = live & wide(lo, hi)
        if not bool(open_.any()):
            break
        mid = (lo + hi) / 2 if rtol is None else (lo * hi).sqrt()
        ok = certified(mid, open_)
        lo, hi = torch.where(ok, mid, lo), torch.where(open_ & ~ok, mid, hi)
        first_miss = open_ & ~ok & ~floor_ok
        floor_ok |= ok | certified(floor, first_miss)
        live &= floor_ok | ~first_miss
    at_max = certified(top, live & (hi == top))
    lo, hi = torch.where(at_max, top, lo), torch.where(at_max, top, hi)
    unprobed = live & ~floor_ok & ~at_max  # a bracket narrower than rtol from the start
    floor_ok |= at_max | certified(floor, unprobed)
    return torch.where(live & floor_ok, lo, torch.zeros_like(lo)), hi


def _check_radius_args(max_eps: float, tol: float, rtol: Optional[float], min_eps: float) -> None:
    if not (isinstance(max_eps, (int, float)) and max_eps > 0 and isinstance(tol, (int, float)) and tol > 0):
        raise UserError("certify: max_eps and tol must be positive numbers")
    if rtol is not None and not (isinstance(rtol, (int, float)) and rtol > 0
                                 and isinstance(min_eps, (int, float)) and 0 < min_eps < max_eps):
        raise UserError("certify: rtol must be a positive number and min_eps lie in (0, max_eps)")


@torch.no_grad()
def radius_bracket(model: nn.Module, x: Tensor, y: Tensor, method: Method = "ibp", max_eps: float = 1.0,
                   rtol: float = 0.1, min_eps: Optional[float] = None, clip: Clip = (0.0, 1.0),
                   window: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(lo, hi), each (N,): the certified radius to a relative tolerance, by bisection in log eps on [min_eps,
    max_eps] (default min_eps = max_eps * 1e-6): lo is certified, hi is not and hi <= lo (1 + rtol); lo = 0
    where the sample is misclassified or min_eps is not certified, lo = hi = max_eps where max_eps is.
    For radii that span decades (a deep supernet's: 1e-5 to 1e-1), in ~log2(ln(max/min) / rtol) bounds."""
    _check_method(method)
    _check_labels(x, y)
    _check_window(window)
    min_eps = max_eps * 1e-6 if min_eps is None else min_eps
    _check_radius_args(max_eps, 1.0, rtol, min_eps)
    with _eval_mode(model):
        return _bracket(model, TracedModel(model), x, y, method, max_eps, 1.0, rtol, min_eps, clip, window)


@torch.no_grad()
def certified_radius(model: nn.Module, x: Tensor, y: Tensor, method: Method = "ibp", max_eps: float = 1.0,
                     tol: float = 1e-3, batch_size: int = 256, clip: Clip = (0.0, 1.0),
                     window: Optional[int] = None) -> Tensor:
    """(N,) largest eps in [0, max_eps] the bound certifies, by bisection to within tol; 0 if misclassified.

    Invariant of the bisection: the returned radius is certified and radius + tol is not (unless the
    radius is max_eps). Meaningful for bounds that are monotone in eps (IBP is; CROWN is in practice).
    Each bisection step bounds only the correctly classified samples whose interval is still open.
    """
    _check_method(method)
    _check_labels(x, y)
    _check_batch(batch_size)
    _check_window(window)
    _check_radius_args(max_eps, tol, None, 0.0)
    radii = []
    with _eval_mode(model):
        traced = TracedModel(model)
        for i in range(0, len(x), batch_size):
            lo, _ = _bracket(model, traced, x[i:i + batch_size], y[i:i + batch_size], method, max_eps, tol, None,
                             0.0, clip, window)
            radii.append(lo)
    return torch.cat(radii) if radii else x.new_zeros(0)
