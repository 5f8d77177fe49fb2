"""The DARTS cell space: genotypes, the weight-sharing supernet used by search, and final networks.

A cell has two inputs (the outputs of the two previous cells), `steps` intermediate nodes and
2 + 3 + ... + (steps + 1) edges (14 for 4 nodes); the cell output concatenates the last `multiplier`
nodes. In the supernet every edge is a MixedOp, the softmax(alpha)-weighted sum of all candidate ops;
in a final network every node sums two chosen (op, input) pairs of the genotype.

Layout as in DARTS (CIFAR): L cells, reductions at L//3 and 2L//3, the width doubling at each. The
stem is shaped for small inputs (Normalize, 3x3 stride-1 conv), so 8x8, 28x28 and 32x32 all work;
every reduction needs an even spatial size (FactorizedReduce), which the constructors check.

Everything is torch.fx-traceable (no data-dependent control flow): the bound-propagation code traces
both the supernet and final networks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustnas.core.errors import UserError
from robustnas.nets.models.base import Normalize, fast_layout
from robustnas.nets.ops import OPS, FactorizedReduce, ReLUConvBN, drop_path, starts_with_relu
from robustnas.nets.spaces.registry import GenotypeJson, Space, register

PRIMITIVES: list[str] = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]

SPACES = ("darts", "arnas")
Pair = tuple[str, int]

# Cell kinds (genotype fields) each space uses; the concat fields are "<kind>_concat".
CELL_KINDS = {"darts": ("normal", "reduce"), "arnas": ("accurate", "robust", "reduce")}


# --------------------------------------------------------------------------------------------------
# Genotype


def _check_cell(name: str, ops: Any, concat: Any) -> tuple[list[Pair], list[int]]:
    """Validate one cell description; every error names the genotype field."""
    if not isinstance(ops, (list, tuple)) or len(ops) == 0 or len(ops) % 2:
        raise UserError(f"genotype field '{name}': expected a non-empty list of [op, input] pairs, two per node "
                        f"(an even number), got {ops!r}")
    pairs: list[Pair] = []
    for k, item in enumerate(ops):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise UserError(f"genotype field '{name}'[{k}]: expected an [op, input] pair, got {item!r}")
        op, index = item
        if op not in PRIMITIVES:
            raise UserError(f"genotype field '{name}'[{k}]: unknown op {op!r}; known ops: {', '.join(PRIMITIVES)}")
        node = k // 2  # pairs 2n, 2n+1 feed intermediate node n, which may read inputs 0..n+1
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < node + 2:
            raise UserError(f"genotype field '{name}'[{k}]: input index {index!r} out of range; node {node} "
                            f"reads states 0..{node + 1}")
        pairs.append((op, index))
    steps = len(pairs) // 2
    cname = f"{name}_concat"
    if not isinstance(concat, (list, tuple, range)) or len(concat) == 0:
        raise UserError(f"genotype field '{cname}': expected a non-empty list of node indices, got {concat!r}")
    for c in concat:
        if isinstance(c, bool) or not isinstance(c, int) or not 2 <= c < steps + 2:
            raise UserError(f"genotype field '{cname}': node index {c!r} out of range; the intermediate nodes "
                            f"are 2..{steps + 1}")
    if len(set(concat)) != len(concat):
        raise UserError(f"genotype field '{cname}': repeated node index in {list(concat)}")
    return pairs, list(concat)


@dataclass
class Genotype(GenotypeJson):
    """A DARTS-cell architecture. Field names follow the DARTS Genotype namedtuple.

    space="darts": `normal` and `reduce` cells. space="arnas": `accurate`, `robust` and `reduce` cells;
    `normal`/`normal_concat` then mirror `accurate` (filled in when left out), so that code reading
    only the DARTS fields still gets a valid cell; ARNAS networks never read `normal`.
    """

    normal: list[Pair] | None = None
    normal_concat: list[int] | None = None
    reduce: list[Pair] | None = None
    reduce_concat: list[int] | None = None
    accurate: list[Pair] | None = None
    accurate_concat: list[int] | None = None
    robust: list[Pair] | None = None
    robust_concat: list[int] | None = None
    space: str = "darts"
    source: str | None = None  # free text: where the architecture comes from

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise UserError(f"genotype field 'space': {self.space!r} is not a DARTS-cell space; use one of {SPACES}")
        if self.space == "arnas":
            if self.normal is None and self.accurate is not None:
                self.normal, self.normal_concat = self.accurate, self.accurate_concat
        else:
            for extra in ("accurate", "accurate_concat", "robust", "robust_concat"):
                if getattr(self, extra) is not None:
                    raise UserError(f"genotype field '{extra}' belongs to space 'arnas', but space is 'darts'; "
                                    f"set \"space\": \"arnas\" or remove the field")
        kinds = dict.fromkeys(CELL_KINDS[self.space] + ("normal",))  # ordered: report the space's own kinds first
        for kind in kinds:
            ops, concat = getattr(self, kind), getattr(self, f"{kind}_concat")
            if ops is None:
                raise UserError(f"genotype field '{kind}' is missing (space {self.space!r} needs "
                                f"{', '.join(CELL_KINDS[self.space])})")
            if concat is None:
                raise UserError(f"genotype field '{kind}_concat' is missing")
            ops, concat = _check_cell(kind, ops, concat)
            setattr(self, kind, ops)
            setattr(self, f"{kind}_concat", concat)
        if self.source is not None and not isinstance(self.source, str):
            raise UserError(f"genotype field 'source': expected text, got {self.source!r}")

    def cell(self, kind: str) -> tuple[list[Pair], list[int]]:
        """(ops, concat) of one cell kind."""
        return getattr(self, kind), getattr(self, f"{kind}_concat")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"space": self.space}
        if self.source is not None:
            out["source"] = self.source
        for kind in ("normal", "reduce", "accurate", "robust"):
            ops, concat = self.cell(kind)
            if ops is not None:
                out[kind] = [[op, index] for op, index in ops]
                out[f"{kind}_concat"] = list(concat)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Genotype":
        """Build from parsed JSON. A missing `space` is inferred (the published list names none):
        "arnas" when `accurate` or `robust` is present, else "darts". Unknown keys are ignored."""
        if not isinstance(data, dict):
            raise UserError(f"a genotype must be a JSON object with fields normal, normal_concat, reduce, "
                            f"reduce_concat; got {type(data).__name__}")
        space = data.get("space")
        if space is None:
            space = "arnas" if ("accurate" in data or "robust" in data) else "darts"
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and k != "space"}, space=space)


def derive_cell(weights: torch.Tensor, steps: int, primitives: Sequence[str]) -> list[Pair]:
    """DARTS derivation: per node keep the 2 incoming edges whose strongest non-`none` op weighs most,
    each with that op. `weights` is (num_edges, num_ops), rows ordered node by node. Ties go to the
    lower index."""
    primitives = list(primitives)
    candidates = [k for k, name in enumerate(primitives) if name != "none"]
    if not candidates:
        raise ValueError("cannot derive a cell from a space whose only op is 'none'")
    W = weights.detach().cpu().tolist()
    gene: list[Pair] = []
    start = 0
    for node in range(steps):
        n = node + 2
        rows = W[start:start + n]
        best = [max(candidates, key=lambda k, row=row: (row[k], -k)) for row in rows]
        edges = sorted(range(n), key=lambda j: -rows[j][best[j]])[:2]
        gene.extend((primitives[best[j]], j) for j in edges)
        start += n
    return gene


def random_genotype(rng: np.random.Generator | int, space: str = "darts", steps: int = 4, multiplier: int = 4,
                    primitives: Sequence[str] = PRIMITIVES) -> Genotype:
    """A genotype drawn uniformly from the cells a DARTS derivation can produce (random-search baselines).

    Per cell kind and node: two distinct input states among the earlier ones (the two cell inputs and
    the earlier nodes), each edge with an op drawn uniformly from the non-'none' primitives; the cell
    concatenates its last `multiplier` nodes. Pairs are ordered by input index, so equal cells compare
    equal. `rng` is a numpy Generator (or a seed for one): the same seed gives the same genotype.
    """
    if space not in SPACES:
        raise UserError(f"unknown space {space!r} for a random genotype; use one of {', '.join(SPACES)}")
    if not isinstance(steps, int) or steps < 1 or not 1 <= multiplier <= steps:
        raise UserError(f"steps={steps!r}, multiplier={multiplier!r}: need steps >= 1 and 1 <= multiplier <= steps")
    ops = [p for p in primitives if p != "none"]
    unknown = [p for p in ops if p not in PRIMITIVES]
    if not ops or unknown:
        raise UserError(f"primitives {list(primitives)}: need at least one op other than 'none' from "
                        f"{', '.join(PRIMITIVES)}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    concat = list(range(2 + steps - multiplier, steps + 2))
    cells: dict[str, Any] = {}
    for kind in CELL_KINDS[space]:
        gene: list[Pair] = []
        for node in range(steps):
            inputs = sorted(int(j) for j in rng.choice(node + 2, size=2, replace=False))
            gene.extend((ops[int(rng.integers(len(ops)))], j) for j in inputs)
        cells[kind], cells[f"{kind}_concat"] = gene, concat
    return Genotype(space=space, source="random_genotype", **cells)


# --------------------------------------------------------------------------------------------------
# Layout shared by the supernet and final networks


def reduction_positions(layers: int, reduction_layers: Sequence[int] | None = None) -> list[int]:
    """Indices of the reduction cells: L//3 and 2L//3 unless given."""
    if reduction_layers is None:
        return sorted({layers // 3, 2 * layers // 3})
    out = sorted(set(int(r) for r in reduction_layers))
    if any(not 0 <= r < layers for r in out):
        raise UserError(f"reduction_layers {list(reduction_layers)} out of range for {layers} cells (0..{layers - 1})")
    return out


def darts_plan(layers: int, reductions: Sequence[int]) -> list[tuple[str, bool, int]]:
    """(kind, is_reduction, width factor) per cell; DARTS doubles the width at every reduction."""
    plan = []
    for i in range(layers):
        width = 2 ** sum(1 for r in reductions if r <= i)
        plan.append(("reduce", True, width) if i in reductions else ("normal", False, width))
    return plan


def _check_common(C: int, num_classes: int, layers: int, in_shape: Sequence[int], mean: Sequence[float],
                  std: Sequence[float], reductions: Sequence[int], channel_divisor: int) -> None:
    """Catch bad sizes up front with a one-line message instead of a shape error deep in torch."""
    if not isinstance(C, int) or C < 1 or C % channel_divisor:
        raise UserError(f"C={C!r}: the initial channel count must be a positive multiple of {channel_divisor}")
    if not isinstance(layers, int) or layers < 1:
        raise UserError(f"layers={layers!r}: need at least one cell")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes={num_classes!r}: need a positive number of classes")
    if len(in_shape) != 3 or any(int(s) < 1 for s in in_shape):
        raise UserError(f"in_shape={tuple(in_shape)!r}: expected (channels, height, width)")
    if len(mean) != in_shape[0] or len(std) != in_shape[0]:
        raise UserError(f"mean/std have {len(mean)}/{len(std)} entries but the input has {in_shape[0]} channels")
    h, w = int(in_shape[1]), int(in_shape[2])
    for r in reductions:
        if h % 2 or w % 2:
            raise UserError(f"input {in_shape[1]}x{in_shape[2]} reaches reduction cell {r} at {h}x{w}; every "
                            f"reduction needs an even size: use fewer reductions/cells or a size like 8, 28 or 32")
        h, w = h // 2, w // 2


def _stem(in_channels: int, C_out: int, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """Normalization first (inputs are pixels in [0,1]), then a 3x3 stride-1 conv: keeps small inputs whole."""
    return nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(in_channels, C_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(C_out),
    )


def _begin(net: nn.Module, C_stem: int, in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> int:
    """The start every DARTS-space network shares: the stem and an empty list of cells (and their kinds)."""
    net.stem = _stem(int(in_shape[0]), C_stem, mean, std)
    net.cells = nn.ModuleList()
    net.cell_kinds = []
    return C_stem


# --------------------------------------------------------------------------------------------------
# Search: MixedOp, SearchCell, SuperNet


def channel_shuffle(x: torch.Tensor, groups: int, channels: int) -> torch.Tensor:
    """PC-DARTS channel shuffle (view/transpose in the original), written as strided slices and a
    concatenation so that bound propagation needs nothing new. Output channel j*groups + g is input
    channel g*(C/groups) + j. `channels` is passed in (not read from x) to keep fx tracing static."""
    per_group = channels // groups
    return torch.cat([x[:, j::per_group] for j in range(per_group)], dim=1)


class MixedOp(nn.Module):
    """sum_i w_i * op_i(x) over the candidate ops of one edge.

    With partial_channels_k = k > 1 (PC-DARTS) only the first C/k channels go through the ops; the
    rest bypass them (max-pooled when stride is 2) and a channel shuffle mixes the two parts.
    The conv ops share one ReLU of x (`share_relu`, class attribute: same values, less memory traffic).
    """

    share_relu = True

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES, partial_channels_k: int = 1):
        super().__init__()
        if C % partial_channels_k:
            raise ValueError(f"MixedOp: C={C} is not divisible by partial_channels_k={partial_channels_k}")
        self.C = C
        self.stride = stride
        self.k = partial_channels_k
        self.primitives = tuple(primitives)
        C_op = C // partial_channels_k
        self.ops = nn.ModuleList()
        for name in self.primitives:
            op = OPS[name](C_op, stride, False)
            if "pool" in name:  # as in DARTS: pools get a parameter-free BN to match the conv ops' scale
                op = nn.Sequential(op, nn.BatchNorm2d(C_op, affine=False))
            self.ops.append(op)
        self.bypass_pool = nn.MaxPool2d(2, 2) if (self.k > 1 and stride == 2) else None

    def weighted_sum(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        relu = None  # ops may be swapped after construction (tests, masking code): look at them each call
        out = None
        for i, op in enumerate(self.ops):
            if self.share_relu and starts_with_relu(op):
                if relu is None:
                    relu = torch.relu(x)
                h = op.after_relu(relu)
            else:
                h = op(x)
            out = weights[i] * h if out is None else out + weights[i] * h
        return out

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return self.weighted_sum(x, weights)
        C_op = self.C // self.k
        out = self.weighted_sum(x[:, :C_op], weights)
        rest = x[:, C_op:]
        if self.bypass_pool is not None:
            rest = self.bypass_pool(rest)
        return channel_shuffle(torch.cat([out, rest], dim=1), self.k, self.C)


class SearchCell(nn.Module):
    """A supernet cell: a MixedOp on each of the edges; node i sums its edges from all earlier states."""

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, primitives: Sequence[str] = PRIMITIVES, partial_channels_k: int = 1):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        for node in range(steps):
            for j in range(node + 2):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(C, stride, primitives, partial_channels_k))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            s = self.edges[offset](states[0], weights[offset])
            for j in range(1, len(states)):
                s = s + self.edges[offset + j](states[j], weights[offset + j])
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self.multiplier:], dim=1)


