"""Candidate operations of the DARTS cell space, in the shape of the DARTS `OPS` dict.

`OPS[name](C, stride, affine)` builds one op mapping C channels to C channels (spatial size halved
when stride is 2). Every op is made only of Conv2d, BatchNorm2d, ReLU (not in place), pooling,
Identity, slicing, concatenation, addition and multiplication, so that models built from them can be
traced with torch.fx and bounded by interval/linear bound propagation (robustnas.robustness.certify).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from robustnas.nets.models.base import PointwiseConv2d


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv -> BN: the pre-activation conv block DARTS uses for cell preprocessing."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise (dilated) conv -> pointwise conv -> BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation,
                      groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def after_relu(self, x: torch.Tensor) -> torch.Tensor:
        """The op on an input that already went through its ReLU (one ReLU shared by several ops)."""
        return self[3](self[2](self[1](x)))


class SepConv(nn.Sequential):
    """Two stacked separable convs (the first carries the stride), as in DARTS."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine=affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine=affine),
        )

    def after_relu(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](self[0].after_relu(x))


def starts_with_relu(op: nn.Module) -> bool:
    """Whether `op` is ReLU -> rest with an `after_relu(x)` that runs the rest (DilConv, SepConv)."""
    return isinstance(op, (DilConv, SepConv))


class Zero(nn.Module):
    """The `none` op: zeros of the output shape, so a cell edge can be switched off."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x * 0.0
        return x[:, :, :: self.stride, :: self.stride] * 0.0


class FactorizedReduce(nn.Module):
    """Halve the spatial size with two 1x1 stride-2 convs on offset grids, concatenated.

    Needs an even input size: the two paths disagree by one pixel on odd sizes (the networks check
    this at construction time).
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = PointwiseConv2d(C_in, C_out // 2, stride=2)
        self.conv_2 = PointwiseConv2d(C_in, C_out // 2, stride=2)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        return self.bn(out)


OpFactory = Callable[[int, int, bool], nn.Module]

OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(stride),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "skip_connect": lambda C, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
}


def has_parameters(op: str, stride: int = 1) -> bool:
    """Whether `op` carries weights at this stride: pools, `none` and a stride-1 skip do not; a stride-2
    skip does (FactorizedReduce)."""
    from robustnas.nets.size import count_params

    return count_params(OPS[op](2, stride, True)) > 0


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of a branch with probability drop_prob, rescaling the rest (DARTS training)."""
    keep_prob = 1.0 - drop_prob
    mask = torch.bernoulli(torch.full((x.shape[0], 1, 1, 1), keep_prob, device=x.device, dtype=x.dtype))
    return x / keep_prob * mask
