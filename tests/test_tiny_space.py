"""The tiny-block space: encoding <-> genotype <-> network, weight sharing by slicing, exact extraction,
BatchNorm recalibration, and the parameter range the space covers."""

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

from robustnas.core.errors import UserError
from robustnas.nets.models.base import Normalize
from robustnas.nets.size import count_params
from robustnas.nets.spaces.tiny import (BLOCKS, SKIP, STAGES, TinyBlock, TinyGenotype, TinyNetwork, TinySpace, TinySuperNet,
                                   layer_frequencies, model_spec, network_from_spec, recalibrate_bn)

MNIST = ((1, 28, 28), [0.3], [0.35])
CIFAR = ((3, 32, 32), [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])


def supernet(shape=MNIST, width_mult=1, seed=0):
    torch.manual_seed(seed)
    return TinySuperNet(10, shape[0], shape[1], shape[2], width_mult)


def random_encodings(space, n, seed=0):
    rng = np.random.default_rng(seed)
    return [space.sample(rng) for _ in range(n)] + [space.largest(), space.smallest()]


def read_architecture(net: TinyNetwork):
    """(block, width) per layer, read back from the built modules alone."""
    layers = []
    for m in net.layers:
        if isinstance(m, nn.Identity):
            layers.append(("skip", layers[-1][1]))
            continue
        convs = [c for c in m.body if isinstance(c, nn.Conv2d)]
        assert isinstance(m.body[-1], nn.BatchNorm2d)  # linear end: the branch may start at zero
        if len(convs) == 3:
            expand, dw, project = convs
            assert dw.groups == dw.in_channels == dw.out_channels
            layers.append((f"mb{dw.kernel_size[0]}_e{expand.out_channels // expand.in_channels}",
                           project.out_channels))
        elif len(convs) == 2:
            assert convs[0].groups == convs[0].in_channels and convs[1].kernel_size == (1, 1)
            layers.append(("sep3", convs[1].out_channels))
        else:
            assert isinstance(m.body[0], nn.ReLU) and convs[0].kernel_size == (3, 3) and convs[0].groups == 1
            layers.append(("conv3", convs[0].out_channels))
    return layers


def perturb_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


# ----------------------------------------------------------------------------------------- encoding
def test_space_layout_follows_the_lists():
    space = TinySpace()
    assert space.n_layers == sum(n for _, n, _ in STAGES)
    assert space.n_var == 2 * space.n_layers
    xl, xu = space.bounds()
    assert (xl == 0).all() and list(xu[::2]) == [len(BLOCKS) - 1] * space.n_layers
    assert all(SKIP not in space.allowed_blocks(i) for i in range(space.n_layers) if space.first_in_stage[i])
    assert TinySpace(2).layer_widths[0] == tuple(2 * w for w in STAGES[0][2])


def test_encoding_genotype_network_round_trip():
    space = TinySpace()
    for x in random_encodings(space, 40, seed=1):
        assert space.canonical(x) == x and space.check(x) == x
        g = space.decode(x)
        g2 = TinyGenotype.from_json(g.to_json())
        assert g2 == g and space.encode(g2) == x
        net = TinyNetwork(g2, 10, *MNIST)
        assert read_architecture(net) == g.layers
        # the network rebuilt from its model.json spec is the same architecture
        rebuilt = network_from_spec(model_spec(g, 10, *MNIST))
        assert read_architecture(rebuilt) == g.layers


def test_canonical_form_makes_encodings_and_networks_one_to_one():
    space = TinySpace()
    x = space.largest()
    x[2] = SKIP  # layer 1 is not the first of its stage
    y = list(x)
    y[3] = 0 if x[1] != 0 else 1  # a different (redundant) width gene on the skip layer
    assert space.canonical(x) == space.canonical(y)
    assert space.decode(x) == space.decode(y)
    assert space.canonical(x)[3] == x[1]


@pytest.mark.parametrize("bad, what", [
    (lambda x: x[:-1], "needs"),
    (lambda x: x[:1] + [99] + x[2:], "outside"),
    (lambda x: [SKIP] + x[1:], "cannot be 'skip'"),
    (lambda x: ["a"] + x[1:], "integers"),
])
def test_bad_encodings_raise_user_errors(bad, what):
    space = TinySpace()
    with pytest.raises(UserError, match=what):
        space.check(bad(space.largest()))


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(space="darts"), "space"),
    (lambda d: d["layers"].__setitem__(2, ["mb7_e2", 16]), r"layers\[2\]"),
    (lambda d: d["layers"].__setitem__(1, ["skip", 999]), r"layers\[1\]"),
    (lambda d: d["layers"].__setitem__(0, ["skip", 16]), r"layers\[0\]"),
    (lambda d: d["layers"].__setitem__(4, ["conv3", 33]), r"layers\[4\]"),
    (lambda d: d["layers"].pop(), "layers"),
    (lambda d: d.update(encoding=[0] * 22), "encoding"),
])
def test_malformed_genotypes_name_the_field(edit, field):
    d = TinySpace().decode(TinySpace().largest()).to_dict()
    edit(d)
    with pytest.raises(UserError, match=field):
        TinyGenotype.from_dict(d)


