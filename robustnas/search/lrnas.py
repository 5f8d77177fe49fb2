"""LRNAS (Feng et al., IEEE TNNLS 36(3), 2025): alphas set from Monte-Carlo Shapley contributions of the
ops, and a greedy selection of the final cells under a parameter budget. See METHODS.md section 2.

The supernet (DARTS space, partial channels) trains its weights on clean data with the shared loop of
SupernetSearch; the alphas get no gradient. After the warm-up, each epoch ends with a contribution
round: the players are the (cell kind, edge, op) triples (2 x 14 x 8 = 224); for each of n random
orderings, on one validation batch, the players are switched off one after the other (cumulative op
masks) and the drop of clean and FGSM accuracy at each removal is recorded. A player's value is the
mean over orderings of z(clean drop) + z(FGSM drop), z-scored across players within each ordering;
momentum then moves the alphas towards the values. The round runs in `epoch_info`, which the loop calls
after the epoch's training and validation and before it logs the alphas and saves the checkpoint.

Choices (documented in docs/lrnas.md):
- marginal="previous" (default) measures each drop against the previous subset (the Shapley marginal);
  "full" against the full supernet, as the public code does.
- fgsm="full-network" (default, the public code's choice, about 2.5x cheaper) makes the FGSM examples once
  per ordering against the full supernet, so the robust game is accuracy on fixed perturbed inputs;
  "per-subset" attacks every subset itself (the robust accuracy of that subnetwork).
- alpha_update="kind-zscore" (default, the public code): the values are z-scored within each cell kind
  and a momentum of the increments moves the alphas; "joint-l2": METHODS.md's formula, one L2
  normalisation over both kinds and a normalised momentum (every round moves the alphas by eta).
- The 225 nested subsets of an ordering are evaluated `eval_chunk` at a time in one forward: the batch is
  stacked once per subset and every op runs only on the rows of the subsets that still hold it (a masked
  op's output is multiplied by zero in the supernet, so skipping it gives the same sums). `impl="naive"`
  is the reference: one masked forward of the supernet per subset.

The derivation (`LrnasSuperNet.genotype`) is the greedy selection: each edge's best op by raw alpha
(`none` allowed), edges of both cell kinds in decreasing alpha, filling the two input slots of each node;
the FINAL network (final_C, final_layers) is built on the meta device and counted. budget_rule="official"
(default, the public code) counts the network before the addition: while it is within max_params any op
goes in, so the last op may take it past the budget; past it only none, pools and skip_connect go in.
"strict" counts it after the addition and adds an op only when the network stays within max_params.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from robustnas.attacks import fgsm
from robustnas.config import ParamCount
from robustnas.data import DatasetMeta
from robustnas.errors import UserError
from robustnas.genotypes import build_network
from robustnas.ops import has_parameters
from robustnas.search.base import SearchContext, SearchResult, register
from robustnas.search.supernet import SearchBatch, SupernetConfig, SupernetSearch
from robustnas.size import count_params, format_count, parse_count
from robustnas.spaces.darts import PRIMITIVES, Genotype, MixedOp, SearchCell, SuperNet, channel_shuffle
from robustnas.training import epoch_seed

ValueFn = Callable[[Tensor], Tensor]  # active players (G, P) bool -> values (G, m) of those G subsets


# ================================================================================================ Shapley core
def random_orderings(n_players: int, n: int, generator: torch.Generator) -> Tensor:
    """n random permutations of the players, one per row."""
    return torch.stack([torch.randperm(n_players, generator=generator) for _ in range(n)])


def nested_values(value_fn: ValueFn, order: Tensor, chunk: int = 16) -> Tensor:
    """Values (P+1, m) of the nested subsets of one ordering: row j has every player but order[:j]
    (row 0 the full set, row P the empty one). value_fn gets `chunk` subsets at a time."""
    P = len(order)
    pos = torch.empty(P, dtype=torch.long)
    pos[order] = torch.arange(P)
    out = []
    for start in range(0, P + 1, chunk):
        j = torch.arange(start, min(start + chunk, P + 1))
        out.append(value_fn(pos[None, :] >= j[:, None]))
    return torch.cat(out)


def removal_drops(values: Tensor, order: Tensor, marginal: Literal["previous", "full"] = "previous") -> Tensor:
    """Each player's drop (P, m), indexed by player, from the nested values of its ordering: against the
    subset before its removal ("previous": the Shapley marginal) or against the full set ("full")."""
    before = values[:-1] if marginal == "previous" else values[:1].expand(len(order), -1)
    drops = torch.empty_like(values[1:])
    drops[order] = before - values[1:]
    return drops


def zscore(t: Tensor, dim: int, unbiased: bool = False) -> Tensor:
    """(t - mean) / std along dim (population std unless unbiased); 0 where the std is 0 (nothing to rank)."""
    std = t.std(dim, unbiased=unbiased, keepdim=True)
    z = (t - t.mean(dim, keepdim=True)) / std
    return torch.where(std > 0, z, torch.zeros_like(z))


def contribution_values(drops: Tensor) -> Tensor:
    """LRNAS value of each player from drops (orderings, P, metrics): the mean over orderings of the sum
    over metrics of the drops z-scored across players."""
    return zscore(drops.double(), 1).sum(-1).mean(0)


def momentum_update(alpha: Tensor, v: Tensor, values: Tensor, mu: float, eta: float) -> tuple[Tensor, Tensor]:
    """alpha_update "joint-l2" (METHODS.md): v <- (1 - mu) v + mu V/||V||;  alpha <- alpha + eta v/||v||
    (flat tensors, both cell kinds in one norm; a zero norm moves nothing)."""
    n = values.norm()
    v = (1 - mu) * v + mu * (values / n if n > 0 else torch.zeros_like(values))
    nv = v.norm()
    return (alpha + eta * v / nv if nv > 0 else alpha.clone()), v


def kind_zscore_update(alpha: Tensor, d: Tensor, values: Tensor, mu: float, eta: float,
                       kinds: int = 2) -> tuple[Tensor, Tensor]:
    """alpha_update "kind-zscore" (the public code's update_alpha): V z-scored within each of `kinds` equal
    parts (the cell kinds; std with Bessel's correction, as torch.std), d <- eta ((1 - mu) d + mu z),
    alpha <- alpha + d. The momentum is kept on the increment d itself (the public code hands its last
    increment back as the previous value), so the previous round weighs eta (1 - mu) = 0.08."""
    z = zscore(values.view(kinds, -1), 1, unbiased=True).flatten()
    d = eta * ((1 - mu) * d + mu * z)
    return alpha + d, d


# ================================================================================================ players
def player_names(net: SuperNet) -> list[str]:
    """Names "kind/edge/op" of the players, in the order of the flattened alphas (kind, edge, op); edges are
    numbered node by node as in the alpha rows (node 0: inputs 0,1; node 1: inputs 0,1,2; ...)."""
    return [f"{kind}/{e}/{op}" for kind in net.alpha_names for e in range(net.num_edges) for op in net.primitives]


def split_players(net: SuperNet, active: Tensor) -> dict[str, Tensor]:
    """(G, P) player flags -> per cell kind (G, edges, ops) masks."""
    E, O = net.num_edges, len(net.primitives)
    return {kind: active[:, i * E * O:(i + 1) * E * O].reshape(-1, E, O) for i, kind in enumerate(net.alpha_names)}


# ================================================================================================ batched subsets
def _mixed_rows(op: MixedOp, x: Tensor, w: Tensor, active: Tensor, rows: int) -> Tensor:
    """MixedOp.forward for stacked subsets: block g (rows g*rows ...) keeps op i where active[g, i]; each
    op runs only on the blocks that keep it and adds into their rows, in the supernet's summation order."""
    C_op = op.C // op.k
    xin = x if op.k == 1 else x[:, :C_op]
    n, _, h, wd = xin.shape
    if xin.requires_grad:  # keep the output tied to the input even when no op is kept (as the zero weights do)
        out = xin[:, :, ::op.stride, ::op.stride] * 0.0
    else:
        out = xin.new_zeros(n, C_op, h // op.stride, wd // op.stride)
    G = active.shape[0]
    counts = active.sum(0).tolist()
    for i, f in enumerate(op.ops):
        c = counts[i]
        if c == 0:
            continue
        if c == G:
            out.add_(w[i] * f(xin))
        elif bool(active[:c, i].all()):  # a leading run of blocks (nested subsets): plain slices
            out[:c * rows].add_(w[i] * f(xin[:c * rows]))
        else:
            idx = (torch.nonzero(active[:, i]).flatten()[:, None] * rows
                   + torch.arange(rows, device=active.device)).flatten().to(x.device)
            out.index_add_(0, idx, w[i] * f(xin.index_select(0, idx)))
    if op.k == 1:
        return out
    rest = x[:, C_op:]
    if op.bypass_pool is not None:
        rest = op.bypass_pool(rest)
    return channel_shuffle(torch.cat([out, rest], dim=1), op.k, op.C)


def _cell_rows(cell: SearchCell, s0: Tensor, s1: Tensor, w: Tensor, active: Tensor, rows: int) -> Tensor:
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    offset = 0
    for _ in range(cell.steps):
        s = _mixed_rows(cell.edges[offset], states[0], w[offset], active[:, offset], rows)
        for j in range(1, len(states)):
            s = s + _mixed_rows(cell.edges[offset + j], states[j], w[offset + j], active[:, offset + j], rows)
        offset += len(states)
        states.append(s)
    return torch.cat(states[-cell.multiplier:], dim=1)


def _run_cells(net: SuperNet, s0: Tensor, s1: Tensor, masks: dict[str, Tensor], rows: int,
               cells: range) -> tuple[Tensor, Tensor]:
    weights = {kind: F.softmax(a.detach(), dim=-1) for kind, a in net.alphas().items()}
    for i in cells:
        kind = net.cell_kinds[i]
        s0, s1 = s1, _cell_rows(net.cells[i], s0, s1, weights[kind], masks[kind], rows)
    return s0, s1


def _head(net: SuperNet, s1: Tensor) -> Tensor:
    return net.classifier(torch.flatten(net.global_pooling(s1), 1))


def subsets_forward(net: SuperNet, x: Tensor, masks: dict[str, Tensor], rows: int) -> Tensor:
    """Logits of G op-masked subnetworks in one pass: x holds G blocks of `rows` inputs, block g goes
    through the supernet with masks[kind][g] (edges x ops). Equals net(x_g) under net.masked(...) block
    by block; ops are skipped on the blocks that mask them. Use in eval mode (per-sample BatchNorm)."""
    s = net.stem(x)
    return _head(net, _run_cells(net, s, s, masks, rows, range(len(net.cells)))[1])


def leading_cells(net: SuperNet) -> int:
    """Length of the leading run of cells of one kind: their output depends on that kind's mask only."""
    n = 1
    while n < len(net.cells) and net.cell_kinds[n] == net.cell_kinds[0]:
        n += 1
    return n


class MaskedSubsets(nn.Module):
    """The supernet as G masked subnetworks over stacked input blocks, as one module an attack can use."""

    def __init__(self, net: SuperNet, masks: dict[str, Tensor], rows: int):
        super().__init__()
        self.net, self.masks, self.rows = net, masks, rows

    def forward(self, x: Tensor) -> Tensor:
        return subsets_forward(self.net, x, self.masks, self.rows)


def auto_chunk(net: SuperNet, x: Tensor, rows: int, backward: bool = False) -> int:
    """Subsets per batched forward: the stem output of a forward stays near 16 MiB on CPU (larger tensors
    cost page faults and cache misses more than batching saves) and 1 GiB on CUDA (kernel launches);
    64 times less when the forward is kept for a backward pass (per-subset FGSM: every op's activations)."""
    stem = net.stem[1].out_channels * x[0].numel() // x.shape[1] * x.element_size() * rows
    target = (2 ** 30 if x.device.type == "cuda" else 2 ** 24) // (64 if backward else 1)
    return max(1, target // max(stem, 1))


class SubsetAccuracy:
    """value_fn for nested_values: clean and FGSM accuracy (G, 2) of G op subsets on one batch (x, y).

    fgsm "full-network": the FGSM examples are made once, at construction, against the full supernet;
    "per-subset": each subset attacks itself. impl "naive": one masked supernet forward per subset;
    "batched": G subsets per forward (subsets_forward), and with fixed examples the output of the leading
    cells of one kind is kept from the previous call and reused by every later subset whose mask of
    that kind is the same (in a removal order, about half of them)."""

    def __init__(self, net: SuperNet, x: Tensor, y: Tensor, eps: float, norm: str = "Linf",
                 fgsm_mode: Literal["full-network", "per-subset"] = "full-network",
                 impl: Literal["batched", "naive"] = "batched"):
        self.net, self.x, self.y, self.eps, self.norm = net, x, y, eps, norm
        self.fgsm_mode, self.impl = fgsm_mode, impl
        self.x_adv = self._eval(lambda: fgsm(net, x, y, eps, norm=norm)) if fgsm_mode == "full-network" else None
        self.prefix: dict[bytes, tuple[Tensor, Tensor]] = {}
        self.prefix_cells = leading_cells(net)
        self.prefix_reused = 0  # subsets whose leading cells were not computed for them

    def _eval(self, fn: Callable[[], Any]) -> Any:
        was = self.net.training
        self.net.eval()
        try:
            return fn()
        finally:
            self.net.train(was)

    def __call__(self, active: Tensor) -> Tensor:
        return self._eval(lambda: self.naive(active) if self.impl == "naive" else self.batched(active))

    def naive(self, active: Tensor) -> Tensor:
        net, x, y, B = self.net, self.x, self.y, len(self.y)
        out = []
        for g in range(active.shape[0]):
            masks = {k: m[0] for k, m in split_players(net, active[g:g + 1]).items()}
            with net.masked(**masks):
                x_adv = self.x_adv if self.x_adv is not None else fgsm(net, x, y, self.eps, norm=self.norm)
                with torch.no_grad():
                    logits = net(torch.cat([x, x_adv]))
            out.append(torch.stack([(logits[:B].argmax(1) == y).sum(), (logits[B:].argmax(1) == y).sum()]))
        return torch.stack(out).cpu().double() / B

    def batched(self, active: Tensor) -> Tensor:
        net, x, y, B = self.net, self.x, self.y, len(self.y)
        G = active.shape[0]
        masks = {k: m.to(x.device) for k, m in split_players(net, active).items()}
        with torch.no_grad():
            if self.x_adv is not None:
                logits = self._with_prefix(torch.cat([x, self.x_adv]), masks, G)
            else:
                subsets = MaskedSubsets(net, masks, B).eval()
                with torch.enable_grad():
                    x_adv = fgsm(subsets, x.repeat(G, 1, 1, 1), y.repeat(G), self.eps, norm=self.norm)
                both = torch.stack([x.expand(G, *x.shape), x_adv.view(G, *x.shape)], 1)
                logits = subsets_forward(net, both.reshape(G * 2 * B, *x.shape[1:]), masks, 2 * B)
        correct = (logits.view(G, 2, B, -1).argmax(-1) == y).sum(-1)
        return correct.cpu().double() / B

    def _with_prefix(self, block: Tensor, masks: dict[str, Tensor], G: int) -> Tensor:
        """subsets_forward of G copies of `block`, the leading cells taken from the cache where it can."""
        net, n0, rows = self.net, self.prefix_cells, len(block)
        kind = net.cell_kinds[0]
        keys = [masks[kind][g].cpu().numpy().tobytes() for g in range(G)]
        new = list(dict.fromkeys(k for k in keys if k not in self.prefix))
        self.prefix_reused += G - len(new)
        if new:
            first = [keys.index(k) for k in new]
            sub = {kd: m[first] for kd, m in masks.items()}
            s = net.stem(block.repeat(len(new), *([1] * (block.dim() - 1))))
            s0, s1 = _run_cells(net, s, s, sub, rows, range(n0))
            for i, k in enumerate(new):
                self.prefix[k] = (s0[i * rows:(i + 1) * rows], s1[i * rows:(i + 1) * rows])
        self.prefix = {k: self.prefix[k] for k in dict.fromkeys(keys)}  # a removal order never comes back
        s0 = torch.cat([self.prefix[k][0] for k in keys])
        s1 = torch.cat([self.prefix[k][1] for k in keys])
        return _head(net, _run_cells(net, s0, s1, masks, rows, range(n0, len(net.cells)))[1])


# ================================================================================================ greedy selection
@dataclass
class Selection:
    """The greedy selection's genotype, its final network's parameter count, and one log entry per edge
    in the order it was considered: kind, edge, node, input, op, alpha, decision, params after it."""

    genotype: Genotype
    params: int
    log: list[dict] = field(default_factory=list)


# the ops the public code still adds once the network is past the budget (its PRIMITIVES[:4]); a
# skip_connect on a stride-2 edge is among them although it is a FactorizedReduce with weights
PUBLIC_FREE_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect")


class GreedySelector:
    """LRNAS's budgeted derivation; counts the FINAL network (final C and layers) built on the meta device.

    budget_rule "official" (the public code): an op goes in while the network BEFORE it is within the
    budget, so the op that crosses the budget is kept; past the budget only PUBLIC_FREE_OPS go in.
    "strict": the network is counted AFTER the addition and never exceeds the budget; after_budget then
    says what follows the first refusal: "free-only" adds only ops that add no parameters (counted),
    "fit" every later op that still fits.
    """

    def __init__(self, meta: DatasetMeta, C: int, layers: int, max_params: Optional[int] = None,
                 primitives: Sequence[str] = PRIMITIVES, steps: int = 4, multiplier: int = 4,
                 after_budget: Literal["free-only", "fit"] = "free-only", kinds: Sequence[str] = ("normal", "reduce"),
                 reduction_layers: Optional[Sequence[int]] = None,
                 budget_rule: Literal["official", "strict"] = "official"):
        if budget_rule == "official" and after_budget != "free-only":
            raise ValueError(f"after_budget={after_budget!r} applies to budget_rule 'strict' only")
        self.budget_rule = budget_rule
        self.meta, self.C, self.layers = meta, C, layers
        self.net_kw = {} if reduction_layers is None else {"reduction_layers": list(reduction_layers)}
        self.budget = math.inf if max_params is None else int(max_params)
        self.primitives = tuple(primitives)
        self.steps, self.multiplier, self.after_budget, self.kinds = steps, multiplier, after_budget, tuple(kinds)
        self.edges = [(node, j) for node in range(steps) for j in range(node + 2)]
        self._counts: dict[str, int] = {}
        self._last: Optional[tuple[bytes, Selection]] = None

    def count(self, genotype: Genotype) -> int:
        key = genotype.to_json(indent=None)
        if key not in self._counts:
            m = self.meta
            with torch.device("meta"):
                net = build_network(genotype, C=self.C, layers=self.layers, num_classes=m.num_classes,
                                    in_shape=m.shape, mean=m.mean, std=m.std, **self.net_kw)
            self._counts[key] = count_params(net)
        return self._counts[key]

    def _genotype(self, cells: dict[str, list[list[tuple[str, int]]]]) -> Genotype:
        """Genotype from per-node filled slots; unfilled slots get `none` on an input the node does not use."""
        out: dict[str, Any] = {}
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        for kind in self.kinds:
            pairs: list[tuple[str, int]] = []
            for node, filled in enumerate(cells[kind]):
                free = [j for j in range(node + 2) if j not in {i for _, i in filled}]
                pairs.extend(filled + [("none", free[k]) for k in range(2 - len(filled))])
            out[kind], out[f"{kind}_concat"] = pairs, concat
        return Genotype(**out)

    def empty_params(self) -> int:
        return self.count(self._genotype({k: [[] for _ in range(self.steps)] for k in self.kinds}))

    def check(self) -> None:
        """Refuse, before searching, a budget below the final network with every op `none`."""
        base = self.empty_params()
        if base > self.budget:
            raise UserError(f"max_params={format_count(int(self.budget))} is below the {format_count(base)} "
                            f"parameters of the final network with no op at all (C={self.C}, layers={self.layers}); "
                            f"raise max_params or lower final_C / final_layers")

    def select(self, alphas: dict[str, Tensor]) -> Selection:
        """Greedy selection on raw alphas {kind: (edges, ops)}; ties go to the lower kind/edge/op index."""
        key = b"".join(alphas[k].detach().cpu().double().numpy().tobytes() for k in self.kinds)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        cand = []
        for ki, kind in enumerate(self.kinds):
            a = alphas[kind].detach().cpu().double()
            for e in range(len(self.edges)):
                o = int(torch.argmax(a[e]))  # the first maximum
                cand.append((-float(a[e, o]), ki, e, o))
        cand.sort()
        cells = {k: [[] for _ in range(self.steps)] for k in self.kinds}
        params = self.empty_params()
        full = False
        log = []
        for neg, ki, e, o in cand:
            kind, (node, j), op = self.kinds[ki], self.edges[e], self.primitives[o]
            entry = {"kind": kind, "edge": e, "node": node, "input": j, "op": op, "alpha": -neg}
            if len(cells[kind][node]) == 2:
                entry["decision"] = "node full"
            elif self.budget_rule == "official":  # counted before the addition
                if params <= self.budget or op in PUBLIC_FREE_OPS:
                    cells[kind][node].append((op, j))
                    params = self.count(self._genotype(cells))
                    entry["decision"] = "added"
                else:
                    entry["decision"] = "over budget"
            else:
                cells[kind][node].append((op, j))
                n = self.count(self._genotype(cells))
                adds = n > params
                if n > self.budget or (adds and full and self.after_budget == "free-only"):
                    cells[kind][node].pop()
                    entry["decision"] = "over budget" if n > self.budget else "budget reached"
                    full = True
                else:
                    params = n
                    entry["decision"] = "added"
            entry["params"] = params
            log.append(entry)
        sel = Selection(self._genotype(cells), params, log)
        self._last = (key, sel)
        return sel


def select_under_budget(alphas: dict[str, Any], meta: DatasetMeta, max_params: Optional[str | int], C: int,
                        layers: int, after_budget: Literal["free-only", "fit"] = "free-only",
                        reduction_layers: Optional[Sequence[int]] = None,
                        budget_rule: Literal["official", "strict"] = "official") -> Selection:
    """The greedy selection for raw alphas {kind: edges x ops} (tensors or the nested lists of a search's
    `alpha_raw`) under another budget: the contributions do not depend on the budget, so one search
    serves every budget."""
    budget = parse_count(max_params) if max_params is not None else None
    selector = GreedySelector(meta, C, layers, budget, PRIMITIVES, after_budget=after_budget,
                              reduction_layers=reduction_layers, budget_rule=budget_rule)
    selector.check()
    return selector.select({k: torch.as_tensor(v, dtype=torch.float64) for k, v in alphas.items()})


class LrnasSuperNet(SuperNet):
    """The DARTS supernet whose derivation is the LRNAS greedy selection on the raw alphas."""

    def __init__(self, *args: Any, selector: GreedySelector, **kw: Any):
        super().__init__(*args, **kw)
        self.selector = selector

    def selection(self) -> Selection:
        return self.selector.select({k: a.detach() for k, a in self.alphas().items()})

    def genotype(self) -> Genotype:
        return Genotype.from_dict(self.selection().genotype.to_dict())  # a copy: callers set its source


# ================================================================================================ strategy
class LrnasConfig(SupernetConfig):
    """LRNAS settings; published CIFAR-10 values in the comments. The alpha-optimizer settings of
    SupernetConfig (alpha_lr, order, xi, ...) are unused: the alphas get no gradient."""

    space: Literal["darts"] = "darts"
    C: int = Field(default=8, ge=1)                   # 16
    layers: int = Field(default=5, ge=1)              # 8
    partial_channels_k: int = Field(default=4, ge=1)  # 4
    epochs: int = Field(default=10, ge=1)             # 50-60
    warmup_epochs: int = Field(default=3, ge=0)       # 15
    batch_size: int = Field(default=64, ge=1)         # 128
    w_lr: float = Field(default=0.025, gt=0)          # public code 0.1 (batch 128); DARTS 0.025
    w_lr_min: float = Field(default=0.001, ge=0)      # public code 0
    weight_adv: Literal["none", "pgd", "fgsm-rs"] = "none"  # clean weight training
    # --- contribution round
    orderings: int = Field(default=10, ge=1)          # 10
    contrib_batch_size: int = Field(default=64, ge=1)  # 64 (a validation batch per ordering)
    marginal: Literal["previous", "full"] = "previous"  # public code: "full"
    fgsm: Literal["full-network", "per-subset"] = "full-network"  # public code: full-network
    impl: Literal["batched", "naive"] = "batched"
    eval_chunk: Optional[int] = Field(default=None, ge=1)  # subsets per batched forward; None: auto_chunk
    mu: float = Field(default=0.2, ge=0, le=1)        # 0.2
    eta: float = Field(default=0.1, gt=0)             # 0.1
    alpha_update: Literal["kind-zscore", "joint-l2"] = "kind-zscore"  # public code: kind-zscore
    # --- greedy selection: counts the FINAL network (train it with these C and layers)
    max_params: ParamCount = None                     # 2.0M at final_C 36, final_layers 20; None: no budget
    final_C: int = Field(default=10, ge=2)            # 36
    final_layers: int = Field(default=8, ge=1)        # 20
    final_reduction_layers: Optional[list[int]] = None  # None: the DARTS rule (layers//3, 2*layers//3)
    budget_rule: Literal["official", "strict"] = "official"  # public code: official (may pass max_params by one op)
    after_budget: Literal["free-only", "fit"] = "free-only"  # strict only
    # the report also shows the selection under these budgets (one search serves every budget)
    report_budgets: list[str] = ["50k", "100k", "200k"]

    @model_validator(mode="after")
    def _check_channels(self) -> "LrnasConfig":
        if self.final_C % 2:
            raise ValueError(f"final_C={self.final_C} must be even (FactorizedReduce splits the channels)")
        if self.budget_rule == "official" and self.after_budget != "free-only":
            raise ValueError(f"after_budget={self.after_budget} applies to budget_rule: strict only")
        return self


@dataclass
class ContributionRound:
    """One epoch's estimate: per-player value, mean clean / FGSM drops, the full supernet's accuracies."""

    values: Tensor
    clean_drop: Tensor
    fgsm_drop: Tensor
    full_clean: float
    full_fgsm: float
    seconds: float


@register
class Lrnas(SupernetSearch):
    name = "lrnas"
    Config = LrnasConfig

    def build_supernet(self, meta: DatasetMeta) -> LrnasSuperNet:
        cfg = self.cfg
        budget = parse_count(cfg.max_params) if cfg.max_params is not None else None
        selector = GreedySelector(meta, cfg.final_C, cfg.final_layers, budget, PRIMITIVES,
                                  after_budget=cfg.after_budget, kinds=LrnasSuperNet.alpha_names,
                                  reduction_layers=cfg.final_reduction_layers, budget_rule=cfg.budget_rule)
        selector.check()
        return LrnasSuperNet(cfg.C, meta.num_classes, cfg.layers, meta.shape, meta.mean, meta.std,
                             partial_channels_k=cfg.partial_channels_k, selector=selector)

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        P = sum(a.numel() for a in self.alphas)
        if self.cfg.alpha_update == "kind-zscore":  # the public code starts its increments at 1e-3 N(0, 1)
            g = torch.Generator().manual_seed(ctx.seed)
            self.momentum = 1e-3 * torch.randn(P, generator=g, dtype=torch.float64)
        else:
            self.momentum = torch.zeros(P, dtype=torch.float64)

    def alpha_step(self, batch: SearchBatch) -> dict[str, Any]:
        return {}  # no gradient step: the alphas move once per epoch, in epoch_info

    def state_tensors(self) -> dict[str, Tensor]:
        return {"momentum": self.momentum}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "momentum" in tensors:
            self.momentum = tensors["momentum"].clone()

    # ---------------------------------------------------------------------------------------- contributions
    def contribution_round(self, epoch: int) -> ContributionRound:
        """n orderings, each on its own validation batch from the alpha half (seeded by seed and epoch)."""
        cfg, net = self.cfg, self.net
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(epoch_seed(self.ctx.seed, epoch) + 1)
        P = sum(a.numel() for a in self.alphas)
        orders = random_orderings(P, cfg.orderings, g)
        x_all, y_all = self.ctx.data.train.x, self.ctx.data.train.y
        drops, full = [], []
        for order in orders:
            pick = self.a_idx[torch.randperm(len(self.a_idx), generator=g)[:cfg.contrib_batch_size]]
            x, y = x_all[pick].to(self.device), y_all[pick].to(self.device)
            fn = SubsetAccuracy(net, x, y, self.eps, self.norm, cfg.fgsm, cfg.impl)
            chunk = cfg.eval_chunk or auto_chunk(net, x, 2 * len(y), backward=cfg.fgsm == "per-subset")
            values = nested_values(fn, order, chunk)
            drops.append(removal_drops(values, order, cfg.marginal))
            full.append(values[0])
        D = torch.stack(drops)
        F_ = torch.stack(full).mean(0)
        return ContributionRound(contribution_values(D), D[..., 0].mean(0), D[..., 1].mean(0),
                                 float(F_[0]), float(F_[1]), time.perf_counter() - t0)

    def apply_values(self, values: Tensor) -> None:
        cfg = self.cfg
        flat = torch.cat([a.detach().reshape(-1).double().cpu() for a in self.alphas])
        if cfg.alpha_update == "kind-zscore":
            new, self.momentum = kind_zscore_update(flat, self.momentum, values.double(), cfg.mu, cfg.eta,
                                                    len(self.alphas))
        else:
            new, self.momentum = momentum_update(flat, self.momentum, values.double(), cfg.mu, cfg.eta)
        with torch.no_grad():
            start = 0
            for a in self.alphas:
                a.copy_(new[start:start + a.numel()].view_as(a).to(a.dtype))
                start += a.numel()

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        if epoch < self.cfg.warmup_epochs:
            return {"stage": "warm-up"}
        r = self.contribution_round(epoch)
        self.apply_values(r.values)
        sel = self.net.selection()
        return {"stage": "contributions", "contrib_seconds": r.seconds,
                "contrib_full_clean": r.full_clean, "contrib_full_fgsm": r.full_fgsm,
                "contributions": {"players": player_names(self.net), "value": r.values.tolist(),
                                  "clean_drop": r.clean_drop.tolist(), "fgsm_drop": r.fgsm_drop.tolist()},
                "alpha_raw": {k: a.detach().cpu().tolist() for k, a in self.net.alphas().items()},
                "final_params": sel.params}

    def search(self, ctx: SearchContext, resume: bool = False) -> SearchResult:
        result = super().search(ctx, resume)
        sel = self.net.selection()
        result.extra.update({"final_params": sel.params, "selection": sel.log, "final_C": self.cfg.final_C,
                             "final_layers": self.cfg.final_layers,
                             "alpha_raw": {k: a.detach().cpu().tolist() for k, a in self.net.alphas().items()}})
        return result

    # ---------------------------------------------------------------------------------------- run / report
    def final_size(self) -> dict[str, int]:
        """The greedy selection counted this final network: `run` must train exactly it."""
        size = {"C": self.cfg.final_C, "layers": self.cfg.final_layers}
        if self.cfg.final_reduction_layers is not None:
            size["reduction_layers"] = list(self.cfg.final_reduction_layers)
        return size

    def report_sections(self, result: SearchResult, out: Path, meta: DatasetMeta) -> list[str]:
        """Contributions per op type and per cell kind over epochs, and the selection at other budgets."""
        from robustnas.report import plot_heatmaps, plot_series

        lines: list[str] = []
        summary = summarise_contributions(result.history)
        if summary["epochs"]:
            ep = summary["epochs"]
            p1 = plot_series(ep, summary["by_op"], out / "plots" / "contributions_by_op.png",
                             "mean contribution per op type", "epoch", "z-scored contribution")
            p2 = plot_series(ep, summary["by_kind"], out / "plots" / "contributions_by_kind.png",
                             "mean contribution per cell kind", "epoch", "z-scored contribution")
            kinds = list(summary["by_kind_op"])
            ops = list(summary["by_op"])
            p3 = plot_heatmaps([("last epoch's contribution", [[summary["by_kind_op"][k][o][-1] for o in ops]
                                                               for k in kinds], kinds, ops)],
                               out / "plots" / "contributions_last.png")
            lines += ["## Component contributions (LRNAS)", "",
                      f"![by op](plots/{p1.name})", "", f"![by kind](plots/{p2.name})", "",
                      f"![last epoch](plots/{p3.name})", ""]
        alphas = result.extra.get("alpha_raw")
        if alphas:
            C, layers = self.cfg.final_C, self.cfg.final_layers
            lines += [f"## Greedy selection at other budgets (final network C={C}, {layers} cells)", "",
                      "| budget | final params | ops with parameters | parameter-free ops | none |",
                      "|---|---|---|---|---|"]
            budgets = list(dict.fromkeys([*self.cfg.report_budgets] + ([self.cfg.max_params] if self.cfg.max_params
                                                                      else [])))
            for b in budgets:
                sel = select_under_budget(alphas, meta, b, C, layers, self.cfg.after_budget,
                                          self.cfg.final_reduction_layers, self.cfg.budget_rule)
                edges = [(op, 2 if kind == "reduce" and j < 2 else 1)  # reduce cells' inputs at stride 2
                         for kind in self.net.alpha_names for op, j in getattr(sel.genotype, kind)]
                counts = {"param": sum(has_parameters(op, st) for op, st in edges),
                          "free": sum(op != "none" and not has_parameters(op, st) for op, st in edges),
                          "none": sum(op == "none" for op, _ in edges)}
                lines.append(f"| {b} | {sel.params:,} | {counts['param']} | {counts['free']} | {counts['none']} |")
            lines.append("")
        return lines


# ================================================================================================ report
def summarise_contributions(history: Sequence[dict], metric: Literal["value", "clean_drop", "fgsm_drop"] = "value"
                            ) -> dict[str, Any]:
    """Mean of a contribution metric per op type, per cell kind and per (kind, op), for every epoch of a
    search.jsonl history that has contributions: {"epochs", "by_op", "by_kind", "by_kind_op"}, each
    leaf a list over those epochs. What the report plots."""
    epochs: list[int] = []
    by_op: dict[str, list[float]] = {}
    by_kind: dict[str, list[float]] = {}
    by_kind_op: dict[str, dict[str, list[float]]] = {}
    for rec in history:
        c = rec.get("contributions")
        if not c:
            continue
        epochs.append(rec["epoch"])
        groups: dict[tuple[str, str], list[float]] = {}
        for name, v in zip(c["players"], c[metric]):
            kind, _, op = name.split("/")
            groups.setdefault((kind, op), []).append(v)
        kinds = list(dict.fromkeys(k for k, _ in groups))
        ops = list(dict.fromkeys(o for _, o in groups))
        for op in ops:
            vals = [v for (k, o), vs in groups.items() if o == op for v in vs]
            by_op.setdefault(op, []).append(sum(vals) / len(vals))
        for kind in kinds:
            vals = [v for (k, o), vs in groups.items() if k == kind for v in vs]
            by_kind.setdefault(kind, []).append(sum(vals) / len(vals))
            for op in ops:
                vs = groups[(kind, op)]
                by_kind_op.setdefault(kind, {}).setdefault(op, []).append(sum(vs) / len(vs))
    return {"metric": metric, "epochs": epochs, "by_op": by_op, "by_kind": by_kind, "by_kind_op": by_kind_op}
