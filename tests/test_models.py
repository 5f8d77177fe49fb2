"""Hand-crafted baselines: shapes on small inputs, parameter budgets, fx tracing, config round trip."""

from __future__ import annotations

import json
import math
import operator

import pytest
import torch
import torch.nn.functional as F
import torch.fx
from torch import nn

from robustnas.core.errors import UserError
from robustnas.nets.models import MODELS, build_model, list_models, model_from_config, width_for_params
from robustnas.nets.models.base import Normalize
from robustnas.nets.models.densenet import growth_schedule
from robustnas.nets.size import count_params

NAMES = list_models()
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
ALLOWED_MODULES = (
    nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d, nn.MaxPool2d,
    nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
)  # fmt: skip
# add and cat join branches; sub and truediv are Normalize, traced through; getitem and conv2d are a strided
# 1x1 conv (PointwiseConv2d: subsample, then a 1x1 conv), traced through.
ALLOWED_FUNCTIONS = {operator.add, torch.cat, operator.sub, operator.truediv, operator.getitem, F.conv2d}


def stats(c: int) -> tuple[list[float], list[float]]:
    return [0.5] * c, [0.25] * c


def small(name: str, shape=(1, 28, 28), width: float = 0.1, seed: int = 0, **options) -> nn.Module:
    return build_model(name, 10, shape, *stats(shape[0]), width=width, seed=seed, **options)


def test_registry_lists_all_names():
    assert NAMES == sorted(["cnn", "preact_resnet", "wrn", "mobilenetv2", "densenet", "vgg"])
    assert set(NAMES) == set(MODELS)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_on_small_inputs(name, shape):
    model = build_model(name, 7, shape, *stats(shape[0]), width=0.1, seed=0)
    assert isinstance(next(iter(model.children())), Normalize)
    sides = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            module.register_forward_hook(lambda m, i, o: sides.append(min(o.shape[-2:])))
    x = torch.rand(2, *shape, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())
    # downsampling adapts to the input: no map shrinks below 2x2 (unless the input is smaller)
    assert min(sides) >= min(2, *shape[1:])
    assert model.config["in_shape"] == list(shape)


@pytest.mark.parametrize("name", NAMES)
def test_params_grow_with_width(name):
    counts = [count_params(small(name, width=w)) for w in (0.05, 0.1, 0.2, 0.4)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts


@pytest.mark.parametrize("budget", [20_000, 100_000])
@pytest.mark.parametrize("name", NAMES)
def test_param_budget_is_met(name, budget):
    model = build_model(name, 10, (1, 28, 28), [0.5], [0.25], params=budget)
    assert abs(count_params(model) - budget) <= 0.10 * budget
    # the width found is stored, so the same model comes back from its config
    assert count_params(model_from_config(model.config)) == count_params(model)


def test_param_budget_accepts_text_and_options():
    model = build_model("wrn", 10, (1, 28, 28), [0.5], [0.25], params="50k", depth=10)
    assert model.config["depth"] == 10
    assert abs(count_params(model) - 50_000) <= 5_000


@pytest.mark.parametrize("budget", [10, 10**13])
def test_unreachable_budget_names_the_range(budget):
    with pytest.raises(UserError, match="reachable"):
        build_model("cnn", 10, (1, 28, 28), [0.5], [0.25], params=budget)


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_uses_only_interpretable_layers(name):
    model = small(name, (3, 32, 32)).eval()
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    for node in traced.graph.nodes:
        if node.op == "call_module":
            assert isinstance(modules[node.target], ALLOWED_MODULES), node.target
            if isinstance(modules[node.target], nn.ReLU):
                assert not modules[node.target].inplace
        elif node.op == "call_function":
            assert node.target in ALLOWED_FUNCTIONS, node.target
        elif node.op == "call_method":  # Normalize's channels_last layout on CPU (an identity for the bounds)
            assert node.target == "contiguous", node.target
        else:
            assert node.op in ("placeholder", "get_attr", "output"), node.op
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize(
    "name,options", [(n, {}) for n in NAMES] + [("wrn", {"depth": 10}), ("vgg", {"depth": 11})]
)
def test_config_round_trip(name, options):
    model = small(name, (3, 32, 32), width=0.15, seed=1, **options).eval()
    cfg = json.loads(json.dumps(model.config))
    rebuilt = model_from_config(cfg).eval()
    assert rebuilt.config == model.config
    assert count_params(rebuilt) == count_params(model)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), model(x))


def test_seed_fixes_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = small("cnn", seed=5), small("cnn", seed=5), small("cnn", seed=6)
    assert torch.equal(torch.rand(3), before)
    wa, wb, wc = (m.classifier.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_name_lists_known_models():
    with pytest.raises(UserError, match="preact_resnet"):
        build_model("resnet9000", 10, (3, 32, 32), *stats(3))
    with pytest.raises(UserError, match="known models"):
        width_for_params("resnet9000", 10, (3, 32, 32), 10_000)


def test_width_for_params_matches_build_model():
    width = width_for_params("cnn", 10, (3, 32, 32), 30_000)
    model = build_model("cnn", 10, (3, 32, 32), *stats(3), params=30_000)
    assert model.config["width"] == width
    assert count_params(model) == count_params(small("cnn", (3, 32, 32), width=width))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(width=0.0), "width"),
        (dict(width=float("nan")), "width"),
        (dict(width=0.5, params=10_000), "not both"),
        (dict(depth=17), "depth"),
        (dict(dilation=2), "option"),
    ],
)
def test_bad_arguments_raise_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_model("wrn", 10, (3, 32, 32), *stats(3), **kwargs)


def test_bad_shapes_and_stats_raise_user_error():
    with pytest.raises(UserError, match="one value per input channel"):
        build_model("cnn", 10, (3, 32, 32), [0.5], [0.25])
    with pytest.raises(UserError, match="in_shape"):
        build_model("cnn", 10, (32, 32), [0.5], [0.25])
    with pytest.raises(UserError, match="num_classes"):
        build_model("cnn", 0, (1, 28, 28), [0.5], [0.25])
    with pytest.raises(UserError, match="std"):
        build_model("cnn", 10, (1, 28, 28), [0.5], [0.0])


@pytest.mark.parametrize("layers,growth", [(16, 12.0), (16, 1.8), (6, 0.3), (5, 2.5)])
def test_densenet_growth_schedule_is_fractional(layers, growth):
    steps = growth_schedule(layers, growth)
    assert len(steps) == layers and min(steps) >= 1
    assert sum(steps) == max(layers, math.floor(layers * growth + 0.5))
    if growth >= 1:
        assert set(steps) <= {math.floor(growth), math.ceil(growth)}


@pytest.mark.parametrize("name", ["cnn", "mobilenetv2", "preact_resnet"])
def test_at_most_picks_the_widest_model_within_the_budget(name):
    from robustnas.nets.size import count_params

    for budget in (25_000, 60_000):
        w = width_for_params(name, 10, (1, 28, 28), budget, at_most=True)
        n = count_params(build_model(name, 10, (1, 28, 28), [0.5], [0.5], width=w))
        wider = count_params(build_model(name, 10, (1, 28, 28), [0.5], [0.5], width=w * 1.02))
        assert n <= budget < wider or n == budget
