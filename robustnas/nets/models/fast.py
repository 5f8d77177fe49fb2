"""Speed helpers that keep a model's function: BatchNorm folded into convs for eval-mode use, and
torch.compile with an eager fallback. docs/performance.md has the measured effect of each."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import nn

from robustnas.nets.models.resnet import PreActBlock
from robustnas.nets.ops import FactorizedReduce

# modules whose forward feeds a conv's output straight into a BatchNorm and nowhere else, outside a Sequential:
# (conv attribute, BatchNorm attribute) pairs that fold_bn folds too
FOLDABLE_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {PreActBlock: (("conv1", "bn2"),)}  # + WideResNet's


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, lo: int = 0) -> None:
    """Fold output channels lo.. of an eval-mode `bn` into `conv` in place (adds a bias)."""
    n = conv.out_channels
    mean, var = bn.running_mean[lo:lo + n], bn.running_var[lo:lo + n]
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale, shift = bn.weight[lo:lo + n] * scale, bn.bias[lo:lo + n] + bn.weight[lo:lo + n] * shift
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    with torch.no_grad():
        conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
            and bn.running_mean is not None)


def fold_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm2d that directly follows a Conv2d (in a Sequential,
    after FactorizedReduce's two convs, or a pair of FOLDABLE_PAIRS) folded into that conv: y = W'x + b' with W' = W*g/sqrt(var+e),
    b' = beta - mean*g/sqrt(var+e). Same outputs and input gradients up to float rounding. For attacks
    and evaluation only: the copy has no BatchNorm to train, and `model` itself is not changed."""
    folded = copy.deepcopy(model).eval()
    for m in folded.modules():
        if isinstance(m, FactorizedReduce) and isinstance(m.bn, nn.BatchNorm2d) and m.conv_1.bias is None:
            _folded(m.conv_1, m.bn, 0)
            _folded(m.conv_2, m.bn, m.conv_1.out_channels)
            m.bn = nn.Identity()
        elif isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                if _foldable(m[i], m[i + 1]):
                    _folded(m[i], m[i + 1])
                    m[i + 1] = nn.Identity()
        for conv_name, bn_name in FOLDABLE_PAIRS.get(type(m), ()):
            if _foldable(getattr(m, conv_name), getattr(m, bn_name)):
                _folded(getattr(m, conv_name), getattr(m, bn_name))
                setattr(m, bn_name, nn.Identity())
    return folded


def compile_model(model: nn.Module, warmup: Callable[[nn.Module], Any], **options: Any) -> tuple[nn.Module, float, str]:
    """torch.compile(model, **options), compiled by running `warmup(compiled)` once (compilation is lazy).
    Returns (compiled model, seconds the warm-up took, ""), or when compiling or the warm-up fails,
    (model itself, seconds lost, the reason): the eager model is a clean fallback."""
    t = time.perf_counter()
    try:
        compiled = torch.compile(model, **options)
        warmup(compiled)
        return compiled, time.perf_counter() - t, ""
    except Exception as e:  # no C++ compiler here, an op inductor cannot lower, ...
        torch._dynamo.reset()
        return model, time.perf_counter() - t, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
