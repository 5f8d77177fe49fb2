"""Pre-activation ResNet (He et al. 2016, "Identity Mappings"): the usual adversarial-training baseline."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from robustnas.nets.models.base import Normalize, conv2d
from robustnas.nets.models.common import can_downsample, channels, check_args, check_depth, conv_out, make_config

# depth -> blocks per stage (two 3x3 convs per block); 18 is the RobustBench PreActResNet-18.
DEPTHS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_CHANNELS = (64, 128, 256, 512)


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a projection shortcut reads the pre-activated input, as in the paper.

    Also the WideResNet block (Zagoruyko & Komodakis use the same pre-activation layout).
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.project = stride != 1 or c_in != c_out
        self.shortcut = conv2d(c_in, c_out, 1, stride=stride) if self.project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = self.shortcut(out) if self.project else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


def make_stage(c_in: int, c_out: int, blocks: int, downsample: bool, size: tuple[int, int]):
    """A run of pre-activation blocks; the first one strides when `downsample` and the map is big enough."""
    stride = 2 if downsample and can_downsample(size) else 1
    layers = []
    for i in range(blocks):
        layers.append(PreActBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1))
    return nn.Sequential(*layers), conv_out(size, stride)


class PreActResNet(nn.Module):
    """Stem conv, four stages (64-128-256-512 x width), final BN-ReLU, global average pool, linear."""

    def __init__(
        self,
        num_classes: int,
        in_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        width: float = 1.0,
        depth: int = 18,
    ):
        super().__init__()
        in_shape, mean, std, width = check_args("preact_resnet", num_classes, in_shape, mean, std, width)
        blocks = DEPTHS[check_depth("preact_resnet", depth, DEPTHS)]
        self.config = make_config("preact_resnet", num_classes, in_shape, mean, std, width, depth=depth)
        self.normalize = Normalize(mean, std)
        c_in = channels(STAGE_CHANNELS[0], width)
        self.stem = nn.Conv2d(in_shape[0], c_in, 3, padding=1, bias=False)
        size = in_shape[1:]
        stages = []
        for i, (base, n) in enumerate(zip(STAGE_CHANNELS, blocks)):
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
