"""DenseNet-BC (Huang et al. 2017), the CIFAR layout: three dense blocks with bottlenecks and compression."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from robustnas.nets.models.base import Normalize
from robustnas.nets.models.common import (
    blocks_per_stage,
    can_downsample,
    channels,
    check_args,
    make_config,
    pool_out,
)

GROWTH = 12  # DenseNet-BC-100-12 at width 1
COMPRESSION = 0.5


class Bottleneck(nn.Module):
    """BN-ReLU-1x1 conv to 4 x growth maps, BN-ReLU-3x3 conv to `growth` new maps, concatenated."""

    def __init__(self, c_in: int, growth: int):
        super().__init__()
        bottleneck = 4 * growth
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, bottleneck, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv that compresses the channels, then 2x2 average pooling if the map allows it."""

    def __init__(self, c_in: int, c_out: int, downsample: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


def growth_schedule(layers: int, growth: float) -> list[int]:
    """Integer growth per layer whose running total is round(j * growth), each at least 1.

    A fractional growth rate keeps the parameter count finely adjustable by width: one rounded growth
    rate for all layers would move it in steps of about 2/growth, far too coarse for small budgets.
    Each layer's growth is floor or ceil of `growth`, so the parameter count depends on the running
    totals only and stays non-decreasing in width.
    """
    totals = [0] + [max(j, int(math.floor(j * growth + 0.5))) for j in range(1, layers + 1)]
    return [totals[j] - totals[j - 1] for j in range(1, layers + 1)]


class DenseNet(nn.Module):
    """DenseNet-BC: stem conv (2 x growth), three dense blocks of n = (depth - 4) / 6 bottleneck layers
    with transitions halving the channels between them, final BN-ReLU, global average pool, linear.

    Width scales the growth rate (12 x width, fractional, see growth_schedule) and the stem; each
    bottleneck is 4 x its layer's growth, as in the paper.
    """

    def __init__(
        self,
        num_classes: int,
        in_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        width: float = 1.0,
        depth: int = 100,
    ):
        super().__init__()
        in_shape, mean, std, width = check_args("densenet", num_classes, in_shape, mean, std, width)
        n = blocks_per_stage("densenet", depth)
        self.config = make_config("densenet", num_classes, in_shape, mean, std, width, depth=depth)
        self.normalize = Normalize(mean, std)
        growth = GROWTH * width
        c = channels(2 * GROWTH, width)
        self.stem = nn.Conv2d(in_shape[0], c, 3, padding=1, bias=False)
        size = in_shape[1:]
        layers: list[nn.Module] = []
        for block in range(3):
            for g in growth_schedule(n, growth):
                layers.append(Bottleneck(c, g))
                c += g
            if block < 2:
                c_out = max(1, int(math.floor(c * COMPRESSION)))
                downsample = can_downsample(size)
                layers.append(Transition(c, c_out, downsample))
                size = pool_out(size) if downsample else size
                c = c_out
        self.features = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.stem(self.normalize(x)))
        out = self.relu(self.bn(out))
        return self.linear(self.flatten(self.pool(out)))
