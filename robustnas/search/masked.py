"""The DARTS supernet with ops switched off: many op-masked subnetworks evaluated in one forward.

A player is a (cell kind, edge, op) triple, in the order of the flattened alphas. `subsets_forward` runs
G masked subnetworks over G stacked input blocks: every op runs only on the blocks that keep it (a
masked op's output is multiplied by zero in the supernet, so skipping it gives the same sums).
`SubsetAccuracy` values subsets by clean and FGSM accuracy on one batch; impl "naive" is the reference
(one `SuperNet.masked` forward per subset). Used by LRNAS's contribution rounds.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustnas.robustness.attacks import fgsm
from robustnas.nets.spaces.darts import MixedOp, SearchCell, SuperNet, channel_shuffle


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

