"""LRNAS: the Monte-Carlo Shapley estimator on games with known values, the momentum update, the batched
subset evaluation against the naive masked loop and against removing the ops, the budgeted greedy
selection, and the search loop (search.jsonl contributions, exact resume). Tiny supernets on 8x8 digits."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from robustnas.nets import ops
from robustnas.robustness.attacks import fgsm
from robustnas.core.config import RunCommand, validate
from robustnas.data.datasets import load_dataset
from robustnas.core.errors import UserError
from robustnas.nets.genotypes import build_network, load_genotype
from robustnas.search import SearchContext, build_strategy
from robustnas.data.datasets import DatasetMeta
from robustnas.search.greedy import PUBLIC_FREE_OPS, GreedySelector, select_under_budget
from robustnas.search.lrnas import kind_zscore_update, momentum_update
from robustnas.search.masked import (MaskedSubsets, SubsetAccuracy, leading_cells, player_names, split_players,
                                     subsets_forward)
from robustnas.search.shapley import (contribution_values, nested_values, random_orderings, removal_drops,
                                      summarise_contributions, zscore)
from robustnas.nets.size import count_params
from robustnas.core.config import parse_count
from robustnas.nets.spaces.darts import PRIMITIVES, Genotype, SuperNet

ROOT = Path(__file__).resolve().parents[1]
SMALL_OPS = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"]


_SMALL_NETS: dict = {}


def _trained_small_net(data, k: int) -> SuperNet:
    """A 2-node, 5-op supernet (50 players) in float64, trained a little so that removals matter.

    Trained once per (data, k) in this module: each call gets a copy of that network (weights, buffers, mode
    and gradients), and torch's global random state is put back where training left it, so a test sees
    exactly what a fresh training gives (7 calls, 2 trainings)."""
    key = (id(data), k)
    if key not in _SMALL_NETS:
        _SMALL_NETS[key] = (data, _train_small_net(data, k), torch.get_rng_state())  # data: keeps id(data) taken
    _, net, rng = _SMALL_NETS[key]
    torch.set_rng_state(rng)
    twin = copy.deepcopy(net)
    for p, q in zip(net.parameters(), twin.parameters()):  # deepcopy drops a Parameter's .grad (the last step's)
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def _train_small_net(data, k: int) -> SuperNet:
    m = data.meta
    torch.manual_seed(k)
    net = SuperNet(4, 10, 3, m.shape, m.mean, m.std, steps=2, multiplier=2, primitives=SMALL_OPS,
                   partial_channels_k=k).double()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_()
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9)
    x, y = data.train.x[:128].double(), data.train.y[:128]
    net.train()
    for i in range(30):
        sl = slice(32 * (i % 4), 32 * (i % 4 + 1))
        loss = F.cross_entropy(net(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # BatchNorm statistics of the final weights, for eval mode
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None
        net(x)
    return net.eval()


# ================================================================================================ Shapley core
def test_additive_game_gives_each_player_its_weight_in_every_ordering():
    g = torch.Generator().manual_seed(0)
    P = 20
    w = torch.randn(P, 2, generator=g, dtype=torch.float64)

    def value(active):  # v(S) = sum of the weights of S, two metrics
        return active.double() @ w

    orders = random_orderings(P, 5, g)
    drops, full_drops = [], []
    for order in orders:
        values = nested_values(value, order, chunk=7)
        assert values.shape == (P + 1, 2)
        torch.testing.assert_close(values[0], w.sum(0))
        torch.testing.assert_close(values[-1], torch.zeros(2, dtype=torch.float64))
        d = removal_drops(values, order, "previous")
        torch.testing.assert_close(d, w)  # the Shapley value of an additive game, exact in every ordering
        drops.append(d)
        # "full": the drop against the full set is the cumulative drop along the ordering
        f = removal_drops(values, order, "full")
        torch.testing.assert_close(f[order], torch.cumsum(w[order], 0))
        full_drops.append(f)
    drops = torch.stack(drops)
    torch.testing.assert_close(contribution_values(drops), zscore(w[:, 0], 0) + zscore(w[:, 1], 0))
    assert not torch.allclose(contribution_values(torch.stack(full_drops)), contribution_values(drops))


def _unanimity_game(P: int, seed: int):
    """v(S) = sum_T c_T [T subset of S]: the Shapley value of player i is sum over T containing i of c_T/|T|."""
    g = torch.Generator().manual_seed(seed)
    coalitions = [torch.randperm(P, generator=g)[:int(torch.randint(1, 5, (1,), generator=g))] for _ in range(8)]
    c = torch.randn(len(coalitions), generator=g, dtype=torch.float64)
    member = torch.zeros(len(coalitions), P, dtype=torch.bool)
    for t, T in enumerate(coalitions):
        member[t, T] = True
    phi = (c[:, None] * member.double() / member.sum(1, keepdim=True)).sum(0)

    def value(active):
        holds = (active[:, None, :] | ~member[None]).all(-1)  # (G, coalitions): T inside S
        return (holds.double() @ c)[:, None]

    return value, phi


@pytest.mark.parametrize("seed", [0, 1])
def test_estimator_converges_to_the_shapley_values_of_a_unanimity_game(seed):
    P = 12
    value, phi = _unanimity_game(P, seed)
    g = torch.Generator().manual_seed(100 + seed)
    drops = []
    for order in random_orderings(P, 3000, g):
        values = nested_values(value, order, chunk=P + 1)
        d = removal_drops(values, order)[:, 0]
        assert math.isclose(d.sum().item(), (values[0] - values[-1]).item(), abs_tol=1e-12)  # efficiency
        drops.append(d)
    drops = torch.stack(drops)
    errors = {n: (drops[:n].mean(0) - phi).abs().max().item() for n in (10, 100, 3000)}
    scale = phi.abs().max().item()
    assert errors[3000] < errors[100] < errors[10]
    assert errors[3000] < 0.05 * scale


def test_estimator_on_a_symmetric_game_built_from_supernet_masks():
    """v(S) = (share of active ops, normal cell)^2 + (share, reduce cell)^3 from the per-kind masks of the
    224 DARTS players: players of one cell kind are symmetric, so each gets (h(1) - h(0)) / 112 = 1/112."""
    net = SuperNet(4, 10, 3, (1, 8, 8), (0.5,), (0.5,))
    P = len(player_names(net))
    assert P == 2 * 14 * 8 == 224

    def value(active):
        masks = split_players(net, active)
        return (masks["normal"].double().mean((1, 2)) ** 2 + masks["reduce"].double().mean((1, 2)) ** 3)[:, None]

    g = torch.Generator().manual_seed(7)
    drops = torch.stack([removal_drops(nested_values(value, o, 32), o)[:, 0] for o in random_orderings(P, 400, g)])
    err = {n: (drops[:n].mean(0) - 1 / 112).abs().max().item() for n in (4, 400)}
    assert err[400] < err[4] / 4 and err[400] < 0.2 / 112
    names = player_names(net)
    assert names[0] == "normal/0/none" and names[-1] == "reduce/13/dil_conv_5x5" and len(set(names)) == P


def test_zscore_and_momentum_update():
    t = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    z = zscore(t, 1)
    torch.testing.assert_close(z[0], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5))
    assert torch.equal(z[1], torch.zeros(3))  # nothing to rank: no NaN

    V = torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64)
    alpha, v = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    steps = []
    for _ in range(40):
        new, v = momentum_update(alpha, v, V, mu=0.2, eta=0.1)
        steps.append(new - alpha)
        alpha = new
    for s in steps:  # every step has length eta along V's direction
        torch.testing.assert_close(s, 0.1 * V / V.norm())
    torch.testing.assert_close(v, (1 - 0.8 ** 40) * V / V.norm())
    # a later opposite value turns the velocity only gradually (momentum)
    new, v2 = momentum_update(alpha, v, -V, mu=0.2, eta=0.1)
    assert torch.allclose(new - alpha, 0.1 * V / V.norm())  # 0.8 v - 0.2 v still points along V
    zero = torch.zeros(3, dtype=torch.float64)
    same, v3 = momentum_update(alpha, zero, zero, 0.2, 0.1)
    assert torch.equal(same, alpha) and torch.equal(v3, zero)


# ================================================================================================ subsets
@pytest.mark.parametrize("k", [1, 2])
def test_batched_subsets_equal_the_masked_supernet_block_by_block(data, k):
    net = _trained_small_net(data, k)
    P = len(player_names(net))
    x = data.train.x[150:158].double()
    g = torch.Generator().manual_seed(k)
    active = torch.rand(6, P, generator=g) < 0.5  # arbitrary (not nested) subsets: the index path
    active[2] = True  # the full supernet
    active[3] = False  # nothing left
    masks = split_players(net, active)
    with torch.no_grad():
        batched = subsets_forward(net, x.repeat(6, 1, 1, 1), masks, len(x)).view(6, len(x), -1)
        for b in range(6):
            with net.masked(**{kind: m[b] for kind, m in masks.items()}):
                assert torch.equal(batched[b], net(x))
    with torch.no_grad():
        assert torch.equal(batched[2], net(x))


@pytest.mark.parametrize("k", [1, 2])
def test_masking_an_op_equals_removing_it_in_the_subset_evaluation(data, k):
    """Subset g of the batched evaluation, its FGSM examples included, is the supernet with the masked ops
    replaced by the zero op of their stride."""
    net = _trained_small_net(data, k)
    P = len(player_names(net))
    x, y = data.train.x[150:166].double(), data.train.y[150:166]
    g = torch.Generator().manual_seed(5)
    active = torch.rand(3, P, generator=g) < 0.6
    masks = split_players(net, active)
    subsets = MaskedSubsets(net, masks, len(x)).eval()
    x_adv = fgsm(subsets, x.repeat(3, 1, 1, 1), y.repeat(3), 0.1).view(3, *x.shape)
    with torch.no_grad():
        logits = subsets(x.repeat(3, 1, 1, 1)).view(3, len(x), -1)
    for b in range(3):
        removed = copy.deepcopy(net)
        for cell, kind in zip(removed.cells, removed.cell_kinds):
            for e, o in torch.nonzero(~masks[kind][b]).tolist():
                cell.edges[e].ops[o] = ops.Zero(cell.edges[e].stride)
        with torch.no_grad():
            torch.testing.assert_close(logits[b], removed(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(x_adv[b], fgsm(removed, x, y, 0.1), rtol=0, atol=0)
    assert not torch.allclose(logits[0], logits[1])  # the removals mattered


@pytest.mark.parametrize("k,fgsm_mode", [(1, "full-network"), (2, "full-network"), (2, "per-subset")])
def test_batched_contribution_values_equal_the_naive_loop_exactly(data, k, fgsm_mode):
    net = _trained_small_net(data, k)
    P = len(player_names(net))
    x, y = data.train.x[150:166].double(), data.train.y[150:166]
    g = torch.Generator().manual_seed(3)
    orders = random_orderings(P, 2 if fgsm_mode == "full-network" else 1, g)
    results = {}
    reused = 0
    for impl in ("naive", "batched"):
        results[impl] = []
        for o in orders:
            fn = SubsetAccuracy(net, x, y, 0.1, "Linf", fgsm_mode, impl)
            results[impl].append(nested_values(fn, o, chunk=13))
            reused += fn.prefix_reused
    # with fixed FGSM examples the first cell's output is shared by the subsets that differ in reduce ops only
    assert leading_cells(net) == 1
    assert (reused > len(orders) * P // 4) if fgsm_mode == "full-network" else reused == 0
    for a, b in zip(results["naive"], results["batched"]):
        assert torch.equal(a, b)
    values = torch.stack(results["batched"])
    assert values[:, 0, 0].min() > 0.3 and values[:, 0, 1].max() < values[:, 0, 0].min()  # a real game
    assert len(torch.unique(values[..., 0])) > 3 and len(torch.unique(values[..., 1])) > 3
    for marginal in ("previous", "full"):
        d_n = torch.stack([removal_drops(v, o, marginal) for v, o in zip(results["naive"], orders)])
        d_b = torch.stack([removal_drops(v, o, marginal) for v, o in zip(results["batched"], orders)])
        assert torch.equal(contribution_values(d_n), contribution_values(d_b))
    assert not net.training


# ================================================================================================ greedy selection
def _selector(data, budget, after="free-only", C=4, layers=3, rule="strict"):
    return GreedySelector(data.meta, C, layers, budget, PRIMITIVES, after_budget=after, budget_rule=rule)


def _random_alphas(seed):
    g = torch.Generator().manual_seed(seed)
    return {"normal": torch.randn(14, 8, generator=g), "reduce": torch.randn(14, 8, generator=g)}


def _cpu_params(data, genotype, C=4, layers=3):
    m = data.meta
    return count_params(build_network(genotype, C=C, layers=layers, num_classes=m.num_classes, in_shape=m.shape,
                                      mean=m.mean, std=m.std))


@pytest.mark.parametrize("after", ["free-only", "fit"])
def test_greedy_selection_respects_the_budget_from_tiny_to_large(data, after):
    empty = _selector(data, None).empty_params()
    unbounded = _selector(data, None).select(_random_alphas(0)).params
    assert unbounded > empty
    for seed in range(2):
        alphas = _random_alphas(seed)
        previous = -1
        for budget in [empty, empty + 50, empty + 400, empty + 1500, (empty + unbounded) // 2, 10 * unbounded]:
            sel = _selector(data, budget, after).select(alphas)
            assert sel.params <= budget
            assert sel.params == _cpu_params(data, sel.genotype)  # the meta-device count is the real one
            assert sel.params >= previous  # a larger budget never selects less
            previous = sel.params
            for e in sel.log:  # no refused op would have been free
                if e["decision"] in ("over budget", "budget reached"):
                    assert e["op"] not in ("none", "max_pool_3x3", "avg_pool_3x3")
            if after == "fit":
                assert all(e["decision"] != "budget reached" for e in sel.log)
        assert sel.params == _selector(data, None).select(alphas).params  # the largest budget binds nothing


def test_greedy_selection_counts_the_final_network_with_its_reduction_cells(data):
    m = data.meta
    budget = _selector(data, None).empty_params() + 2000
    sel = GreedySelector(m, 4, 3, budget, PRIMITIVES, reduction_layers=[0, 1],
                         budget_rule="strict").select(_random_alphas(1))
    net = build_network(sel.genotype, C=4, layers=3, num_classes=m.num_classes, in_shape=m.shape, mean=m.mean,
                        std=m.std, reduction_layers=[0, 1])
    assert sel.params == count_params(net) <= budget
    default = GreedySelector(m, 4, 3, None, PRIMITIVES).count(sel.genotype)
    assert default != sel.params  # the cells' layout changes the count: it must be the trained one


def test_greedy_selection_fills_the_slots_in_alpha_order(data):
    alphas = _random_alphas(4)
    sel = _selector(data, _selector(data, None).empty_params() + 1200).select(alphas)
    log = sel.log
    assert len(log) == 28
    assert [e["alpha"] for e in log] == sorted((e["alpha"] for e in log), reverse=True)
    for e in log:  # each edge offers its best op by raw alpha, `none` allowed
        row = alphas[e["kind"]][e["edge"]]
        assert e["op"] == PRIMITIVES[int(row.argmax())] and e["alpha"] == pytest.approx(float(row.max()))
    # each node's two slots hold its first two added edges, in the order they were added; unfilled: none
    for kind in ("normal", "reduce"):
        pairs = sel.genotype.cell(kind)[0]
        for node in range(4):
            added = [(e["op"], e["input"]) for e in log if e["kind"] == kind and e["node"] == node
                     and e["decision"] == "added"]
            assert len(added) <= 2
            assert pairs[2 * node:2 * node + len(added)] == added
            assert all(op == "none" for op, _ in pairs[2 * node + len(added):2 * node + 2])
            full_at = [i for i, e in enumerate(log) if e["kind"] == kind and e["node"] == node
                       and e["decision"] == "node full"]
            if full_at:
                assert len(added) == 2
    decisions = {e["decision"] for e in log}
    assert {"added", "over budget"} <= decisions
    # past the budget ("free-only"): nothing after the first refusal adds parameters
    first = next(i for i, e in enumerate(log) if e["decision"] == "over budget")
    assert all(e["params"] == log[first]["params"] for e in log[first:])
    # without a budget: every node takes its two best edges by alpha
    free = _selector(data, None).select(alphas).genotype
    for kind in ("normal", "reduce"):
        a = alphas[kind]
        start = 0
        for node in range(4):
            rows = a[start:start + node + 2]
            best = sorted(range(node + 2), key=lambda j: -float(rows[j].max()))[:2]
            assert free.cell(kind)[0][2 * node:2 * node + 2] == [(PRIMITIVES[int(rows[j].argmax())], j) for j in best]
            start += node + 2


def test_skip_connect_on_a_stride_two_edge_is_not_free(data):
    """In a reduce cell skip_connect from the cell inputs is a FactorizedReduce: past the budget it is
    refused, while skip_connect on a normal edge and pools anywhere still go in."""
    alphas = {"normal": torch.zeros(14, 8), "reduce": torch.zeros(14, 8)}
    skip, pool = PRIMITIVES.index("skip_connect"), PRIMITIVES.index("avg_pool_3x3")
    alphas["reduce"][0, skip] = 3.0   # node 0 <- input 0, stride 2
    alphas["normal"][0, skip] = 2.0   # node 0 <- input 0, stride 1
    alphas["reduce"][1, pool] = 1.0   # node 0 <- input 1, stride 2
    empty = _selector(data, None).empty_params()
    sel = _selector(data, empty).select(alphas)
    by = {(e["kind"], e["edge"]): e["decision"] for e in sel.log}
    assert by[("reduce", 0)] == "over budget"
    assert by[("normal", 0)] == "added" and by[("reduce", 1)] == "added"
    assert sel.params == empty
    assert ("avg_pool_3x3", 1) in sel.genotype.reduce[:2] and ("skip_connect", 0) not in sel.genotype.reduce[:2]
    assert _selector(data, None).select(alphas).params > empty  # with room, the skip goes in and costs


def _assert_official(sel, budget, empty):
    """The public rule's outcome, read from the log: an op went in only while the network before it was within
    the budget, or if it is on the public free list; refused ops came past the budget and are off the list."""
    before = empty
    for e in sel.log:
        if e["decision"] == "added":
            assert before <= budget or e["op"] in PUBLIC_FREE_OPS
        elif e["decision"] == "over budget":
            assert before > budget and e["op"] not in PUBLIC_FREE_OPS
        before = e["params"]
    assert before == sel.params


def _ranking_alphas(genotype, order):
    """Raw alphas that offer the genotype's (op, input) at each listed (kind, position), ranked in that order
    (first highest); every other edge offers `none` at alpha 0, after them."""
    starts = [0, 2, 5, 9]  # first edge of each node
    alphas = {k: torch.zeros(14, 8) for k in ("normal", "reduce")}
    for rank, (kind, pos) in enumerate(order):
        op, j = getattr(genotype, kind)[pos]
        alphas[kind][starts[pos // 2] + j, PRIMITIVES.index(op)] = float(len(order) - rank)
    return alphas


def _nodes(genotype, kind):
    pairs = getattr(genotype, kind)
    return [sorted(pairs[2 * n:2 * n + 2]) for n in range(4)]


@pytest.mark.parametrize("name,classes,crossing,published",
                         [("lrnas_cifar10", 10, 4, 2_179_702), ("lrnas_cifar100", 100, 7, 2_321_488)])
def test_official_rule_reproduces_the_published_overshoot_of_the_2m_budget(name, classes, crossing, published):
    """The published LRNAS cells count past their 2.0M budget at 20 cells, C=36. Ranked so that a normal
    separable conv comes last but one and a stride-2 skip_connect of the reduce cell last, the public rule
    (counted before adding; skip_connect on the free list) selects exactly the published cells; the strict
    rule refuses both and stays within 2.0M."""
    g = load_genotype(name)
    skip = next(i for i, (op, j) in enumerate(g.reduce) if op == "skip_connect" and j < 2)  # a FactorizedReduce
    order = ([("normal", i) for i in range(8) if i != crossing] + [("reduce", i) for i in range(8) if i != skip]
             + [("normal", crossing), ("reduce", skip)])
    alphas = _ranking_alphas(g, order)
    meta = DatasetMeta("cifar", classes, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, "8/255", (), "")
    official = select_under_budget(alphas, meta, "2.0M", 36, 20, budget_rule="official")
    strict = select_under_budget(alphas, meta, "2.0M", 36, 20, budget_rule="strict")
    assert official.params == published > 2_000_000
    for kind in ("normal", "reduce"):
        assert _nodes(official.genotype, kind) == _nodes(g, kind)
    decisions = [e["decision"] for e in official.log[-14:]]
    assert decisions[:2] == ["added", "added"]  # the crossing conv, then the skip past the budget
    crossing_before = official.log[-15]["params"]
    assert crossing_before <= 2_000_000 < official.log[-14]["params"] < published
    assert strict.params == crossing_before
    assert [e["decision"] for e in strict.log[-14:-12]] == ["over budget", "budget reached"]


def test_official_rule_passes_the_budget_by_at_most_one_op_and_strict_never(data):
    """A fixed ranking (normal sep_conv_3x3 on every edge first, then a stride-2 skip_connect and a pool of the
    reduce cell), a budget 2.5 convs above the empty network: official keeps the third conv that crosses the
    budget and then the skip (free in the public code, a FactorizedReduce here); strict stops at two convs."""
    sep, skip, pool = (PRIMITIVES.index(o) for o in ("sep_conv_3x3", "skip_connect", "avg_pool_3x3"))
    alphas = {"normal": torch.zeros(14, 8), "reduce": torch.zeros(14, 8)}
    alphas["normal"][:, sep] = torch.arange(28.0, 14.0, -1)
    alphas["reduce"][0, skip] = 10.0  # node 0 <- input 0, stride 2
    alphas["reduce"][1, pool] = 9.0   # node 0 <- input 1, stride 2
    empty = _selector(data, None).empty_params()
    one = _selector(data, None).count(Genotype.from_dict({
        "normal": [["sep_conv_3x3", 0]] + [["none", j] for j in (1, 0, 1, 0, 1, 0, 1)], "normal_concat": [2, 3, 4, 5],
        "reduce": [["none", j] for j in (0, 1) * 4], "reduce_concat": [2, 3, 4, 5]})) - empty
    budget = empty + 5 * one // 2
    official = _selector(data, budget, rule="official").select(alphas)
    strict = _selector(data, budget, rule="strict").select(alphas)
    _assert_official(official, budget, empty)
    by_o = {(e["kind"], e["edge"]): e for e in official.log}
    by_s = {(e["kind"], e["edge"]): e for e in strict.log}
    added_convs = [e for e in official.log if e["op"] == "sep_conv_3x3" and e["decision"] == "added"]
    assert len(added_convs) == 3 and added_convs[-1]["params"] == empty + 3 * one > budget
    assert by_o[("reduce", 0)]["decision"] == "added" and by_o[("reduce", 0)]["params"] > empty + 3 * one
    assert by_o[("reduce", 1)]["decision"] == "added"
    assert official.params == by_o[("reduce", 0)]["params"]
    assert [e for e in strict.log if e["op"] == "sep_conv_3x3" and e["decision"] == "added"] == added_convs[:2]
    assert by_s[("reduce", 0)]["decision"] != "added" and by_s[("reduce", 1)]["decision"] == "added"
    assert strict.params == empty + 2 * one <= budget
    with pytest.raises(ValueError, match="strict"):
        _selector(data, budget, after="fit", rule="official")


def test_kind_zscore_update_standardises_each_kind_and_keeps_momentum_on_the_increment():
    g = torch.Generator().manual_seed(0)
    V = torch.cat([3 * torch.randn(112, generator=g) + 7, 0.1 * torch.randn(112, generator=g) - 2]).double()
    V2 = torch.randn(224, generator=g, dtype=torch.float64)
    alpha0 = torch.randn(224, generator=g, dtype=torch.float64)
    zero = torch.zeros(224, dtype=torch.float64)
    a1, d1 = kind_zscore_update(alpha0, zero, V, mu=0.2, eta=0.1)
    torch.testing.assert_close(a1 - alpha0, d1)
    for half in (d1[:112], d1[112:]):  # each kind on its own scale: mean 0, std eta * mu
        assert abs(float(half.mean())) < 1e-12 and float(half.std()) == pytest.approx(0.02)
    a2, d2 = kind_zscore_update(a1, d1, V2, mu=0.2, eta=0.1)
    z2 = torch.cat([(h - h.mean()) / h.std() for h in (V2[:112], V2[112:])])
    torch.testing.assert_close(d2, 0.1 * (0.8 * d1 + 0.2 * z2))
    torch.testing.assert_close(a2, a1 + d2)
    # a shift and a scale of one kind's values change nothing here, and the joint L2 step
    W = V.clone()
    W[112:] = 10 * W[112:] + 3
    torch.testing.assert_close(kind_zscore_update(alpha0, zero, W, 0.2, 0.1)[0], a1)
    joint = [momentum_update(alpha0, zero, values, 0.2, 0.1)[0] for values in (V, W)]
    assert not torch.allclose(*joint)


def test_kind_zscore_is_the_default_and_changes_the_ranking_across_cell_kinds(search_data):
    """Values whose reduce half sits higher but spreads less: one joint L2 normalisation puts every reduce edge
    first; z-scores per cell kind (the public code, the default) put the normal edges first (their spikes stand
    out more), and the selection under the budget differs."""
    g = torch.Generator().manual_seed(0)
    normal = torch.zeros(14, 8, dtype=torch.float64)
    normal[:, PRIMITIVES.index("sep_conv_3x3")] = 1.0
    reduce = 5 + 0.01 * torch.randperm(112, generator=g).view(14, 8).double()
    V = torch.cat([normal.flatten(), reduce.flatten()])
    sels = {}
    for name, settings in (("default", TINY), ("joint-l2", {**TINY, "alpha_update": "joint-l2"})):
        strat = build_strategy("lrnas", settings)
        strat.setup(_ctx(search_data))
        with torch.no_grad():
            for a in strat.alphas:
                a.zero_()
        strat.momentum.zero_()
        strat.apply_values(V)
        sels[name] = strat.net.selection()
    assert [e["kind"] for e in sels["joint-l2"].log[:14]] == ["reduce"] * 14
    assert [e["kind"] for e in sels["default"].log[:14]] == ["normal"] * 14
    assert sels["default"].genotype != sels["joint-l2"].genotype


# ================================================================================================ the search
# warm-up 0: the first epoch trains, then estimates, so that two contribution rounds take two epochs
TINY = dict(C=4, layers=3, partial_channels_k=1, batch_size=32, epochs=2, warmup_epochs=0, max_batches_per_epoch=6,
            w_lr=0.1, val_n=16, val_steps=1, orderings=1, contrib_batch_size=12, final_C=4, final_layers=3,
            max_params="4k")


@pytest.fixture(scope="module")
def search_data():
    return load_dataset("digits", subset=600, seed=0)


def _ctx(data, out=None, **kw) -> SearchContext:
    return SearchContext(data=data, eps=0.1, seed=3, out_dir=out, progress=False, **kw)


def _strip(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s", "contrib_seconds")} for r in history]


def test_search_writes_contributions_and_a_resumed_search_equals_an_uninterrupted_one(search_data, tmp_path):
    data = search_data
    full_strategy = build_strategy("lrnas", TINY)
    full = full_strategy.search(_ctx(data, tmp_path / "full"))

    def kill_after_first_epoch(record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_strategy("lrnas", TINY).search(_ctx(data, tmp_path / "cut", on_epoch_end=kill_after_first_epoch))
    resumed_strategy = build_strategy("lrnas", TINY)
    resumed = resumed_strategy.search(_ctx(data, tmp_path / "cut"), resume=True)
    assert _strip(resumed.history) == _strip(full.history)
    assert resumed.genotype == full.genotype
    assert resumed.extra["alpha_raw"] == full.extra["alpha_raw"]
    assert torch.equal(resumed_strategy.momentum, full_strategy.momentum)  # saved with the checkpoint
    assert (tmp_path / "cut" / "genotype.json").read_text() == (tmp_path / "full" / "genotype.json").read_text()

    lines = [json.loads(line) for line in (tmp_path / "full" / "search.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines] == ["contributions", "contributions"]
    for r in lines:
        c = r["contributions"]
        assert len(c["players"]) == len(c["value"]) == len(c["clean_drop"]) == len(c["fgsm_drop"]) == 224
        assert c["players"][8 * 14] == "reduce/0/none"
        assert any(v != 0 for v in c["clean_drop"]) and any(v != 0 for v in c["value"])  # a real estimate
    # the public update (default): each round's increment is d = eta ((1 - mu) d_prev + mu z), z the round's
    # values z-scored within each cell kind; the first d_prev is the public code's 1e-3 N(0, 1) start
    torch.manual_seed(3)
    init = build_strategy("lrnas", TINY).build_supernet(data.meta).alphas()
    previous = torch.cat([init[k].detach().flatten() for k in ("normal", "reduce")]).double()
    d_prev = None
    for r in lines:
        now = torch.cat([torch.tensor(r["alpha_raw"][k], dtype=torch.float64).flatten() for k in ("normal", "reduce")])
        v = torch.tensor(r["contributions"]["value"], dtype=torch.float64).view(2, -1)
        z = ((v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True)).flatten()
        d = now - previous
        if d_prev is None:
            assert (d - 0.1 * 0.2 * z).abs().max() < 1e-3 < d.abs().max()
        else:
            torch.testing.assert_close(d, 0.1 * (0.8 * d_prev + 0.2 * z), atol=1e-5, rtol=0)
        previous, d_prev = now, d

    # the final genotype is the greedy selection, within the budget, and builds
    genotype = load_genotype(tmp_path / "full" / "genotype.json")
    assert genotype == full.genotype
    assert {k: v for k, v in genotype.to_dict().items() if k != "source"} == lines[-1]["genotype"]
    assert _cpu_params(data, genotype) == full.extra["final_params"]
    assert [e["decision"] for e in full.extra["selection"]].count("added") <= 16
    empty = _selector(data, None).empty_params()
    # one search serves other budgets: the selection again from the logged raw alphas
    again = select_under_budget(lines[-1]["alpha_raw"], data.meta, "4k", 4, 3)
    assert again.genotype.to_dict() == lines[-1]["genotype"] and again.params == full.extra["final_params"]
    _assert_official(again, 4000, empty)
    for budget in ("3k", "6k"):
        _assert_official(select_under_budget(lines[-1]["alpha_raw"], data.meta, budget, 4, 3), parse_count(budget),
                         empty)
        strict = select_under_budget(lines[-1]["alpha_raw"], data.meta, budget, 4, 3, budget_rule="strict")
        assert strict.params <= parse_count(budget)

    # the report's summary: means per op type and cell kind, per contribution epoch
    s = summarise_contributions(lines)
    assert s["epochs"] == [0, 1] and set(s["by_kind"]) == {"normal", "reduce"} and list(s["by_op"]) == PRIMITIVES
    c = lines[1]["contributions"]
    sep = [v for n, v in zip(c["players"], c["value"]) if n.startswith("reduce/") and n.endswith("/sep_conv_3x3")]
    assert s["by_kind_op"]["reduce"]["sep_conv_3x3"][1] == pytest.approx(sum(sep) / 14)
    assert s["by_op"]["none"][1] == pytest.approx(
        sum(v for n, v in zip(c["players"], c["value"]) if n.endswith("/none")) / 28)
    d = summarise_contributions(lines, "fgsm_drop")
    assert d["metric"] == "fgsm_drop" and len(d["by_kind"]["normal"]) == 2
    assert summarise_contributions([{"epoch": 0, "stage": "warm-up"}])["epochs"] == []


def test_settings_are_checked_with_one_line(data):
    with pytest.raises(UserError, match="bad setting max_params"):
        build_strategy("lrnas", {"max_params": "lots"})
    with pytest.raises(UserError, match="final_C"):
        build_strategy("lrnas", {"final_C": 9})
    with pytest.raises(UserError, match="bad setting fgsm"):
        build_strategy("lrnas", {"fgsm": "sometimes"})
    strat = build_strategy("lrnas", {**TINY, "max_params": "1k"})
    with pytest.raises(UserError, match="max_params=1.0k is below the .* parameters of the final network"):
        strat.search(_ctx(data))
    with pytest.raises(UserError, match="after_budget=fit applies to budget_rule: strict"):
        build_strategy("lrnas", {"after_budget": "fit"})
    cfg = build_strategy("lrnas").cfg
    assert (cfg.orderings, cfg.mu, cfg.eta, cfg.marginal, cfg.weight_adv) == (10, 0.2, 0.1, "previous", "none")
    assert (cfg.alpha_update, cfg.budget_rule) == ("kind-zscore", "official")  # the public code's


def test_shipped_config_validates_and_matches_the_final_network(data):
    raw = yaml.safe_load((ROOT / "configs" / "lrnas.yaml").read_text())
    cmd = validate(RunCommand, raw)
    assert cmd.method == "lrnas"
    strat = build_strategy(cmd.method, cmd.search)
    assert (strat.cfg.final_C, strat.cfg.final_layers) == (cmd.final.C, cmd.final.layers)
    assert strat.cfg.weight_adv == "none" and strat.cfg.max_params is not None
    assert (strat.cfg.budget_rule, strat.cfg.alpha_update) == ("official", "kind-zscore")  # paper-shaped
    bench = yaml.safe_load((ROOT / "configs" / "benchmark.yaml").read_text())["methods"]["lrnas"]
    assert build_strategy("lrnas", bench).cfg.budget_rule == "strict"  # one shared budget: never past it
