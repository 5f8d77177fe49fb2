"""VGG with batch norm (Simonyan & Zisserman 2015), the small-image layout: one linear layer on top."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from robustnas.nets.models.base import Normalize
from robustnas.nets.models.common import check_args, check_depth, conv_pool_stack, make_config

# depth -> conv channels, "M" a 2x2 max-pool (configurations A, B, D, E of the paper).
LAYOUTS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """conv-BN-ReLU stacks with max-pooling, global average pool, linear.

    Pools that would shrink the map below 2x2 are left out, so 8x8 and 28x28 inputs work too.
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
        in_shape, mean, std, width = check_args("vgg", num_classes, in_shape, mean, std, width)
        layout = LAYOUTS[check_depth("vgg", depth, LAYOUTS)]
        self.config = make_config("vgg", num_classes, in_shape, mean, std, width, depth=depth)
        self.normalize = Normalize(mean, std)
        self.features, c_in = conv_pool_stack(layout, in_shape[0], tuple(in_shape[1:]), width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.normalize(x))
        return self.classifier(self.flatten(self.pool(out)))
