"""Helpers the hand-crafted baselines share: argument checks, width scaling, small-input downsampling.

Every baseline is built for one input shape, so the places where it downsamples are decided here, at
construction time, from the known map size; the forward pass has no shape-dependent branches and stays
torch.fx traceable.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from robustnas.core.errors import UserError
from robustnas.nets.models.base import conv2d

# A stride-2 step is taken only while the smaller side is at least this wide, so the last map is >= 2x2.
MIN_SIDE_TO_DOWNSAMPLE = 4


def channels(base: float, width: float) -> int:
    """`base` channels scaled by `width`, rounded half up, at least 1 (non-decreasing in width)."""
    return max(1, int(math.floor(base * width + 0.5)))


def can_downsample(size: tuple[int, int]) -> bool:
    return min(size) >= MIN_SIDE_TO_DOWNSAMPLE


def conv_out(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Map size after a 3x3/pad-1 or 1x1/pad-0 conv: both give ceil(n / stride)."""
    return (-(-size[0] // stride), -(-size[1] // stride))


def pool_out(size: tuple[int, int]) -> tuple[int, int]:
    """Map size after a 2x2/stride-2 pooling (floor)."""
    return (size[0] // 2, size[1] // 2)


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def conv_pool_stack(layout: Sequence, c_in: int, size: tuple[int, int], width: float) -> tuple[nn.Sequential, int]:
    """VGG-style features: conv-BN-ReLU per number in `layout` (scaled by width), "M" a 2x2 max-pool
    left out where it would shrink the map below 2x2; returns the stack and its output channels."""
    layers: list[nn.Module] = []
    for item in layout:
        if item == "M":
            if can_downsample(size):
                layers.append(nn.MaxPool2d(2))
                size = pool_out(size)
            continue
        c_out = channels(item, width)
        layers.append(conv_bn_relu(c_in, c_out))
        c_in = c_out
    return nn.Sequential(*layers), c_in


def check_args(
    name: str,
    num_classes: int,
    in_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    width: float,
) -> tuple[tuple[int, int, int], list[float], list[float], float]:
    """Validate the common constructor arguments; returns them in canonical (JSON-friendly) form."""
    try:
        shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise UserError(f"{name}: in_shape must be (channels, height, width), got {in_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"{name}: in_shape must be three positive ints (channels, height, width), got {in_shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
    try:
        mean_l = [float(m) for m in mean]
        std_l = [float(s) for s in std]
    except (TypeError, ValueError):
        raise UserError(f"{name}: mean and std must be lists of numbers, one per input channel") from None
    if len(mean_l) != shape[0] or len(std_l) != shape[0]:
        raise UserError(
            f"{name}: mean and std need one value per input channel ({shape[0]}), "
            f"got {len(mean_l)} and {len(std_l)}"
        )
    if any(not s > 0 for s in std_l):
        raise UserError(f"{name}: every std must be > 0, got {std_l}")
    try:
        width_f = float(width)
    except (TypeError, ValueError):
        raise UserError(f"{name}: width must be a positive number, got {width!r}") from None
    if not (math.isfinite(width_f) and width_f > 0):
        raise UserError(f"{name}: width must be a positive number, got {width!r}")
    return shape, mean_l, std_l, width_f


def make_config(name: str, num_classes: int, in_shape, mean, std, width: float, **options) -> dict:
    """The constructor arguments as plain JSON types, so model_from_config can rebuild the model."""
    return dict(
        name=name,
        num_classes=int(num_classes),
        in_shape=list(in_shape),
        mean=list(mean),
        std=list(std),
        width=float(width),
        **options,
    )


def check_depth(name: str, depth: int, allowed: Sequence[int]) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth not in allowed:
        raise UserError(f"{name}: depth {depth!r} is not supported; use one of {sorted(allowed)}")
    return depth


def blocks_per_stage(name: str, depth: int) -> int:
    """n for the 6n+4 depth rule of WideResNet and DenseNet-BC (three stages of n two-conv blocks)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise UserError(f"{name}: depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth!r}")
    return (depth - 4) // 6
