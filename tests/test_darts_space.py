"""DARTS / ARNAS cell spaces: mixed ops, derivation, genotype JSON, published genotypes, sizes, masks, fx."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.fx

from robustnas.nets import ops
from robustnas.core.errors import UserError
from robustnas.nets.genotypes import build_network, load_genotype, published_names, save_genotype
from robustnas.nets.size import count_params
from robustnas.nets.spaces import (ARNAS_PRIMITIVES, PRIMITIVES, ArnasNetwork, ArnasSuperNet, Genotype, MixedOp, Network,
                              SuperNet)
from robustnas.nets.spaces.darts import channel_shuffle

MEAN3, STD3 = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def _reference_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The PC-DARTS view/transpose form, as an independent reference."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


# --------------------------------------------------------------------------------------------------
# MixedOp


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_is_weighted_sum_of_its_ops(stride):
    torch.manual_seed(0)
    mixed = MixedOp(8, stride).eval()
    x = torch.randn(2, 8, 8, 8)
    w = torch.softmax(torch.randn(len(PRIMITIVES)), dim=0)
    expected = sum(w[i] * op(x) for i, op in enumerate(mixed.ops))
    out = mixed(x, w)
    assert out.shape == (2, 8, 8 // stride, 8 // stride)
    torch.testing.assert_close(out, expected)
    # a one-hot weight selects exactly that op
    onehot = torch.zeros(len(PRIMITIVES))
    onehot[PRIMITIVES.index("sep_conv_3x3")] = 1.0
    torch.testing.assert_close(mixed(x, onehot), mixed.ops[PRIMITIVES.index("sep_conv_3x3")](x))


@pytest.mark.parametrize("groups", [2, 4])
def test_channel_shuffle_matches_view_transpose(groups):
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(channel_shuffle(x, groups, 8), _reference_shuffle(x, groups))
    torch.testing.assert_close(channel_shuffle(x, 1, 8), x)


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channel_mixed_op(stride):
    torch.manual_seed(1)
    k, C = 4, 16
    mixed = MixedOp(C, stride, partial_channels_k=k).eval()
    x = torch.randn(2, C, 8, 8)
    w = torch.softmax(torch.randn(len(PRIMITIVES)), dim=0)
    part = sum(w[i] * op(x[:, : C // k]) for i, op in enumerate(mixed.ops))
    rest = x[:, C // k:]
    if stride == 2:
        rest = torch.nn.functional.max_pool2d(rest, 2, 2)
    expected = _reference_shuffle(torch.cat([part, rest], dim=1), k)
    out = mixed(x, w)
    assert out.shape == (2, C, 8 // stride, 8 // stride)
    torch.testing.assert_close(out, expected)

    # k=1 is the plain mixed op: same modules (copied state), same output
    torch.manual_seed(2)
    plain = MixedOp(C, stride).eval()
    one = MixedOp(C, stride, partial_channels_k=1).eval()
    one.load_state_dict(plain.state_dict())
    torch.testing.assert_close(one(x, w), sum(w[i] * op(x) for i, op in enumerate(plain.ops)))


# --------------------------------------------------------------------------------------------------
# derivation


def _alphas_from(spec: dict[int, tuple[str, float]], primitives, none_value: float | None) -> torch.Tensor:
    a = torch.zeros(14, len(primitives))
    if none_value is not None:
        a[:, primitives.index("none")] = none_value  # heaviest op everywhere: must never be chosen
    for edge, (op, value) in spec.items():
        a[edge, primitives.index(op)] = value
    return a


# edges per node: node0 = 0,1; node1 = 2,3,4; node2 = 5..8; node3 = 9..13 (inputs 0..node+1)
NORMAL_SPEC = {0: ("sep_conv_3x3", 3.0), 1: ("skip_connect", 2.0),
               2: ("max_pool_3x3", 1.0), 3: ("dil_conv_3x3", 5.0), 4: ("sep_conv_5x5", 4.0),
               5: ("avg_pool_3x3", 2.0), 6: ("sep_conv_3x3", 0.5), 7: ("dil_conv_5x5", 6.0), 8: ("skip_connect", 3.0),
               9: ("sep_conv_3x3", 7.0), 10: ("dil_conv_3x3", 1.0), 11: ("sep_conv_5x5", 2.0),
               12: ("avg_pool_3x3", 0.1), 13: ("max_pool_3x3", 6.5)}
NORMAL_EXPECTED = [("sep_conv_3x3", 0), ("skip_connect", 1),
                   ("dil_conv_3x3", 1), ("sep_conv_5x5", 2),
                   ("dil_conv_5x5", 2), ("skip_connect", 3),
                   ("sep_conv_3x3", 0), ("max_pool_3x3", 4)]
REDUCE_SPEC = {0: ("max_pool_3x3", 1.0), 1: ("max_pool_3x3", 2.0),
               2: ("skip_connect", 3.0), 3: ("sep_conv_3x3", 1.0), 4: ("dil_conv_5x5", 2.0),
               5: ("avg_pool_3x3", 4.0), 6: ("avg_pool_3x3", 1.0), 7: ("sep_conv_5x5", 1.5), 8: ("skip_connect", 0.5),
               9: ("dil_conv_3x3", 1.0), 10: ("dil_conv_3x3", 2.0), 11: ("dil_conv_3x3", 3.0),
               12: ("dil_conv_3x3", 4.0), 13: ("dil_conv_3x3", 5.0)}
REDUCE_EXPECTED = [("max_pool_3x3", 1), ("max_pool_3x3", 0),
                   ("skip_connect", 0), ("dil_conv_5x5", 2),
                   ("avg_pool_3x3", 0), ("sep_conv_5x5", 2),
                   ("dil_conv_3x3", 4), ("dil_conv_3x3", 3)]


def test_genotype_derivation_from_hand_set_alphas():
    net = SuperNet(4, 10, 3, (3, 8, 8), MEAN3, STD3)
    with torch.no_grad():
        net.alpha_normal.copy_(_alphas_from(NORMAL_SPEC, PRIMITIVES, 10.0))
        net.alpha_reduce.copy_(_alphas_from(REDUCE_SPEC, PRIMITIVES, 10.0))
    g = net.genotype()
    assert g.space == "darts"
    assert g.normal == NORMAL_EXPECTED
    assert g.reduce == REDUCE_EXPECTED
    assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]
    assert all(op != "none" for op, _ in g.normal + g.reduce)


def test_arnas_derivation_fills_three_cells():
    net = ArnasSuperNet(4, 10, 4, (3, 8, 8), MEAN3, STD3)
    assert net.alpha_names == ("accurate", "robust", "reduce")
    assert all(a.shape == (14, 7) for a in net.arch_parameters())
    with torch.no_grad():
        net.alpha_accurate.copy_(_alphas_from(NORMAL_SPEC, ARNAS_PRIMITIVES, None))
        net.alpha_robust.copy_(_alphas_from(REDUCE_SPEC, ARNAS_PRIMITIVES, None))
        net.alpha_reduce.copy_(_alphas_from(NORMAL_SPEC, ARNAS_PRIMITIVES, None))
    g = net.genotype()
    assert g.space == "arnas"
    assert g.accurate == NORMAL_EXPECTED and g.robust == REDUCE_EXPECTED and g.reduce == NORMAL_EXPECTED
    assert g.normal == g.accurate  # DARTS-compatible mirror
    # and the derived genotype builds the matching final network
    assert isinstance(build_network(g, 4, 4, 10, (3, 8, 8), MEAN3, STD3), ArnasNetwork)


def test_arch_and_weight_parameters_are_separate():
    net = SuperNet(4, 10, 3, (3, 8, 8), MEAN3, STD3)
    arch = {id(p) for p in net.arch_parameters()}
    weights = {id(p) for p in net.weight_parameters()}
    assert len(arch) == 2 and not arch & weights
    assert arch | weights == {id(p) for p in net.parameters()}
    # a forward/backward reaches both
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.arch_parameters())
    assert net.stem[1].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# genotype JSON


@pytest.mark.parametrize("name", published_names())
def test_genotype_json_round_trip(name, tmp_path):
    g = load_genotype(name)
    assert Genotype.from_json(g.to_json()) == g
    assert Genotype.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    assert g.to_dict()["space"] == g.space
    path = tmp_path / "sub" / "genotype.json"
    save_genotype(g, path)
    assert load_genotype(path) == g
    assert load_genotype(str(path)) == g


def test_published_space_inference():
    assert load_genotype("darts_v2").space == "darts"
    g = load_genotype("arnas_cifar10")
    assert g.space == "arnas"
    assert g.normal == g.accurate and g.normal_concat == g.accurate_concat
    assert g.robust[0] == ("dil_conv_5x5", 0)


def _darts_dict() -> dict:
    return load_genotype("darts_v2").to_dict()


def _arnas_dict() -> dict:
    d = load_genotype("arnas_cifar10").to_dict()
    del d["normal"], d["normal_concat"]
    return d


def _set(d: dict, key: str, value) -> dict:
    d[key] = value
    return d


def _drop(d: dict, key: str) -> dict:
    del d[key]
    return d


MALFORMED = [
    ("unknown op", lambda: _set(_darts_dict(), "normal", [["sep_conv_7x7", 0]] + _darts_dict()["normal"][1:]),
     "'normal'[0]"),
    ("index out of range", lambda: _set(_darts_dict(), "reduce", _darts_dict()["reduce"][:2] + [["skip_connect", 3]]
                                        + _darts_dict()["reduce"][3:]), "'reduce'[2]"),
    ("bool index", lambda: _set(_darts_dict(), "normal", [["skip_connect", True]] + _darts_dict()["normal"][1:]),
     "'normal'[0]"),
    ("odd number of ops", lambda: _set(_darts_dict(), "normal", _darts_dict()["normal"][:3]), "'normal'"),
    ("not a pair", lambda: _set(_darts_dict(), "reduce", ["skip_connect"] * 8), "'reduce'[0]"),
    ("missing concat", lambda: _drop(_darts_dict(), "reduce_concat"), "'reduce_concat'"),
    ("concat out of range", lambda: _set(_darts_dict(), "normal_concat", [2, 3, 4, 6]), "'normal_concat'"),
    ("concat reads an input", lambda: _set(_darts_dict(), "normal_concat", [0, 2, 3]), "'normal_concat'"),
    ("missing reduce", lambda: _drop(_darts_dict(), "reduce"), "'reduce'"),
    ("bad space", lambda: _set(_darts_dict(), "space", "nasbench"), "'space'"),
    ("arnas without robust", lambda: _drop(_arnas_dict(), "robust"), "'robust'"),
    ("arnas field on darts", lambda: _set(_set(_darts_dict(), "accurate", _darts_dict()["normal"]),
                                          "accurate_concat", [2, 3, 4, 5]), "'accurate'"),
]


@pytest.mark.parametrize("case,make,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_genotype_names_the_field(case, make, field, tmp_path):
    text = json.dumps(make())
    with pytest.raises(UserError) as info:
        Genotype.from_json(text)
    assert field in str(info.value)
    assert "\n" not in str(info.value)
    # through a file: the message names the file and still the field
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_genotype(path)
    assert field in str(info.value) and str(path) in str(info.value)


def test_bad_json_and_unknown_names():
    with pytest.raises(UserError, match="not valid JSON"):
        Genotype.from_json('{"normal": [')
    with pytest.raises(UserError, match="JSON object"):
        Genotype.from_json("[1, 2]")
    with pytest.raises(UserError) as info:
        load_genotype("darts_v3")
    assert all(name in str(info.value) for name in published_names())
    with pytest.raises(UserError, match="not found"):
        load_genotype("no/such/genotype.json")


def test_packaged_genotypes_equal_shared_copy():
    shared = Path(__file__).resolve().parents[2] / "shared" / "published_genotypes.json"
    if not shared.exists():
        pytest.skip(f"{shared} not present (installed package without the project's shared folder)")
    packaged = Path(__file__).resolve().parents[1] / "robustnas" / "nets" / "published_genotypes.json"
    assert packaged.read_bytes() == shared.read_bytes()
    assert set(published_names()) >= {"darts_v2", "advrush", "pdarts", "racl", "e2rnas", "rnas",
                                      "lrnas_cifar10", "lrnas_cifar100", "arnas_cifar10"}


# --------------------------------------------------------------------------------------------------
# final networks


@pytest.mark.parametrize("name", published_names())
def test_published_genotypes_build_and_train_step(name):
    torch.manual_seed(0)
    for shape in [(3, 8, 8), (1, 28, 28), (3, 32, 32)]:
        mean, std = [0.5] * shape[0], [0.25] * shape[0]
        net = build_network(name, 4, 4, 10, shape, mean, std, auxiliary=True, drop_path_prob=0.2)
        x = torch.rand(2, *shape)
        net.train()
        logits, aux = net(x)
        assert logits.shape == aux.shape == (2, 10)
        (logits.square().mean() + 0.4 * aux.square().mean()).backward()
        assert net.stem[1].weight.grad.abs().sum() > 0
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        net.eval()
        with torch.no_grad():
            out = net(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_arnas_placement_and_widths():
    g = load_genotype("arnas_cifar10")
    C = 4
    net = ArnasNetwork(g, C, 10, 20, (3, 32, 32), MEAN3, STD3)
    assert net.reductions == [6, 13]
    kinds = net.cell_kinds
    assert [i for i, k in enumerate(kinds) if k == "reduce"] == [6, 13]
    assert [i for i, k in enumerate(kinds) if k == "accurate"] == list(range(6)) + list(range(7, 13))
    assert [i for i, k in enumerate(kinds) if k == "robust"] == list(range(14, 20))
    widths = [cell.preprocess1[1].out_channels for cell in net.cells]
    assert widths == [C] * 6 + [2 * C] * 14  # C:2C:2C
    # cells are really built from their kind's ops
    assert isinstance(net.cells[15].ops[0], ops.DilConv) and isinstance(net.cells[0].ops[0], torch.nn.Identity)

    darts = Network(load_genotype("darts_v2"), C, 10, 20, (3, 32, 32), MEAN3, STD3)
    assert [cell.preprocess1[1].out_channels for cell in darts.cells] == [C] * 6 + [2 * C] * 7 + [4 * C] * 7
    sup = ArnasSuperNet(4, 10, 8, (3, 8, 8), MEAN3, STD3)
    assert sup.cell_kinds == ["accurate", "accurate", "reduce", "accurate", "accurate", "reduce", "robust", "robust"]


def test_network_rejects_bad_input():
    g = load_genotype("darts_v2")
    with pytest.raises(UserError, match="even size"):
        Network(g, 4, 10, 4, (3, 7, 7), MEAN3, STD3)
    with pytest.raises(UserError, match="even size"):  # 28 -> 14 -> 7: a third reduction is impossible
        Network(g, 4, 10, 6, (1, 28, 28), [0.5], [0.5], reduction_layers=[1, 3, 5])
    with pytest.raises(UserError, match="space 'arnas'"):
        Network(load_genotype("arnas_cifar10"), 4, 10, 4, (3, 8, 8), MEAN3, STD3)
    with pytest.raises(UserError, match="channels"):
        Network(g, 4, 10, 4, (1, 8, 8), MEAN3, STD3)
    with pytest.raises(UserError, match="C="):
        SuperNet(6, 10, 3, (3, 8, 8), MEAN3, STD3, partial_channels_k=4)


# published CIFAR-10 sizes (32x32x3, 10 classes), counted without the auxiliary head as the DARTS
# code's count_parameters_in_MB does
PAPER_SIZES = [("darts_v2", 36, 3.3e6), ("pdarts", 36, 3.4e6), ("advrush", 36, 4.2e6), ("arnas_cifar10", 64, 4.5e6)]


@pytest.mark.parametrize("name,C,paper", PAPER_SIZES)
def test_parameter_counts_match_papers(name, C, paper):
    torch.manual_seed(0)
    net = build_network(name, C, 20, 10, (3, 32, 32), MEAN3, STD3, auxiliary=True)
    n = sum(p.numel() for pname, p in net.named_parameters() if "auxiliary" not in pname)
    assert n == count_params(build_network(name, C, 20, 10, (3, 32, 32), MEAN3, STD3))
    print(f"{name}: {n} parameters at C={C}, 20 cells (paper {paper / 1e6:.1f}M)")
    assert abs(n - paper) / paper < 0.03


# --------------------------------------------------------------------------------------------------
# masks


def _zero_out(net: torch.nn.Module, kind: str, edge: int, op_index: int) -> None:
    """Replace one op of one edge in every cell of a kind by the zero op of the same stride."""
    for cell, k in zip(net.cells, net.cell_kinds):
        if k == kind:
            mixed = cell.edges[edge]
            mixed.ops[op_index] = ops.Zero(mixed.stride)


@pytest.mark.parametrize("k", [1, 2])
def test_masking_an_op_equals_removing_it(k):
    torch.manual_seed(3)
    net = SuperNet(8, 10, 3, (3, 8, 8), MEAN3, STD3, partial_channels_k=k).eval()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_()
    x = torch.rand(2, 3, 8, 8)
    full = net(x)
    sep = PRIMITIVES.index("sep_conv_3x3")
    normal_mask = torch.ones(14, 8, dtype=torch.bool)
    normal_mask[5, sep] = False
    reduce_mask = torch.ones(14, 8, dtype=torch.bool)
    reduce_mask[0, PRIMITIVES.index("skip_connect")] = False  # stride-2 edge: FactorizedReduce

    removed = copy.deepcopy(net)
    _zero_out(removed, "normal", 5, sep)
    _zero_out(removed, "reduce", 0, PRIMITIVES.index("skip_connect"))
    with net.masked(normal=normal_mask, reduce=reduce_mask):
        masked = net(x)
    torch.testing.assert_close(masked, removed(x))
    assert (masked - full).abs().max() > 1e-6  # the op mattered
    torch.testing.assert_close(net(x), full)  # the context restored the masks
    assert net.get_mask("normal").all()

    normal_only = copy.deepcopy(net)
    _zero_out(normal_only, "normal", 5, sep)
    net.set_mask("normal", normal_mask)
    torch.testing.assert_close(net(x), normal_only(x))
    net.reset_masks()
    torch.testing.assert_close(net(x), full)
    with pytest.raises(UserError, match="shape"):
        net.set_mask("normal", torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(UserError, match="alpha set"):
        net.set_mask("robust", normal_mask)


# --------------------------------------------------------------------------------------------------
# torch.fx


def _traced_matches(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    return gm


def test_fx_traces_supernets_and_networks():
    torch.manual_seed(4)
    x = torch.rand(2, 3, 8, 8)
    _traced_matches(SuperNet(4, 10, 3, (3, 8, 8), MEAN3, STD3), x)
    _traced_matches(SuperNet(4, 10, 3, (3, 8, 8), MEAN3, STD3, partial_channels_k=2), x)
    _traced_matches(ArnasSuperNet(4, 10, 4, (3, 8, 8), MEAN3, STD3), x)
    for name in ("darts_v2", "lrnas_cifar10", "arnas_cifar10"):
        net = build_network(name, 4, 4, 10, (3, 8, 8), MEAN3, STD3, auxiliary=True, drop_path_prob=0.3)
        gm = _traced_matches(net, x)
        # eval-mode trace holds no drop-path randomness and no auxiliary head
        assert not any("bernoulli" in str(n.target) or "auxiliary" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("budget", [50_000, 100_000, 200_000])
def test_a_parameter_budget_picks_the_largest_even_C_within_it(budget):
    from robustnas.nets.arch import build_arch
    from robustnas.data.datasets import DatasetMeta

    meta = DatasetMeta(name="t", num_classes=10, shape=(1, 28, 28), mean=(0.5,), std=(0.5,), eps="0.1",
                       classes=tuple("0123456789"), source="test")
    net, spec = build_arch("darts_v2", meta, params=budget, layers=5)
    assert spec["C"] % 2 == 0 and count_params(net) <= budget
    # the next even C breaks the budget: C is the largest that fits
    bigger = build_network("darts_v2", C=spec["C"] + 2, layers=5, num_classes=10, in_shape=(1, 28, 28),
                           mean=(0.5,), std=(0.5,))
    assert count_params(bigger) > budget


def test_a_tiny_genotype_file_builds_through_arch_and_refuses_cell_sizes(tmp_path):
    from robustnas.nets.arch import build_arch, model_from_spec
    from robustnas.data.datasets import DatasetMeta
    from robustnas.nets.spaces.tiny import TinySpace

    meta = DatasetMeta(name="t", num_classes=10, shape=(1, 28, 28), mean=(0.5,), std=(0.5,), eps="0.1",
                       classes=tuple("0123456789"), source="test")
    g = TinySpace().decode(TinySpace().smallest())
    path = tmp_path / "g.json"
    save_genotype(g, path)
    net, spec = build_arch(str(path), meta)
    rebuilt = model_from_spec(json.loads(json.dumps(spec)))
    assert count_params(rebuilt) == count_params(net)
    with pytest.raises(UserError, match="drop C"):
        build_arch(str(path), meta, C=8)
