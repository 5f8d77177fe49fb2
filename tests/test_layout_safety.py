"""The channels_last default is safe on this CPU (issue 25).

On AVX2 CPUs oneDNN's strided 1x1 conv computes a wrong weight gradient for channels_last inputs with 2-7
channels and corrupts the heap (benchmarks/layout_safety.py): a PreAct-ResNet of width 0.1 crashed 6 of 6
processes. The models route every strided 1x1 conv through PointwiseConv2d. Each check runs in its own
process, several times, under glibc's malloc checks where the debug library exists, because heap corruption
shows up as a crash at some later point or not at all; gradients are compared with a float64 NCHW copy so
that a wrong kernel that does not crash fails too. On a CPU without the faulty kernel (AVX-512) these pass
either way.
"""

import os
import subprocess
import sys

import pytest
import torch

from robustnas.nets.models.base import PointwiseConv2d

MALLOC_DEBUG = "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
PROCESSES = 6

REPRO = r"""
import copy, sys, torch
from robustnas.nets.genotypes import build_network
from robustnas.nets.models import build_model
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
nets = {
    # the issue's reproduction: shortcut convs 6->13, 13->26, 26->51 at stride 2
    "preact_resnet": (build_model("preact_resnet", 7, (3, 32, 32), [0.5] * 3, [0.25] * 3, width=0.1, seed=0), 3),
    # FactorizedReduce of 4 channels (a reduction cell's preprocess and skip_connect) on 28x28 maps
    "darts_v2": (build_network("darts_v2", 4, 3, 10, (1, 28, 28), [0.5], [0.25]), 1),
}
worst = 0.0
for name, (model, c) in nets.items():
    model.train()
    for i in range(10):
        x = torch.rand(2, c, 32 if c == 3 else 28, 32 if c == 3 else 28)
        model.zero_grad()
        model(x).square().sum().backward()
    ref = copy.deepcopy(model).double()
    ref.load_state_dict(model.state_dict())
    for m in ref.modules():
        if hasattr(m, "channels_last"):
            m.channels_last = False
    model.zero_grad(); ref.zero_grad()
    model(x).square().sum().backward()
    ref(x.double()).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        err = ((p.grad.double() - q.grad).abs().max() / (q.grad.abs().max() + 1e-12)).item()
        worst = max(worst, err)
        if err > 1e-3:
            print(f"{name}: {n} gradient off by {err:.2e}")
print(f"worst relative gradient error {worst:.1e}")
sys.exit(1 if worst > 1e-3 else 0)
"""


def run_repro(threads: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if os.path.exists(MALLOC_DEBUG):
        env.update(LD_PRELOAD=MALLOC_DEBUG, GLIBC_TUNABLES="glibc.malloc.check=3")
    # the limit only turns a hang into a failure; a run takes a few seconds
    return subprocess.run([sys.executable, "-c", REPRO, str(threads)], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("threads", [1, 2])
def test_models_train_in_channels_last_without_corruption(threads):
    results = [run_repro(threads) for _ in range(PROCESSES // 2)]
    failed = [r for r in results if r.returncode != 0]
    assert not failed, "\n".join(f"exit {r.returncode}: {r.stdout[-500:]} {r.stderr[-500:]}" for r in failed)


def test_pointwise_conv_is_a_strided_1x1_conv():
    """Same function and parameters as nn.Conv2d(c_in, c_out, 1, stride=2), odd and even sides, with bias."""
    torch.manual_seed(0)
    for side in (7, 8, 10, 16):
        conv = PointwiseConv2d(5, 9, stride=2, bias=True)
        plain = torch.nn.Conv2d(5, 9, 1, stride=2, bias=True)
        plain.load_state_dict(conv.state_dict())
        x = torch.randn(3, 5, side, side, dtype=torch.float64)
        torch.testing.assert_close(conv.double()(x), plain.double()(x))
        assert set(conv.state_dict()) == {"weight", "bias"}
