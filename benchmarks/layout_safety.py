"""Is channels_last safe on this CPU? Every conv / pool class the networks use, checked against float64.

Issue 25: on a 2-core AVX2 AMD EPYC (torch 2.13.0, oneDNN 3.12, CPU capability AVX2) a PreAct-ResNet of width
0.1 crashed ("free(): invalid next size", "Segmentation fault") or hung in backward(). The kernel is oneDNN's
`jit_avx2_1x1_convolution_bwd_weights_t` (seen in gdb in the hung process): the weight gradient of a 1x1 conv
with stride 2 on a channels_last input with 2 to 7 input channels (fewer than AVX2's 8 floats) is wrong by
40-90% from 10x10 maps up and corrupts the heap; NCHW, stride 1, and 8 or more input channels are right.

Minimal reproduction (crashes, hangs or prints a large error on such a CPU; prints ~1e-7 elsewhere):

    python benchmarks/layout_safety.py --repro

The sweep runs each class (conv kernel / stride / dilation / groups, max and average pooling, BatchNorm) over
input channels 1..9, 12, 13, 16, 17, 24, 26, 32, map sides 4..32 and batches 2 and 8, in channels_last and NCHW,
each class in a forked child under glibc's malloc checks (so heap corruption aborts the child instead of
passing silently) with a time limit, and compares the output, input gradient and weight gradient with a
float64 NCHW reference. It prints one line per class and layout: cases, worst relative error, crashed or hung
children, and the failing shapes. `--model` runs the models' own path: every class the networks build
(`robustnas.nets.models.base.PointwiseConv2d` for strided 1x1 convs) must pass in channels_last.

    python benchmarks/layout_safety.py            # the sweep (6 min here with one class hung 30-60 s and a
                                                  # stray process beside it)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# imported here, not in the forked children: an import in a child of a forked process can hang
from robustnas.nets.models.base import PointwiseConv2d

CHANNELS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 24, 26, 32)
SIDES = (4, 7, 10, 16, 28, 32)
BATCHES = (2, 8)
# float32 against float64 on these sizes: convs and pools ~1e-6, a wrong kernel 1e-1 and more. BatchNorm in
# channels_last sums its gamma gradient over n*h*w (up to 8,192) float32 terms with cancellation (x-hat has
# mean 0): 2e-4..9e-4 measured (NCHW: ~1e-5), rounding rather than a wrong kernel, so its own tolerance.
TOL = {"bn": 2e-3}
TOL_DEFAULT = 1e-4

# (name, kind, kernel, stride, dilation, depthwise)
CLASSES = [
    ("conv1x1 s1", "conv", 1, 1, 1, False),
    ("conv1x1 s2", "conv", 1, 2, 1, False),
    ("conv3x3 s1", "conv", 3, 1, 1, False),
    ("conv3x3 s2", "conv", 3, 2, 1, False),
    ("conv5x5 s1", "conv", 5, 1, 1, False),
    ("conv3x3 d2", "conv", 3, 1, 2, False),
    ("dw3x3 s1", "conv", 3, 1, 1, True),
    ("dw3x3 s2", "conv", 3, 2, 1, True),
    ("dw5x5 s2", "conv", 5, 2, 1, True),
    ("dw3x3 d2", "conv", 3, 1, 2, True),
    ("dw5x5 d2 s2", "conv", 5, 2, 2, True),
    ("maxpool3 s2", "maxpool", 3, 2, 1, False),
    ("avgpool3 s1", "avgpool", 3, 1, 1, False),
    ("batchnorm", "bn", 1, 1, 1, False),
]


def make_op(kind: str, c: int, k: int, s: int, d: int, dw: bool, model_path: bool) -> nn.Module:
    if kind == "conv":
        c_out = c if dw else 2 * c + 1
        if model_path and k == 1 and s > 1:
            return PointwiseConv2d(c, c_out, stride=s, bias=False)
        return nn.Conv2d(c, c_out, k, stride=s, padding=d * (k // 2), dilation=d, groups=c if dw else 1, bias=False)
    if kind == "maxpool":
        return nn.MaxPool2d(k, s, k // 2)
    if kind == "avgpool":
        return nn.AvgPool2d(k, s, k // 2, count_include_pad=False)
    return nn.BatchNorm2d(c)


def reference(op: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, input gradient and weight gradient in float64, NCHW."""
    ref = __import__("copy").deepcopy(op).double()
    xd = x.detach().double().contiguous().requires_grad_(True)
    y = ref(xd)
    y.backward(g.double().contiguous())
    w = getattr(ref, "weight", None)
    return y.detach(), xd.grad, (w.grad if w is not None else torch.zeros(1, dtype=torch.float64))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / (b.abs().max() + 1e-12)).item()