class SuperNet(nn.Module):
    """The DARTS search network: one alpha matrix (num_edges x num_ops) per cell kind.

    Alphas are registered parameters named `alpha_<kind>` (so .to(), state_dict and checkpoints carry
    them); optimise the weights with `weight_parameters()` and the alphas with `arch_parameters()`.
    A boolean mask per kind (same shape as its alphas, all True by default) switches ops off: the op
    weight becomes softmax(alpha) * mask, so a masked op contributes nothing and the others keep
    their weights (no renormalisation) - removing a player in LRNAS's contribution estimate.
    Alphas start at 1e-3 * N(0, 1) from torch's global generator, like the weights: seed with
    torch.manual_seed before construction.
    """

    space = "darts"
    alpha_names: tuple[str, ...] = ("normal", "reduce")

    def __init__(self, C: int, num_classes: int, layers: int, in_shape: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3,
                 primitives: Sequence[str] = PRIMITIVES, partial_channels_k: int = 1,
                 reduction_layers: Sequence[int] | None = None):
        super().__init__()
        primitives = list(primitives)
        unknown = [p for p in primitives if p not in OPS]
        if unknown or not primitives or len(set(primitives)) != len(primitives):
            raise UserError(f"primitives {primitives}: need distinct names from {', '.join(PRIMITIVES)}")
        if not isinstance(partial_channels_k, int) or partial_channels_k < 1:
            raise UserError(f"partial_channels_k={partial_channels_k!r}: must be a positive integer (1 = off)")
        if not 1 <= multiplier <= steps:
            raise UserError(f"multiplier={multiplier}: the cell concatenates 1..steps={steps} nodes")
        reductions = reduction_positions(layers, reduction_layers)
        # FactorizedReduce splits the channels of each op's input in halves
        _check_common(C, num_classes, layers, in_shape, mean, std, reductions, 2 * partial_channels_k)

        self.primitives = tuple(primitives)
        self.steps = steps
        self.multiplier = multiplier
        self.layers = layers
        self.partial_channels_k = partial_channels_k
        self.reductions = reductions
        self.num_edges = sum(node + 2 for node in range(steps))

        C_prev_prev = C_prev = _begin(self, stem_multiplier * C, in_shape, mean, std)
        reduction_prev = False
        for kind, reduction, width in self._plan(layers, reductions):
            C_curr = width * C
            self.cells.append(SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                                         self.primitives, partial_channels_k))
            self.cell_kinds.append(kind)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        n_ops = len(self.primitives)
        for name in self.alpha_names:
            self.register_parameter(f"alpha_{name}", nn.Parameter(1e-3 * torch.randn(self.num_edges, n_ops)))
            self.register_buffer(f"mask_{name}", torch.ones(self.num_edges, n_ops, dtype=torch.bool),
                                 persistent=False)

    @staticmethod
    def _plan(layers: int, reductions: Sequence[int]) -> list[tuple[str, bool, int]]:
        return darts_plan(layers, reductions)

    # --- parameters ------------------------------------------------------------------------------
    def alphas(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, f"alpha_{name}") for name in self.alpha_names}

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas().values())

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def edges(self) -> list[tuple[int, int]]:
        """(node, input state) of each edge, in alpha-row order."""
        return [(node, j) for node in range(self.steps) for j in range(node + 2)]

    @torch.no_grad()
    def op_weights(self) -> dict[str, torch.Tensor]:
        """softmax(alpha) per kind, detached, ignoring masks (for derivation and logging)."""
        return {name: F.softmax(a.detach(), dim=-1).cpu() for name, a in self.alphas().items()}

    # --- masks -----------------------------------------------------------------------------------
    def get_mask(self, name: str) -> torch.Tensor:
        self._check_alpha_name(name)
        return getattr(self, f"mask_{name}").clone()

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        self._check_alpha_name(name)
        buf = getattr(self, f"mask_{name}")
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(buf.shape):
            raise UserError(f"mask for {name!r} has shape {tuple(mask.shape)}, expected {tuple(buf.shape)} "
                            f"(edges x ops)")
        buf.copy_(mask.to(torch.bool))

    def reset_masks(self) -> None:
        for name in self.alpha_names:
            getattr(self, f"mask_{name}").fill_(True)

    @contextmanager
    def masked(self, **masks: torch.Tensor) -> Iterator["SuperNet"]:
        """Temporarily apply masks, e.g. `with net.masked(normal=m): net(x)`."""
        saved = {name: self.get_mask(name) for name in masks}
        try:
            for name, m in masks.items():
                self.set_mask(name, m)
            yield self
        finally:
            for name, m in saved.items():
                self.set_mask(name, m)

    def _check_alpha_name(self, name: str) -> None:
        if name not in self.alpha_names:
            raise UserError(f"unknown alpha set {name!r}; this supernet has {', '.join(self.alpha_names)}")

    # --- forward / derivation --------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {name: F.softmax(getattr(self, f"alpha_{name}"), dim=-1) * getattr(self, f"mask_{name}")
                   for name in self.alpha_names}
        # no fast_layout here: LRNAS's batched subset evaluation (search/lrnas.py) re-implements this
        # forward in NCHW and is tested bit-equal to it; a supernet of 1-channel inputs stays NCHW
        s0 = s1 = self.stem(x)
        for cell, kind in zip(self.cells, self.cell_kinds):
            s0, s1 = s1, cell(s0, s1, weights[kind])
        out = self.global_pooling(s1)
        return self.classifier(torch.flatten(out, 1))

    def genotype(self) -> Genotype:
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        cells: dict[str, Any] = {}
        for name, w in self.op_weights().items():
            cells[name] = derive_cell(w, self.steps, self.primitives)
            cells[f"{name}_concat"] = concat
        return Genotype(space=self.space, **cells)


