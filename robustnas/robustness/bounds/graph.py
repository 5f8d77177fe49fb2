"""Trace a model with torch.fx and push an input box through its graph node by node (interval propagation).

Every graph value is either a constant or input-dependent. Constants (parameters, softmax(alpha), shapes,
zeros_like(x)) are computed with plain torch ops and never detached, so bounds stay differentiable in them
(a DARTS supernet's bound must be differentiable in alpha). An input-dependent value is a `Step`: its
interval [lo, hi] plus what CROWN needs to walk backwards through it: a linear (affine) map of its
input-dependent arguments, a ReLU or a 2d max-pool. Anything else is refused with the op's name.

The tracer keeps parameters concrete while tracing, so parameter-only code runs eagerly: `zip(softmax(alpha),
ops)` iterates a real tensor, which plain `fx.symbolic_trace` cannot do. The price: constants derived from
parameters are frozen into the trace, so a model is traced again for every bound computation (cheap).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from robustnas.core.errors import UserError

SUPPORTED = (
    "Conv1d/2d/3d, Linear, BatchNorm (eval, running stats), ReLU, MaxPool2d, avg/adaptive-avg pooling, "
    "+ and -, * and / by constants, cat/stack, slicing, view/reshape/flatten/permute/transpose, mean/sum, pad, "
    "Identity, Dropout (eval)"
)


def _constant(index: int) -> Any:  # marks a traced constant; the interpreter looks it up, never calls this
    raise RuntimeError("placeholder for a traced constant")


class ForwardHook(Protocol):
    """What `TracedModel.propagate` calls for forward bound propagation (bounds/forward.py)."""

    def step(self, graph: "BoundGraph", index: int, feeds_nonlinear: bool) -> None: ...

    def release(self, index: int) -> None: ...


class _Tracer(fx.Tracer):
    """fx tracer that hands real parameters to the forward code and records derived tensors as constants."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.constants: list[Any] = []
        self._names = {id(t): n for n, t in root.named_parameters()}
        self._names.update({id(t): n for n, t in root.named_buffers()})

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        return attr_val

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Tensor):
            name = self._names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
            self.constants.append(a)  # kept with its autograd history (softmax(alpha) stays differentiable)
            return self.create_node("call_function", _constant, (len(self.constants) - 1,), {})
        return super().create_arg(a)


# ------------------------------------------------------------------------------------------- values
@dataclass(frozen=True)
class Ref:
    """A graph value that depends on the input: the index of its Step."""

    index: int


@dataclass
class Step:
    kind: str  # "input" | "linear" | "relu" | "maxpool"
    inputs: tuple[int, ...]
    lo: Tensor
    hi: Tensor
    fn: Optional[Callable[..., Tensor]] = None  # linear: the op as a function of its input-dependent args
    scales: Optional[list] = None  # linear and elementwise: out = sum_j scales[j] * in_j + fn(0), no vjp needed
    pool: Optional[dict] = None  # maxpool: kernel_size, stride, padding, dilation, ceil_mode
    # linear with one input: its transpose on rows (M, *out_shape) -> (M, *in_shape), faster than a vjp
    transpose: Optional[Callable[[Tensor], Tensor]] = None
    # linear: the map of radii, |linear part| (None: the linear part has no negative coefficient)
    abs_fn: Optional[Callable[..., Tensor]] = None
    # linear with one input: its linear part (no bias) on a batch of any size (conv, linear, avg pooling); lets
    # forward and zonotope bounds map all their columns in one call instead of a vmapped jvp
    batched: Optional[Callable[[Tensor], Tensor]] = None
    name: str = ""


