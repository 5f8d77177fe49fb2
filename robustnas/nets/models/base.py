"""Pieces every model shares: normalization as a layer (inputs stay pixels in [0,1])."""

from __future__ import annotations

from typing import Sequence

import torch
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


def set_channels_last(model: nn.Module, on: bool) -> nn.Module:
    """Switch the channels_last layout of every Normalize in `model` (values do not change)."""
    for m in model.modules():
        if isinstance(m, Normalize):
            m.channels_last = on
    return model
