"""Hand-crafted baselines, width-scalable so they can be compared with searched cells at equal size.

Every model normalizes inside (first layer `Normalize`), ends with global average pooling and one linear
layer, adapts its downsampling to the input size at construction, and is torch.fx traceable with only
the layer types the bound propagation interprets. `model.config` holds the constructor arguments as
JSON types; `model_from_config` rebuilds the same architecture from it.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import torch
from torch import nn

from robustnas.core.errors import UserError
from robustnas.nets.models.base import Normalize
from robustnas.nets.models.cnn import SmallCNN
from robustnas.nets.models.common import check_args
from robustnas.nets.models.densenet import DenseNet
from robustnas.nets.models.mobilenetv2 import MobileNetV2
from robustnas.nets.models.resnet import PreActResNet
from robustnas.nets.models.vgg import VGG
from robustnas.nets.models.wrn import WideResNet
from robustnas.nets.size import count_params
from robustnas.core.config import format_count, parse_count

__all__ = [
    "MODELS",
    "Normalize",
    "build_model",
    "list_models",
    "model_from_config",
    "width_for_params",
]

# name -> constructor(num_classes, in_shape, mean, std, width, **options); options such as `depth`.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "preact_resnet": PreActResNet,
    "wrn": WideResNet,
    "mobilenetv2": MobileNetV2,
    "densenet": DenseNet,
    "vgg": VGG,
}

# Widths searched for a parameter budget: at MIN_WIDTH every scaled channel count is 1; 16 is the widest
# WideResNet in common use (WRN-70-16).
MIN_WIDTH = 1e-3
MAX_WIDTH = 16.0
PARAMS_TOLERANCE = 0.10

_COMMON_ARGS = ("num_classes", "in_shape", "mean", "std", "width")


def list_models() -> list[str]:
    return sorted(MODELS)


def _constructor(name: str) -> Callable[..., nn.Module]:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return MODELS[name]


def _check_options(name: str, options: dict) -> None:
    allowed = [p for p in inspect.signature(MODELS[name]).parameters if p not in _COMMON_ARGS]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise UserError(f"model {name!r} has no option {', '.join(unknown)}; its options: {known}")


def _count_at(name: str, num_classes: int, in_shape: tuple[int, int, int], width: float, options: dict) -> int:
    """Parameter count of the model at `width`, built on the meta device (no memory, no init cost)."""
    c = in_shape[0]
    with torch.device("meta"):
        model = MODELS[name](num_classes, in_shape, [0.0] * c, [1.0] * c, width, **options)
    return count_params(model)


def width_for_params(
    name: str, num_classes: int, in_shape: Sequence[int], params: int | str, at_most: bool = False, **options
) -> float:
    """The width whose model has the parameter count nearest to `params` (within 10%); with `at_most`,
    the widest model with no more than `params` (budgets as ceilings, for matched comparisons).

    Parameter count is non-decreasing in width, so bisection (on log width) finds the two widths either
    side of the budget; the nearer wins, then the width is shortened to as few digits as keep its count.
    """
    _constructor(name)
    _check_options(name, options)
    target = parse_count(params)
    if target < 1:
        raise UserError(f"parameter budget must be positive, got {params!r}")
    c = _channels(in_shape)
    in_shape = check_args(name, num_classes, in_shape, [0.0] * c, [1.0] * c, 1.0)[0]

    seen: dict[float, int] = {}

    def count(w: float) -> int:
        if w not in seen:
            seen[w] = _count_at(name, num_classes, in_shape, w, options)
        return seen[w]

    lo, hi = MIN_WIDTH, MAX_WIDTH
    p_lo, p_hi = count(lo), count(hi)
    if not p_lo <= target <= p_hi:
        raise UserError(
            f"{name} cannot have {target} parameters for input {tuple(in_shape)} and {num_classes} classes; "
            f"reachable: {format_count(p_lo)} to {format_count(p_hi)} (widths {MIN_WIDTH} to {MAX_WIDTH})"
        )
    if p_lo == target:
        return lo
    # invariant: count(lo) < target <= count(hi)
    while hi / lo > 1 + 1e-6:
        mid = math.sqrt(lo * hi)
        if count(mid) < target:
            lo = mid
        else:
            hi = mid
    best = (hi if count(hi) == target else lo) if at_most else min((lo, hi), key=lambda w: abs(count(w) - target))
    best_count = count(best)
    if abs(best_count - target) > PARAMS_TOLERANCE * target:
        raise UserError(
            f"{name} has no width within {PARAMS_TOLERANCE:.0%} of {target} parameters "
            f"(nearest: {count(lo)} and {count(hi)}); choose another budget or model"
        )
    for digits in range(2, 12):
        short = float(f"{best:.{digits}g}")
        if count(short) == best_count:
            return short
    return best


def _channels(in_shape: Sequence[int]) -> int:
    try:
        return max(1, int(in_shape[0]))
    except (TypeError, ValueError, IndexError):
        raise UserError(f"in_shape must be (channels, height, width), got {in_shape!r}") from None


def build_model(
    name: str,
    num_classes: int,
    in_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    width: float | None = None,
    params: int | str | None = None,
    seed: int | None = None,
    at_most: bool = False,
    **options,
) -> nn.Module:
    """Build a baseline at `width` (default 1), or at the width whose size is nearest `params` (with
    `at_most`: the widest within it).

    `options` are model-specific (`depth` for preact_resnet, wrn, densenet, vgg). With `seed`, the
    initial weights come from that seed without touching the global random state.
    """
    ctor = _constructor(name)
    _check_options(name, options)
    if width is not None and params is not None:
        raise UserError("give either a width or a parameter budget, not both")
    if params is not None:
        width = width_for_params(name, num_classes, in_shape, params, at_most=at_most, **options)
    elif width is None:
        width = 1.0
    if seed is None:
        return ctor(num_classes, in_shape, mean, std, width, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ctor(num_classes, in_shape, mean, std, width, **options)


def model_from_config(cfg: dict) -> nn.Module:
    """Rebuild a model from its `config` dict (as saved in model.json); weights are loaded separately."""
    if not isinstance(cfg, dict):
        raise UserError(f"model config must be a mapping, got {type(cfg).__name__}")
    missing = [k for k in ("name",) + _COMMON_ARGS if k not in cfg]
    if missing:
        raise UserError(f"model config is missing {', '.join(missing)}")
    options = {k: v for k, v in cfg.items() if k not in ("name",) + _COMMON_ARGS}
    return build_model(
        cfg["name"],
        cfg["num_classes"],
        tuple(cfg["in_shape"]),
        cfg["mean"],
        cfg["std"],
        width=cfg["width"],
        **options,
    )