@dataclass
class BoundGraph:
    steps: list[Step] = field(default_factory=list)
    output: int = -1
    _vjps: dict = field(default_factory=dict)

    def add(self, step: Step) -> Ref:
        self.steps.append(step)
        return Ref(len(self.steps) - 1)

    def vjp(self, index: int) -> tuple[Optional[Tensor], Optional[Callable]]:
        """(fn(0), vjp of fn) for a linear step; the map is affine, so the vjp is the same at every point.

        fn(0) is None where it is zero and carries no gradient; the vjp is None for elementwise steps and
        steps with a `transpose`.
        """
        if index not in self._vjps:
            step = self.steps[index]
            zeros = [torch.zeros_like(self.steps[j].lo) for j in step.inputs]
            if step.scales is not None or step.transpose is not None:
                bias, vjp_fn = step.fn(*zeros), None
            else:
                bias, vjp_fn = torch.func.vjp(step.fn, *zeros)
            if not bias.requires_grad and not bool(bias.any()):
                bias = None
            self._vjps[index] = (bias, vjp_fn)
        return self._vjps[index]


def _refs(obj: Any) -> list[Ref]:
    found: list[Ref] = []

    def walk(o: Any) -> None:
        if isinstance(o, Ref):
            found.append(o)
        elif isinstance(o, (list, tuple)):
            for e in o:
                walk(e)
        elif isinstance(o, dict):
            for e in o.values():
                walk(e)
        elif isinstance(o, slice):
            walk((o.start, o.stop, o.step))

    walk(obj)
    return found


def _substitute(obj: Any, values: Any) -> Any:
    """obj with its Refs replaced, in `_refs` order, by the items of the iterator `values`."""
    if isinstance(obj, Ref):
        return next(values)
    if isinstance(obj, tuple):
        return tuple(_substitute(e, values) for e in obj)
    if isinstance(obj, list):
        return [_substitute(e, values) for e in obj]
    if isinstance(obj, dict):
        return {k: _substitute(e, values) for k, e in obj.items()}
    if isinstance(obj, slice):
        return slice(*_substitute((obj.start, obj.stop, obj.step), values))
    return obj


def _bind(args: tuple, kwargs: dict, names: list[str], defaults: dict) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


# ------------------------------------------------------------------------------------------- op tables
_RELU_FUNCS = {F.relu, torch.relu}
_SHAPE_FUNCS = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.numel}
_SHAPE_METHODS = {"size", "dim", "numel", "new_zeros", "new_ones", "new_full", "new_empty"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
# linear maps with non-negative coefficients: the interval is [f(lo), f(hi)]
_MONO_FUNCS = {
    operator.add, torch.add, torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.squeeze, torch.unsqueeze, torch.mean, torch.sum, torch.clone, operator.getitem,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.pad, F.dropout,
}
_MONO_METHODS = {
    "add", "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "mean",
    "sum", "expand", "clone", "repeat", "float", "double", "to",
}
_MONO_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d)
_ADD = ({operator.add, torch.add}, {"add"})
_SUB = ({operator.sub, torch.sub}, {"sub"})
_NEG = ({operator.neg, torch.neg}, {"neg"})
_MUL = ({operator.mul, torch.mul}, {"mul"})
_DIV = ({operator.truediv, torch.div, torch.true_divide}, {"div", "true_divide"})
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_ARGS = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
_BN_ARGS = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
_MAXPOOL_ARGS = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]


def _describe(node: fx.Node, module: Optional[nn.Module]) -> str:
    if module is not None:
        return f"module nn.{type(module).__name__}" if type(module).__module__.startswith("torch.nn") \
            else f"module {type(module).__name__}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    name = getattr(node.target, "__name__", repr(node.target))
    return f"function {name}"


def _unsupported(node: fx.Node, module: Optional[nn.Module], why: str = "") -> UserError:
    what = _describe(node, module)
    detail = f" ({why})" if why else ""
    return UserError(
        f"certify: no bound rule for {what} at graph node '{node.name}'{detail}; supported: {SUPPORTED}"
    )


def _is_call(node: fx.Node, funcs: set, methods: set = frozenset()) -> bool:
    if node.op == "call_function":
        return node.target in funcs
    return node.op == "call_method" and node.target in methods


def _bn_scale(running_var: Optional[Tensor], weight: Optional[Tensor], eps: float) -> Tensor:
    scale = 1.0 / torch.sqrt(running_var + eps)
    return scale if weight is None else weight * scale