# ----------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_extracted_subnet_computes_what_the_supernet_computes(shape):
    net = supernet(shape)
    perturb_bn(net)
    x = torch.rand(3, *shape[0])
    for enc in random_encodings(net.space, 6, seed=2):
        sub = net.extract(enc)
        for training in (False, True):  # running statistics, then batch statistics
            net.train(training)
            sub.train(training)
            with torch.no_grad(), net.active(enc):
                expected = net(x)
            got = sub(x)
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (enc, training)


def test_extracted_subnet_is_standalone_and_traceable():
    net = supernet()
    allowed = (Normalize, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear,
               nn.Identity)
    for enc in random_encodings(net.space, 4, seed=3):
        sub = net.extract(enc)
        graph = fx.symbolic_trace(sub)
        leaves = [m for m in sub.modules() if not list(m.children())]
        assert all(isinstance(m, allowed) for m in leaves)
        x = torch.rand(2, *MNIST[0])
        sub.eval()
        assert torch.equal(graph(x), sub(x))
        # copied, not shared: editing the subnet leaves the supernet alone
        net.eval()
        with torch.no_grad(), net.active(enc):
            before = net(x)
            for p in sub.parameters():
                p.add_(1.0)
            assert torch.equal(net(x), before)


@pytest.mark.parametrize("c_in, c_out", [(24, 24), (24, 16), (16, 32)])
def test_stride_one_blocks_add_a_channel_matched_shortcut(c_in, c_out):
    x = torch.randn(2, c_in, 5, 5)
    for block in ("mb5_e3", "sep3", "conv3"):
        fresh = TinyBlock(block, c_in, c_out, stride=1).eval()
        expected = x[:, :c_out] if c_out <= c_in else torch.cat([x, x.new_zeros(2, c_out - c_in, 5, 5)], 1)
        assert torch.equal(fresh(x), expected)  # a fresh branch adds nothing
        perturb_bn(fresh)
        assert torch.allclose(fresh(x) - fresh.body(x), expected, atol=1e-6)
        strided = TinyBlock(block, c_in, c_out, stride=2).eval()
        assert not strided.shortcut and strided(x).shape == (2, c_out, 3, 3)


def test_bound_propagation_reads_extracted_subnets():
    from robustnas.robustness.certify import crown_bounds, ibp_bounds

    net = supernet(((1, 8, 8), [0.3], [0.35]))
    perturb_bn(net)
    x = torch.rand(2, 1, 8, 8)
    for enc in random_encodings(net.space, 2, seed=7):
        sub = net.extract(enc).eval()
        out = sub(x)
        for lo, hi in (ibp_bounds(sub, x, 0.01), crown_bounds(sub, x, 0.01)):
            assert (lo <= out + 1e-4).all() and (out <= hi + 1e-4).all()


# ----------------------------------------------------------------------------------------- weight sharing
def test_weight_slices_share_storage_with_the_largest_weights():
    net = supernet()
    layer = net.layers[3]
    full = layer.mb_dw.weight
    w = layer.mb_dw.sliced_weight(c_in=48, c_out=48, kernel=3)
    assert w.shape == (48, 1, 3, 3)
    assert w.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    assert w.data_ptr() == full[0, 0, 1, 1].data_ptr()  # the centre of the 5x5 kernel
    with torch.no_grad():
        w[0, 0, 0, 0] = 123.0
    assert full[0, 0, 1, 1].item() == 123.0
    p = layer.mb_project.sliced_weight(c_in=96, c_out=40, kernel=1)
    assert p.untyped_storage().data_ptr() == layer.mb_project.weight.untyped_storage().data_ptr()


def test_narrow_subnets_use_exactly_the_leading_channels():
    net = supernet()
    perturb_bn(net)  # residual branches start at zero: give them weight
    net.eval()
    space = net.space
    small = space.smallest()
    x = torch.rand(2, *MNIST[0])
    with torch.no_grad(), net.active(small):
        before = net(x)
    layer = net.layers[space.n_layers - 3]  # first layer of the last stage: a sep3 at the smallest width
    c_out = space.decode(small).layers[space.n_layers - 3][1]
    with torch.no_grad():
        layer.sep_pw.weight[c_out:] += 1.0  # channels the small subnet does not use
        with net.active(small):
            assert torch.equal(net(x), before)
        layer.sep_pw.weight[:c_out] += 1.0  # channels it does use
        with net.active(small):
            assert not torch.allclose(net(x), before)


