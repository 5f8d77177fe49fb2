"""The speed paths keep results: channels_last activations, BatchNorm folding, compile fallback, step FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustnas.nets.genotypes import build_network
from robustnas.nets.models import build_model
from robustnas.nets.models.base import Normalize, set_channels_last
from robustnas.nets.models.fast import compile_model, fold_bn
from robustnas.nets.size import count_flops_of
from robustnas.nets.spaces.arnas import ArnasSuperNet

SHAPE, MEAN, STD = (1, 8, 8), [0.3], [0.3]


BUILD = {
    "darts": lambda: build_network("darts_v2", 8, 5, 10, SHAPE, MEAN, STD, reduction_layers=[0, 2], auxiliary=True),
    "arnas": lambda: build_network("arnas_cifar10", 8, 5, 10, SHAPE, MEAN, STD, reduction_layers=[0, 2]),
    "supernet": lambda: ArnasSuperNet(4, 10, 3, SHAPE, MEAN, STD),
    "cnn": lambda: build_model("cnn", 10, SHAPE, MEAN, STD, width=0.25),
    "preact_resnet": lambda: build_model("preact_resnet", 10, SHAPE, MEAN, STD, width=0.125),
    "mobilenetv2": lambda: build_model("mobilenetv2", 10, SHAPE, MEAN, STD, width=0.25),
    "tiny": lambda: _tiny(),
}


def _tiny():
    import numpy as np

    from robustnas.nets.spaces.tiny import TinySpace

    geno = TinySpace().decode(TinySpace().sample(np.random.default_rng(0)))
    return build_network(geno, None, None, 10, SHAPE, MEAN, STD)


def _net(name):
    torch.manual_seed(0)
    return BUILD[name]()


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def _loss_and_grads(net, x, y):
    x = x.clone().requires_grad_(True)
    out = net(x)
    outs = out if isinstance(out, tuple) else (out,)  # (logits, aux logits) in training mode
    logits = outs[0]
    loss = sum(F.cross_entropy(o, y) for o in outs)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x] + params, allow_unused=True)  # eval mode: the aux head is unused
    return logits.detach(), [torch.zeros(()) if g is None else g for g in grads]


@pytest.mark.parametrize("name", ["darts", "arnas", "supernet", "cnn"])
def test_channels_last_keeps_outputs_and_gradients(name):
    net = _net(name).train()
    x, y = _batch()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    set_channels_last(net, False)
    ref_logits, ref_grads = _loss_and_grads(net, x, y)
    net.load_state_dict(state)  # same BatchNorm running statistics for the second pass
    set_channels_last(net, True)
    logits, grads = _loss_and_grads(net, x, y)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_cells_run_in_channels_last_on_cpu():
    """The DARTS cells see channels_last maps by default (NCHW before), and none when switched off."""
    net = _net("darts").eval()
    seen = []
    net.cells[1].register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)
                                                                   and not o.is_contiguous()))
    net(_batch()[0])
    set_channels_last(net, False)
    net(_batch()[0])
    assert seen == [True, False]


def test_normalize_follows_its_device():
    norm = Normalize([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    x = torch.rand(2, 3, 4, 4)
    out = norm(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, (x - 0.5) / 0.2)
    assert not norm.to("meta").use_channels_last()  # off the CPU the layout is left alone


# BatchNorms that follow no conv and stay: a supernet's pools (parameter-free BN), a pre-activation block's
# first BN and the final BN before the pool (PreAct-ResNet)
LEFT_ALLOWED = {"supernet", "preact_resnet"}


@pytest.mark.parametrize("name", ["darts", "arnas", "supernet", "cnn", "preact_resnet", "mobilenetv2", "tiny"])
def test_fold_bn_keeps_eval_outputs_and_input_gradients(name):
    from robustnas.nets.ops import FactorizedReduce

    net = _net(name)
    x, y = _batch(8)
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.rand(8, *SHAPE))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_bn(net)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    n_left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert n_left < n_bn and not folded.training
    if name not in LEFT_ALLOWED:
        assert n_left == 0
    if name == "darts":  # the reduction cells' preprocessing: one BN over FactorizedReduce's two convs
        reduces = [m for m in folded.modules() if isinstance(m, FactorizedReduce)]
        assert reduces and all(isinstance(m.bn, torch.nn.Identity) for m in reduces)
    ref_logits, (ref_gx, *_) = _loss_and_grads(net, x, y)
    logits, (gx, *_) = _loss_and_grads(folded, x, y)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-3, atol=1e-6)
    for k, v in net.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k])


def test_compile_model_falls_back_to_eager():
    net = _net("cnn")

    def failing_warmup(model):
        raise RuntimeError("no compiler here")
    model, secs, err = compile_model(net, failing_warmup)
    assert model is net and "no compiler here" in err and secs >= 0


def test_count_flops_of_counts_forward_and_backward():
    lin = torch.nn.Linear(5, 3)
    x = torch.rand(4, 5, requires_grad=True)
    fwd = count_flops_of(lambda: lin(x))
    both = count_flops_of(lambda: lin(x).sum().backward())
    assert fwd == 2 * 4 * 5 * 3
    assert both == 3 * fwd  # backward: one matmul for the weight's gradient, one for the input's


@pytest.mark.parametrize("name", ["darts", "supernet"])
def test_shared_relu_keeps_outputs_and_gradients(name):
    from robustnas.nets.spaces.darts import Cell, MixedOp

    net = _net(name).train()
    x, y = _batch()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    relu_calls = []
    for mod in net.modules():
        if isinstance(mod, torch.nn.ReLU):
            mod.register_forward_hook(lambda *a: relu_calls.append(1))
    try:
        MixedOp.share_relu = Cell.share_relu = False
        ref_logits, ref_grads = _loss_and_grads(net, x, y)
        per_op = len(relu_calls)
        net.load_state_dict(state)
        MixedOp.share_relu = Cell.share_relu = True
        relu_calls.clear()
        logits, grads = _loss_and_grads(net, x, y)
    finally:
        MixedOp.share_relu = Cell.share_relu = True
    # the ops' own ReLU modules are skipped: only preprocessing and reductions still call theirs
    assert len(relu_calls) < per_op
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_count_flops_of_counts_a_depthwise_conv_backward_like_its_forward():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    x = torch.rand(2, 16, 8, 8, requires_grad=True)
    fwd = count_flops_of(lambda: conv(x))
    assert fwd == 2 * 2 * 16 * 8 * 8 * 9
    assert count_flops_of(lambda: conv(x).sum().backward()) == 3 * fwd  # grad_input and grad_weight
    x.requires_grad_(False)
    assert count_flops_of(lambda: conv(x).sum().backward()) == 2 * fwd  # grad_weight only