def _channel_view(t: Tensor, dims: int) -> Tensor:
    return t.view(1, -1, *([1] * (dims - 2)))


# ------------------------------------------------------------------------------------------- interpreter
class TracedModel:
    """A model's fx graph; `propagate` interprets it on an input box."""

    def __init__(self, model: nn.Module):
        self.model = model
        tracer = _Tracer(model)
        try:
            self.graph = tracer.trace(model)
        except UserError:
            raise
        except Exception as e:  # fx raises many kinds; the user needs the first line only
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"certify: cannot trace {type(model).__name__} with torch.fx ({msg}); bound propagation needs a "
                "forward pass without Python control flow on input-dependent values"
            ) from None
        self.constants = tracer.constants
        # for interval-only runs: after which node each node's value is no longer needed
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        self.dead_after: dict[int, list[fx.Node]] = {}
        for node in self.graph.nodes:
            if node.users:
                self.dead_after.setdefault(max(order[u] for u in node.users), []).append(node)
        # nodes whose bounds feed a ReLU or max-pool, where tighter (CROWN) intermediate bounds pay off;
        # value: True when only ReLUs use it (then only neurons that are unstable under IBP need CROWN)
        self.feeds_nonlinear: dict[fx.Node, bool] = {}
        for node in self.graph.nodes:
            kind = self._nonlinear_kind(node)
            if kind and node.args and isinstance(node.args[0], fx.Node):
                src = node.args[0]
                self.feeds_nonlinear[src] = self.feeds_nonlinear.get(src, True) and kind == "relu"

    def _module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.model.get_submodule(node.target) if node.op == "call_module" else None

    def _nonlinear_kind(self, node: fx.Node) -> Optional[str]:
        module = self._module(node)
        if isinstance(module, nn.ReLU) or _is_call(node, _RELU_FUNCS, {"relu"}):
            return "relu"
        if isinstance(module, nn.MaxPool2d) or _is_call(node, {F.max_pool2d}):
            return "maxpool"
        return None

    def propagate(self, x_lo: Tensor, x_hi: Tensor,
                  tighten: Optional[Callable[[BoundGraph, int, bool], None]] = None,
                  keep_steps: bool = True, forward: Optional["ForwardHook"] = None) -> BoundGraph:
        """Intervals of every input-dependent value for inputs in the box [x_lo, x_hi].

        `tighten(graph, index, only_unstable)` may shrink the interval of a value that feeds a ReLU or a
        max-pool before it is used (CROWN intermediate bounds). keep_steps=False drops intervals once they
        are used (enough for IBP, which needs only the output's). `forward` sees every step as it is added
        (`forward.step(graph, index, feeds_nonlinear)`) and every value once no node needs it any more
        (`forward.release(index)`): forward linear bounds (bounds/forward.py).
        """
        g = BoundGraph()
        env: dict[fx.Node, Any] = {}
        have_input = False
        for position, node in enumerate(self.graph.nodes):
            if (not keep_steps or forward is not None) and position - 1 in self.dead_after:
                for dead in self.dead_after[position - 1]:
                    value = env.pop(dead, None)
                    if isinstance(value, Ref):
                        if forward is not None:
                            forward.release(value.index)
                        if not keep_steps and value.index != g.output:
                            g.steps[value.index].lo = g.steps[value.index].hi = None
            if node.op == "placeholder":
                if not have_input:
                    env[node] = g.add(Step("input", (), x_lo, x_hi, name=node.name))
                    have_input = True
                    if forward is not None:
                        forward.step(g, env[node].index, False)
                elif node.args:  # extra forward argument with a default value
                    env[node] = node.args[0]
                else:
                    raise UserError(f"certify: the model's forward takes more than one input ('{node.name}'); "
                                    "bound propagation handles models of one input tensor")
                continue
            if node.op == "get_attr":
                env[node] = functools.reduce(getattr, node.target.split("."), self.model)
                continue
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = dict(fx.node.map_arg(node.kwargs, lambda n: env[n]))
            if node.op == "output":
                refs = _refs(args)
                if not refs:
                    raise UserError("certify: the model's output does not depend on its input")
                g.output = refs[0].index  # (logits, aux) -> logits
                continue
            if node.op == "call_function" and node.target is _constant:
                env[node] = self.constants[args[0]]
                continue
            module = self._module(node)
            if node.op == "call_module":
                op = module
            elif node.op == "call_method":
                op = functools.partial(_call_method, node.target)
            else:
                op = node.target
            if not _refs((args, kwargs)):
                env[node] = op(*args, **kwargs)
                continue
            value = self._bound(node, module, op, tuple(args), kwargs, g)
            env[node] = value
            if forward is not None and isinstance(value, Ref):
                forward.step(g, value.index, node in self.feeds_nonlinear)
            if tighten is not None and isinstance(value, Ref) and node in self.feeds_nonlinear:
                tighten(g, value.index, self.feeds_nonlinear[node])
        if g.output < 0:
            raise UserError("certify: the traced model has no output")
        return g

    # one node with at least one input-dependent argument
    def _bound(self, node: fx.Node, module: Optional[nn.Module], op: Callable, args: tuple, kwargs: dict,
               g: BoundGraph) -> Any:
        refs = _refs((args, kwargs))
        st = g.steps

        def lows() -> Any:
            return iter([st[r.index].lo for r in refs])

        # shape queries and shape-only constructors: the result does not depend on the input's values
        if _is_call(node, _SHAPE_FUNCS, _SHAPE_METHODS) or (
            node.op == "call_function" and node.target is getattr and args[1] in _SHAPE_ATTRS
        ):
            a, k = _substitute((args, kwargs), lows())
            return op(*a, **k)
        if node.op == "call_function" and node.target is getattr:
            if args[1] == "data":
                return self._linear(node, g, refs, lambda z, _name: z, args, kwargs, None, [1])
            raise _unsupported(node, None, f"attribute '{args[1]}'")
        if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
            raise _unsupported(node, None, "in-place operation")

        # ReLU and max-pool
        kind = self._nonlinear_kind(node)
        if kind is not None:
            if not isinstance(args[0], Ref) or len(refs) != 1:
                raise _unsupported(node, module, "the input must be the only input-dependent argument")
            pre = st[args[0].index]
            if kind == "relu":
                return g.add(Step("relu", (args[0].index,), pre.lo.clamp(min=0), pre.hi.clamp(min=0),
                                  name=node.name))
            pool = self._pool_args(node, module, args, kwargs)
            if pre.lo.dim() != 4:
                raise _unsupported(node, module, "max-pool bounds need NCHW input")
            return g.add(Step("maxpool", (args[0].index,), F.max_pool2d(pre.lo, **pool), F.max_pool2d(pre.hi, **pool),
                              pool=pool, name=node.name))

        # linear maps with non-negative coefficients
        if isinstance(module, _MONO_MODULES) or _is_call(node, _MONO_FUNCS, _MONO_METHODS):
            if "alpha" in kwargs and (node.target in (torch.add,) or node.target == "add"):
                raise _unsupported(node, module, "add with alpha=")
            if node.target is F.dropout and kwargs.get("training", args[2] if len(args) > 2 else True):
                raise _unsupported(node, module, "dropout in training mode")
            if node.target is operator.getitem and (not isinstance(args[0], Ref) or _refs(args[1:])):
                raise _unsupported(node, module, "indexing with an input-dependent index")
            elementwise = isinstance(module, _IDENTITY_MODULES) or _is_call(
                node, _ADD[0] | {torch.clone}, _ADD[1] | {"clone", "contiguous"})
            pool = isinstance(module, _POOL_MODULES) and len(args) == 1 and not kwargs  # no bias, any batch
            return self._linear(node, g, refs, op, args, kwargs, None, [1] * len(refs) if elementwise else None,
                                batched=module if pool else None)

        # signed linear maps: interval from centre and radius, the radius through |map|
        if _is_call(node, *_SUB):
            if "alpha" in kwargs:
                raise _unsupported(node, module, "sub with alpha=")
            other = args[1] if len(args) > 1 else kwargs.get("other")
            signs = [1] * isinstance(args[0], Ref) + [-1] * isinstance(other, Ref)
            return self._linear(node, g, refs, op, args, kwargs, lambda *rs: sum(rs), signs)
        if _is_call(node, *_NEG):
            return self._linear(node, g, refs, op, args, kwargs, lambda r: r, [-1])
        if _is_call(node, *_MUL):
            others = [a for a in list(args) + list(kwargs.values()) if not isinstance(a, Ref)]
            if len(refs) != 1 or len(others) != 1:
                raise _unsupported(node, module, "a product of two input-dependent tensors")
            c = others[0]
            return self._linear(node, g, refs, op, args, kwargs, lambda r: r * _abs(c), [c])
        if _is_call(node, *_DIV):
            if len(refs) != 1 or not isinstance(args[0], Ref) or kwargs.get("rounding_mode") is not None:
                raise _unsupported(node, module, "only input-dependent / constant is linear")
            c = args[1] if len(args) > 1 else kwargs["other"]
            return self._linear(node, g, refs, op, args, kwargs, lambda r: r / _abs(c),
                                [1.0 / c if not isinstance(c, Tensor) else c.reciprocal()])
        if isinstance(module, _CONV_MODULES) and type(module) in _CONV_MODULES:
            self._only_input(node, module, args, kwargs)
            return self._linear(node, g, refs, op, args, kwargs,
                                lambda r: module._conv_forward(r, module.weight.abs(), None),
                                transpose=_conv_transpose(module, g.steps[refs[0].index].lo.shape),
                                batched=lambda r: module._conv_forward(r, module.weight, None))
        if type(module) is nn.Linear:
            self._only_input(node, module, args, kwargs)
            return self._linear(node, g, refs, op, args, kwargs, lambda r: F.linear(r, module.weight.abs()),
                                batched=lambda r: F.linear(r, module.weight))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            self._only_input(node, module, args, kwargs)
            if module.running_var is None:
                raise _unsupported(node, module, "BatchNorm without running statistics normalizes by batch "
                                                 "statistics even in eval mode")
            scale = _bn_scale(module.running_var, module.weight, module.eps)
            dims = g.steps[refs[0].index].lo.dim()
            return self._linear(node, g, refs, op, args, kwargs, lambda r: r * _channel_view(scale.abs(), r.dim()),
                                [_channel_view(scale, dims)])
        if _is_call(node, _CONV_FUNCS):
            b = _bind(args, kwargs, _CONV_ARGS, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
            if not isinstance(b["input"], Ref) or len(refs) != 1:
                raise _unsupported(node, None, "input-dependent weights")
            w, target = b["weight"], node.target
            return self._linear(node, g, refs, op, args, kwargs, lambda r: target(
                r, w.abs(), None, b["stride"], b["padding"], b["dilation"], b["groups"]))
        if _is_call(node, {F.linear}):
            b = _bind(args, kwargs, ["input", "weight", "bias"], {"bias": None})
            if not isinstance(b["input"], Ref) or len(refs) != 1:
                raise _unsupported(node, None, "input-dependent weights")
            w = b["weight"]
            return self._linear(node, g, refs, op, args, kwargs, lambda r: F.linear(r, w.abs()))
        if _is_call(node, {F.batch_norm}):
            b = _bind(args, kwargs, _BN_ARGS, {"weight": None, "bias": None, "training": False, "eps": 1e-5})
            if not isinstance(b["input"], Ref) or len(refs) != 1:
                raise _unsupported(node, None, "input-dependent statistics")
            if b["training"] or b["running_var"] is None:
                raise _unsupported(node, None, "batch statistics")
            scale = _bn_scale(b["running_var"], b["weight"], b["eps"])
            dims = g.steps[refs[0].index].lo.dim()
            return self._linear(node, g, refs, op, args, kwargs, lambda r: r * _channel_view(scale.abs(), r.dim()),
                                [_channel_view(scale, dims)])
        raise _unsupported(node, module)

    @staticmethod
    def _only_input(node: fx.Node, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(args) != 1 or kwargs or not isinstance(args[0], Ref):
            raise _unsupported(node, module, "expected one input-dependent argument")

    @staticmethod
    def _pool_args(node: fx.Node, module: Optional[nn.Module], args: tuple, kwargs: dict) -> dict:
        if module is not None:
            b = {k: getattr(module, k) for k in _MAXPOOL_ARGS[1:]}
        else:
            b = _bind(args, kwargs, _MAXPOOL_ARGS,
                      {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
        if b["return_indices"]:
            raise _unsupported(node, module, "return_indices=True")
        if b["stride"] is None or b["stride"] == []:
            b["stride"] = b["kernel_size"]
        return {k: b[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}

    @staticmethod
    def _linear(node: fx.Node, g: BoundGraph, refs: list[Ref], op: Callable, args: tuple, kwargs: dict,
                abs_fn: Optional[Callable[..., Tensor]], scales: Optional[list] = None,
                transpose: Optional[Callable[[Tensor], Tensor]] = None,
                batched: Optional[Callable[[Tensor], Tensor]] = None) -> Ref:
        """A step for an affine map of the Refs; `abs_fn` maps radii (None: coefficients are non-negative).

        `scales`: for elementwise maps, the factor of each Ref (CROWN then multiplies instead of a vjp).
        `batched`: the linear part on a batch of any size (Step.batched).
        """

        def fn(*zs: Tensor) -> Tensor:
            a, k = _substitute((args, kwargs), iter(zs))
            return op(*a, **k)

        ins = [g.steps[r.index] for r in refs]
        signs = [1] * len(ins) if abs_fn is None else [_sign(c) for c in scales] if scales is not None else [None]
        if None not in signs:  # each input enters with one sign: pick its lower or upper end (exact, cheap)
            lo = fn(*[s.lo if sign > 0 else s.hi for s, sign in zip(ins, signs)])
            hi = fn(*[s.hi if sign > 0 else s.lo for s, sign in zip(ins, signs)])
        else:
            mid = fn(*[(s.lo + s.hi) / 2 for s in ins])
            rad = abs_fn(*[(s.hi - s.lo) / 2 for s in ins])
            lo, hi = mid - rad, mid + rad
        if not isinstance(lo, Tensor):
            raise _unsupported(node, None, "its result is not a tensor")
        if scales is not None and not all(s.lo.shape == lo.shape for s in ins):
            scales = None  # broadcasting: leave it to the vjp
        return g.add(Step("linear", tuple(r.index for r in refs), lo, hi, fn=fn, scales=scales, transpose=transpose,
                          abs_fn=abs_fn, batched=batched, name=node.name))


def _conv_transpose(conv: nn.Module, in_shape: torch.Size) -> Optional[Callable[[Tensor], Tensor]]:
    """The transpose of a 2d convolution without its bias, as a transposed convolution (None: not 2d, or
    padded other than with zeros)."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    out = [(in_shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
    extra = tuple(in_shape[2 + i] - ((out[i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1) for i in range(2))

    def transpose(a: Tensor) -> Tensor:
        return F.conv_transpose2d(a, conv.weight, None, s, p, extra, conv.groups, d)

    return transpose


def _sign(c: Any) -> Optional[int]:
    """+1 if c >= 0 everywhere, -1 if c <= 0 everywhere, else None."""
    if not isinstance(c, Tensor):
        return 1 if c >= 0 else -1
    if bool((c >= 0).all()):
        return 1
    return -1 if bool((c <= 0).all()) else None


def _call_method(name: str, self_: Any, *args: Any, **kwargs: Any) -> Any:
    return getattr(self_, name)(*args, **kwargs)


def _abs(c: Any) -> Any:
    return c.abs() if isinstance(c, Tensor) else abs(c)