def test_training_a_subnet_moves_only_its_slice_and_the_shared_weights_reach_others():
    net = supernet()
    space = net.space
    small, large = space.smallest(), space.largest()
    net.train()
    with net.active(small):
        net(torch.rand(4, *MNIST[0])).sum().backward()
    layer = net.layers[0]
    c_in, c_out = space.stem, space.decode(small).layers[0][1]
    g = layer.sep_pw.weight.grad
    assert g[:c_out, :c_in].abs().sum() > 0
    assert g[c_out:].abs().sum() == 0 and g[:, c_in:].abs().sum() == 0
    assert layer.mb_expand.weight.grad is None  # blocks not chosen get no gradient at all
    # a running statistic in training mode updates only the leading entries (the slice is a view)
    rm = layer.sep_bn2.running_mean
    assert rm[:c_out].abs().sum() > 0 and rm[c_out:].abs().sum() == 0
    # an update of the largest subnet changes the weights the small subnet reads
    net.eval()
    with torch.no_grad(), net.active(small):
        before = net(torch.ones(1, *MNIST[0]))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.zero_grad()
    net.train()
    with net.active(large):
        net(torch.rand(4, *MNIST[0])).pow(2).sum().backward()
    opt.step()
    net.eval()
    with torch.no_grad(), net.active(small):
        assert not torch.allclose(net(torch.ones(1, *MNIST[0])), before)


# ----------------------------------------------------------------------------------------- BN recalibration
def test_recalibration_estimates_the_statistics_of_the_given_batches():
    net = supernet()
    perturb_bn(net)
    sub = net.extract(net.space.sample(np.random.default_rng(4)))
    batches = [torch.rand(16, *MNIST[0]) * (i + 1) / 3 for i in range(3)]
    recalibrate_bn(sub, batches)
    assert not sub.training
    with torch.no_grad():
        conv_out = torch.cat([sub.stem[0](sub.normalize(b)) for b in batches])
    bn = sub.stem[1]
    assert torch.allclose(bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1  # the caller's momentum is back
    # the supernet itself is untouched
    assert not torch.allclose(net.stem[1].running_mean, bn.running_mean)


# ----------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_parameter_counts_span_the_tiny_range(shape):
    net = supernet(shape)
    space = net.space
    counts = {}
    for name, enc in (("smallest", space.smallest()), ("largest", space.largest())):
        sub = net.extract(enc)
        fresh = TinyNetwork(space.decode(enc), 10, *shape)
        assert count_params(sub) == count_params(fresh)
        counts[name] = count_params(sub)
    samples = [count_params(net.extract(e)) for e in random_encodings(net.space, 20, seed=5)[:20]]
    print(f"\n{shape}: smallest {counts['smallest']}, largest {counts['largest']}, "
          f"random median {int(np.median(samples))}, supernet {count_params(net)}")
    assert 5_000 <= counts["smallest"] <= 15_000
    assert 1_500_000 <= counts["largest"] <= 2_500_000
    assert all(counts["smallest"] < c < counts["largest"] for c in samples)


def test_width_x2_doubles_every_channel():
    space1, space2 = TinySpace(1), TinySpace(2)
    enc = space1.largest()
    g1, g2 = space1.decode(enc), space2.decode(enc)
    assert [w * 2 for _, w in g1.layers] == [w for _, w in g2.layers] and space2.stem == 2 * space1.stem
    p1 = count_params(TinyNetwork(g1, 10, *MNIST))
    p2 = count_params(TinyNetwork(g2, 10, *MNIST))
    assert 3.5 < p2 / p1 < 4.1  # dominated by the C_in x C_out convolutions


def test_layer_frequencies_count_blocks_and_widths():
    space = TinySpace()
    encs = random_encodings(space, 10, seed=6)
    freq = layer_frequencies(encs)
    blocks, widths = np.array(freq["blocks"]), np.array(freq["widths"])
    assert blocks.shape == (space.n_layers, len(BLOCKS))
    assert np.allclose(blocks.sum(1), 1) and np.allclose(widths.sum(1), 1)
    largest = BLOCKS.index("mb5_e6")
    expected = sum(e[0] == largest for e in encs) / len(encs)
    assert blocks[0, largest] == pytest.approx(expected)


def test_genotype_params_equals_counting_the_built_network():
    from robustnas.nets.size import count_params
    from robustnas.nets.spaces.tiny import TinyNetwork, TinySpace, genotype_params

    rng = np.random.default_rng(5)
    for width_mult, in_shape in ((1, (1, 28, 28)), (2, (3, 32, 32))):
        space = TinySpace(width_mult)
        for x in [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(6)]:
            g = space.decode(x)
            net = TinyNetwork(g, 10, in_shape, (0.5,) * in_shape[0], (0.5,) * in_shape[0])
            assert genotype_params(g, 10, in_shape[0]) == count_params(net)


def test_shrink_lowers_the_parameter_count_until_no_change_can():
    from robustnas.nets.spaces.tiny import TinySpace, genotype_params

    space, rng = TinySpace(), np.random.default_rng(2)
    for _ in range(3):
        x = space.sample(rng)
        counts = [genotype_params(space.decode(x), 10, 1)]
        while (y := space.shrink(x, rng)) != x:
            x = y
            counts.append(genotype_params(space.decode(x), 10, 1))
        assert all(b < a for a, b in zip(counts, counts[1:])) and len(counts) > 5
        assert counts[-1] < 20_000  # it reaches the small end of the space (smallest: about 9k)
