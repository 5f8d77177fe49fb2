"""Pieces every model shares: normalization as a layer (inputs stay pixels in [0,1])."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, inside the model so that epsilons are in pixel units.

    It also decides the activations' memory layout (see `fast_layout`): on CPU the output is put in
    channels_last (values unchanged), so the convs after it run oneDNN's channels_last kernels
    (docs/performance.md). Set `channels_last = False` to keep NCHW. CUDA tensors are left as they
    are (not measured there).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.channels_last = True
        self.on_cpu = True  # kept by _apply: a plain bool, so forward has no device test under fx tracing

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.on_cpu = self.mean.device.type == "cpu"
        return self

    def use_channels_last(self) -> bool:
        return self.channels_last and self.on_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_layout((x - self.mean) / self.std, self)


def fast_layout(x: torch.Tensor, norm: Normalize) -> torch.Tensor:
    """x in channels_last when `norm` says so, else x. A 1-channel map has no channels_last form of its
    own, so models of grayscale inputs call this again after their first conv."""
    if norm.use_channels_last():
        return x.contiguous(memory_format=torch.channels_last)
    return x


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 conv with stride s (no padding), computed as a stride-1 1x1 conv of x[:, :, ::s, ::s].

    The same function, parameters and state_dict as `nn.Conv2d(c_in, c_out, 1, stride=s)`, but it never runs
    oneDNN's strided 1x1 kernel: on AVX2 CPUs (torch 2.13, oneDNN 3.12) that kernel's weight gradient on a
    channels_last input with 2-7 input channels is wrong by 40-90% and corrupts the heap (crashes, hangs;
    issue 25, benchmarks/layout_safety.py). Subsampling first is also what the strided kernel does inside
    ("reduce to unit stride"), so it costs no extra work. Every strided 1x1 conv of the models is one of these.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, bias: bool = False):
        super().__init__(c_in, c_out, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        if sh > 1 or sw > 1:
            x = x[:, :, ::sh, ::sw]
        return F.conv2d(x, self.weight, self.bias)


def conv2d(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1,
           bias: bool = False) -> nn.Conv2d:
    """nn.Conv2d, or PointwiseConv2d for a strided 1x1 conv (see there why)."""
    if kernel == 1 and stride > 1 and padding == 0 and groups == 1:
        return PointwiseConv2d(c_in, c_out, stride=stride, bias=bias)
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=bias)


def set_channels_last(model: nn.Module, on: bool) -> nn.Module:
    """Switch the channels_last layout of every Normalize in `model` (values do not change)."""
    for m in model.modules():
        if isinstance(m, Normalize):
            m.channels_last = on
    return model
