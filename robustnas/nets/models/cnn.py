"""The small CNN of the demo: cheap enough to train adversarially on two CPU cores."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from robustnas.nets.models.base import Normalize, fast_layout
from robustnas.nets.models.common import check_args, conv_pool_stack, make_config

# Channels per conv, "M" is a 2x2 max-pool; two pools keep 28x28 inputs at >= 7x7 before the head.
LAYOUT = (32, 32, "M", 64, 64, "M", 128)


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks with max-pooling, then global average pooling and one linear layer."""

    def __init__(
        self,
        num_classes: int,
        in_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        width: float = 1.0,
    ):
        super().__init__()
        in_shape, mean, std, width = check_args("cnn", num_classes, in_shape, mean, std, width)
        self.config = make_config("cnn", num_classes, in_shape, mean, std, width)
        self.normalize = Normalize(mean, std)
        self.features, c_in = conv_pool_stack(LAYOUT, in_shape[0], tuple(in_shape[1:]), width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        for i, layer in enumerate(self.features):
            out = layer(out)
            if i == 0:  # a 1-channel input has no channels_last form: set the layout after the first conv
                out = fast_layout(out, self.normalize)
        return self.classifier(self.flatten(self.pool(out)))