def check_class(spec, layout: str, model_path: bool, conn) -> None:
    """Child: every shape of one class; sends (cases, worst error, failing shapes)."""
    name, kind, k, s, d, dw = spec
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    cases, worst, bad = 0, 0.0, []
    for c in CHANNELS:
        for side in SIDES:
            if side < d * (k - 1) + 1:
                continue
            for n in BATCHES:
                op = make_op(kind, c, k, s, d, dw, model_path).train()
                x = torch.rand(n, c, side, side).contiguous(memory_format=fmt).requires_grad_(True)
                y = op(x)
                g = torch.rand_like(y).contiguous(memory_format=fmt)
                y.backward(g)
                yd, gxd, gwd = reference(op, x, g)
                w = getattr(op, "weight", None)
                err = max(rel(y.detach(), yd), rel(x.grad, gxd), rel(w.grad, gwd) if w is not None else 0.0)
                cases += 1
                worst = max(worst, err)
                if err > TOL.get(kind, TOL_DEFAULT):
                    bad.append(f"c{c}/{side}x{side}/n{n}:{err:.2f}")
    conn.send((cases, worst, bad))
    conn.close()


def run_class(spec, layout: str, model_path: bool, timeout: float) -> str:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=check_class, args=(spec, layout, model_path, child))
    p.start()
    child.close()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return f"{spec[0]:<12} {layout:<14} HUNG (no answer in {timeout:.0f} s)"
    if p.exitcode != 0 or not parent.poll():
        return f"{spec[0]:<12} {layout:<14} CRASHED (exit code {p.exitcode})"
    cases, worst, bad = parent.recv()
    verdict = "ok" if not bad else f"WRONG in {len(bad)}: " + " ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
    return f"{spec[0]:<12} {layout:<14} {cases:4d} cases, worst rel. error {worst:.1e}  {verdict}"


def repro(model_path: bool) -> None:
    """The smallest failing case: one 1x1 stride-2 conv, 6 -> 13 channels, 2 images of 32x32, channels_last."""
    torch.manual_seed(0)
    errors = []
    for _ in range(20):
        conv = make_op("conv", 6, 1, 2, 1, False, model_path)
        conv.out_channels  # noqa: B018 (both classes are nn.Conv2d)
        x = torch.rand(2, 6, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        y = conv(x)
        g = torch.rand_like(y).contiguous(memory_format=torch.channels_last)
        y.backward(g)
        errors.append(rel(conv.weight.grad, reference(conv, x, g)[2]))
    print(f"weight-gradient relative error, worst of 20: {max(errors):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repro", action="store_true", help="the minimal reproduction only (plain nn.Conv2d)")
    ap.add_argument("--model", action="store_true", help="strided 1x1 convs through the models' PointwiseConv2d")
    ap.add_argument("--only", default="", help="comma-separated class names (default: all)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds a class may take before it counts as hung")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, malloc checks {'on' if os.environ.get('GLIBC_TUNABLES') else 'off'}")
    if args.repro:
        repro(args.model)
        return
    t = time.perf_counter()
    failed = 0
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    for spec in [c for c in CLASSES if not only or c[0] in only]:
        for layout in ("channels_last", "nchw"):
            line = run_class(spec, layout, args.model, args.timeout)
            failed += not line.rstrip().endswith("ok")
            print(line, flush=True)
    print(f"classes failing: {failed} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    # glibc's malloc checks turn silent heap corruption into an abort of the child; they need the debug
    # library preloaded, so the script re-executes itself once with it when it is there.
    debug = "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
    if os.path.exists(debug) and "GLIBC_TUNABLES" not in os.environ:
        env = dict(os.environ, LD_PRELOAD=debug, GLIBC_TUNABLES="glibc.malloc.check=3")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    main()
