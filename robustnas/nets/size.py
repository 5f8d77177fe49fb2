"""The one place that measures model size: parameter count and FLOPs ("100k"-style budgets are parsed by
core/config.py's parse_count)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; shared tensors are counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one image of `input_shape` (C, H, W), via torch's FlopCounterMode.

    Runs in eval mode (restoring the caller's mode) so BatchNorm statistics are untouched.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kw) -> int:
    """A conv's backward: each of grad_input and grad_weight costs what its forward costs. torch's own
    formula ignores `groups` for grad_weight and counts a depthwise conv's weight gradient C times."""
    spatial = grad_out_shape if not transposed else x_shape
    fwd = 2 * spatial[0] * w_shape[0] * math.prod(spatial[2:]) * math.prod(w_shape[1:])
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops_of(fn) -> int:
    """FLOPs of everything fn() runs, forward and backward (FlopCounterMode: convs and matmuls; conv
    backward counted with groups, see _conv_backward_flops)."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        fn()
    return int(counter.get_total_flops())