# --------------------------------------------------------------------------------------------------
# Final networks


class Cell(nn.Module):
    """A final-network cell: node i = op(state a) + op(state b) for its two genotype pairs.

    The conv ops reading one state share one ReLU of it (`share_relu`, class attribute; same values)."""

    share_relu = True

    def __init__(self, ops: Sequence[Pair], concat: Sequence[int], C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        self.steps = len(ops) // 2
        self.concat = list(concat)
        self.multiplier = len(self.concat)
        self.indices = [index for _, index in ops]
        self.ops = nn.ModuleList(OPS[name](C, 2 if reduction and index < 2 else 1, True) for name, index in ops)
        self.is_identity = [isinstance(op, nn.Identity) for op in self.ops]  # drop-path spares identities

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        relu: dict[int, torch.Tensor] = {}  # shared ReLU per state
        for node in range(self.steps):
            branches = []
            for k in (2 * node, 2 * node + 1):
                j = self.indices[k]
                if self.share_relu and starts_with_relu(self.ops[k]):
                    if j not in relu:
                        relu[j] = torch.relu(states[j])
                    h = self.ops[k].after_relu(relu[j])
                else:
                    h = self.ops[k](states[j])
                if self.training and drop_prob > 0.0 and not self.is_identity[k]:
                    h = drop_path(h, drop_prob)
                branches.append(h)
            states.append(branches[0] + branches[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS auxiliary classifier after the last reduction. DARTS pools 8x8 to 2x2 with AvgPool2d(5, 3);
    an adaptive 2x2 pool does the same job at any input size (same parameter count)."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(2),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Network(nn.Module):
    """A final network built from a genotype (DARTS NetworkCIFAR with a small-input stem).

    In training mode with `auxiliary=True`, forward returns (logits, aux_logits); otherwise logits.
    Set `drop_path_prob` (attribute) per epoch as DARTS does; drop-path only acts in training mode.
    """

    space = "darts"

    def __init__(self, genotype: Genotype, C: int, num_classes: int, layers: int, in_shape: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], auxiliary: bool = False, drop_path_prob: float = 0.0,
                 stem_multiplier: int = 3, reduction_layers: Sequence[int] | None = None):
        super().__init__()
        if not isinstance(genotype, Genotype):
            raise UserError(f"expected a Genotype, got {type(genotype).__name__}; load one with "
                            f"robustnas.nets.genotypes.load_genotype")
        if genotype.space != self.space:
            raise UserError(f"genotype has space {genotype.space!r} but {type(self).__name__} builds {self.space!r} "
                            f"networks; use robustnas.nets.genotypes.build_network")
        reductions = reduction_positions(layers, reduction_layers)
        _check_common(C, num_classes, layers, in_shape, mean, std, reductions, 2)
        self.genotype = genotype
        self.layers = layers
        self.reductions = reductions
        self.auxiliary = auxiliary
        self.drop_path_prob = drop_path_prob
        self._aux_position = max(reductions)

        C_prev_prev = C_prev = _begin(self, stem_multiplier * C, in_shape, mean, std)
        reduction_prev = False
        C_aux = C_prev
        for i, (kind, reduction, width) in enumerate(self._plan(layers, reductions)):
            ops, concat = genotype.cell(kind)
            cell = Cell(ops, concat, C_prev_prev, C_prev, width * C, reduction, reduction_prev)
            self.cells.append(cell)
            self.cell_kinds.append(kind)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * width * C
            if i == self._aux_position:
                C_aux = C_prev
        if auxiliary:
            self.auxiliary_head = AuxiliaryHead(C_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    @staticmethod
    def _plan(layers: int, reductions: Sequence[int]) -> list[tuple[str, bool, int]]:
        return darts_plan(layers, reductions)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        with_aux = self.auxiliary and self.training
        aux = None
        s0 = s1 = fast_layout(self.stem(x), self.stem[0])
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if with_aux and i == self._aux_position:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(torch.flatten(self.global_pooling(s1), 1))
        if with_aux:
            return logits, aux
        return logits


def _network(genotype: Genotype, C: int, layers: int, num_classes: int, in_shape: Sequence[int],
             mean: Sequence[float], std: Sequence[float], **kw) -> Network:
    return Network(genotype, C, num_classes, layers, in_shape, mean, std, **kw)


register(Space("darts", Genotype.from_dict, _network, tuple(PRIMITIVES), supernet=SuperNet))
