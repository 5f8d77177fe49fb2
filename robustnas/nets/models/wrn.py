"""WideResNet (Zagoruyko & Komodakis 2016): WRN-depth-k with k = width, the RobustBench workhorse."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from robustnas.nets.models.base import Normalize
from robustnas.nets.models.common import blocks_per_stage, channels, check_args, make_config
from robustnas.nets.models.resnet import make_stage

STEM_CHANNELS = 16
STAGE_CHANNELS = (16, 32, 64)


class WideResNet(nn.Module):
    """Stem conv (16 channels, not widened, as in the paper), three pre-activation stages of
    16k-32k-64k channels with n = (depth - 4) / 6 blocks each, final BN-ReLU, global average pool, linear.

    No dropout: the adversarial-training literature trains WRNs without it.
    """

    def __init__(
        self,
        num_classes: int,
        in_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        width: float = 1.0,
        depth: int = 16,
    ):
        super().__init__()
        in_shape, mean, std, width = check_args("wrn", num_classes, in_shape, mean, std, width)
        n = blocks_per_stage("wrn", depth)
        self.config = make_config("wrn", num_classes, in_shape, mean, std, width, depth=depth)
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_shape[0], STEM_CHANNELS, 3, padding=1, bias=False)
        c_in, size = STEM_CHANNELS, in_shape[1:]
        stages = []
        for i, base in enumerate(STAGE_CHANNELS):
            c_out = channels(base, width)
            stage, size = make_stage(c_in, c_out, n, downsample=i > 0, size=size)
            stages.append(stage)
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(self.normalize(x)))
        out = self.relu(self.bn(out))
        return self.linear(self.flatten(self.pool(out)))
