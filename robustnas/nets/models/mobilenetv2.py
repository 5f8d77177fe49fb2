"""MobileNetV2 (Sandler et al. 2018), small-image variant: inverted residuals with depthwise convs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from robustnas.nets.models.base import Normalize
from robustnas.nets.models.common import can_downsample, channels, check_args, conv_bn_relu, conv_out, make_config

# (expansion t, channels c, repeats n, stride s) as in the paper, with the second stage at stride 1 and a
# stride-1 stem: the usual layout for 32x32 inputs (three downsamplings instead of five).
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; identity shortcut when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu(c_in, hidden, kernel=1))
        layers.append(conv_bn_relu(hidden, hidden, stride=stride, groups=hidden))
        layers.append(nn.Conv2d(hidden, c_out, 1, bias=False))
        layers.append(nn.BatchNorm2d(c_out))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + x if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with ReLU in place of ReLU6: the bound propagation (certify.py) interprets plain ReLU
    only, and the clipping at 6 is there for low-precision deployment, not for accuracy or robustness.

    Width scales every channel count, the last 1280-channel conv included, so that tiny budgets are
    reachable (the paper keeps 1280 for widths below 1).
    """

    def __init__(
        self,
        num_classes: int,
        in_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        width: float = 1.0,
    ):
        super().__init__()
        in_shape, mean, std, width = check_args("mobilenetv2", num_classes, in_shape, mean, std, width)
        self.config = make_config("mobilenetv2", num_classes, in_shape, mean, std, width)
        self.normalize = Normalize(mean, std)
        c_in = channels(STEM_CHANNELS, width)
        layers: list[nn.Module] = [conv_bn_relu(in_shape[0], c_in)]
        size = in_shape[1:]
        for t, c, n, s in SETTINGS:
            c_out = channels(c, width)
            for i in range(n):
                stride = s if i == 0 and can_downsample(size) else 1
                layers.append(InvertedResidual(c_in, c_out, stride, t))
                size = conv_out(size, stride)
                c_in = c_out
        c_last = channels(LAST_CHANNELS, width)
        layers.append(conv_bn_relu(c_in, c_last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.normalize(x))
        return self.classifier(self.flatten(self.pool(out)))
