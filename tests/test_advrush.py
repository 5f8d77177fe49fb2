"""AdvRush: the curvature penalty (zero without curvature, the analytic value for a linear model, the
Hessian limit for small h, positive on ReLU nets, differentiable in alpha), the h schedule and the search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustnas.errors import UserError
from robustnas.search import SearchContext, build_strategy
from robustnas.search.advrush import curvature_direction, curvature_penalty

TINY = dict(C=4, layers=3, batch_size=16, epochs=2, max_batches_per_epoch=2, val_n=16, val_steps=1,
            val_curvature_n=8)


def _x(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, dtype=torch.float64, generator=g), torch.arange(n) % 3


def _linear(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()


def _neg_true_logit(logits, y):  # a loss that is linear in the logits
    return -logits.gather(1, y[:, None]).squeeze(1)


def test_direction_is_the_unit_sign_of_the_input_gradient():
    net, (x, y) = _linear(), _x()
    z = curvature_direction(net, x, y)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(xg), y, reduction="sum"), xg)
    torch.testing.assert_close(z.flatten(1).norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert torch.equal(torch.sign(z), torch.sign(g))
    assert not z.requires_grad


@pytest.mark.parametrize("penalty", ["squared", "norm"])
def test_penalty_is_zero_without_curvature(penalty):
    """A linear model under a loss linear in the logits has a constant input gradient."""
    net, (x, y) = _linear(), _x()
    p = curvature_penalty(net, x, y, 1.5, loss=_neg_true_logit, penalty=penalty)
    assert abs(p.item()) < 1e-20
    assert curvature_penalty(net, x, y, 0.0).item() == 0.0  # h = 0: the same point twice


def test_penalty_of_a_linear_model_under_cross_entropy_is_the_analytic_value():
    """grad_x CE(Wx + b, y) = W^T (softmax(Wx + b) - e_y), so the difference is W^T (p(x + hz) - p(x))."""
    net, (x, y) = _linear(1), _x(seed=1)
    W = net[1].weight
    h = 0.7
    z = curvature_direction(net, x, y)
    with torch.no_grad():
        diff = (F.softmax(net(x + h * z), 1) - F.softmax(net(x), 1)) @ W
    torch.testing.assert_close(curvature_penalty(net, x, y, h), diff.square().sum(1).mean())
    torch.testing.assert_close(curvature_penalty(net, x, y, h, penalty="norm"), diff.norm(dim=1).mean())


def test_small_steps_measure_the_hessian_along_z():
    """For a smooth model, ||grad l(x + hz) - grad l(x)||^2 / h^2 -> ||H z||^2 as h -> 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = _x(1, seed=2)
    z = curvature_direction(net, x, y)
    _, hz = torch.autograd.functional.hvp(lambda t: F.cross_entropy(net(t), y, reduction="sum"), x, z)
    expected = hz.square().sum()
    h = 1e-5
    torch.testing.assert_close(curvature_penalty(net, x, y, h) / h**2, expected, rtol=1e-4, atol=0)


def test_penalty_is_positive_for_a_relu_net_and_differentiable_in_its_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    x, y = _x(8, seed=3)
    # piecewise linear: with the loss linear in the logits, only kinks crossed between x and x + hz count
    p = curvature_penalty(net, x, y, 1.5, loss=_neg_true_logit)
    assert p.item() > 1e-3
    grads = torch.autograd.grad(p, [net[1].weight, net[3].weight])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_bad_arguments_raise_user_errors():
    net, (x, y) = _linear(), _x()
    with pytest.raises(UserError, match="h"):
        curvature_penalty(net, x, y, -1.0)
    with pytest.raises(UserError, match="penalty"):
        curvature_penalty(net, x, y, 1.0, penalty="cube")
    with pytest.raises(UserError, match="reg_warmup_epochs"):
        build_strategy("advrush", {"epochs": 4, "reg_warmup_epochs": 4})


# ------------------------------------------------------------------------------------------- the strategy
def test_h_schedules():
    code = build_strategy("advrush", {"epochs": 10, "reg_warmup_epochs": 6})
    assert [round(code.h_at(e), 6) for e in range(8)] == [0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.5, 1.5]
    ramp = build_strategy("advrush", {"epochs": 10, "reg_warmup_epochs": 6, "h_schedule": "after-warmup",
                                      "h_ramp_epochs": 3})
    assert [round(ramp.h_at(e), 6) for e in range(5, 10)] == [0.0, 0.5, 1.0, 1.5, 1.5]
    assert [ramp.penalty_on(e) for e in (5, 6)] == [False, True]
    # by default the penalty waits for the published share of the search, 50 of 60 epochs
    assert build_strategy("advrush", {"epochs": 60}).reg_warmup == 50
    assert build_strategy("advrush", {"epochs": 2}).reg_warmup == 1


def test_penalty_through_the_supernet_has_a_finite_nonzero_alpha_gradient(data):
    strat = build_strategy("advrush", TINY)
    strat.setup(SearchContext(data=data, eps=0.1, seed=1, progress=False))
    net = strat.net
    with torch.no_grad():
        net(data.train.x[:32])  # BN running statistics (the penalty uses eval mode)
    p = strat.penalty(net, data.train.x[:8], data.train.y[:8], 1.5)
    assert net.training and p.item() > 0
    for g in torch.autograd.grad(p, strat.alphas):
        assert bool(torch.isfinite(g).all()) and g.abs().sum() > 0


def test_search_turns_the_penalty_on_after_its_warmup_and_resumes_exactly(data, tmp_path):
    settings = {**TINY, "reg_warmup_epochs": 1, "h_schedule": "after-warmup", "h_ramp_epochs": 2,
                "max_batches_per_epoch": 1}

    def ctx(out, **kw):
        return SearchContext(data=data, eps=0.1, seed=2, out_dir=out, progress=False, **kw)

    full = build_strategy("advrush", settings).search(ctx(tmp_path / "full"))
    lines = [json.loads(line) for line in (tmp_path / "full" / "search.jsonl").read_text().splitlines()]
    assert [r["penalty_on"] for r in lines] == [False, True]
    assert [r["h"] for r in lines] == [0.0, 0.75]
    assert "curvature" not in lines[0] and lines[1]["curvature"] > 0
    assert lines[1]["alpha_loss"] == pytest.approx(lines[1]["ce_val"] + 0.01 * lines[1]["curvature"], rel=1e-5)
    assert all(r["val_curvature"] > 0 for r in lines)

    def kill(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_strategy("advrush", settings).search(ctx(tmp_path / "cut", on_epoch_end=kill))
    resumed = build_strategy("advrush", settings).search(ctx(tmp_path / "cut"), resume=True)
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in full.history]
    assert [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in resumed.history] == strip
    assert resumed.genotype == full.genotype


def test_the_shipped_config_is_a_valid_run_of_this_method():
    from robustnas.config import RunCommand, load_yaml, validate
    from robustnas.search.advrush import Advrush

    cmd = validate(RunCommand, load_yaml(Path(__file__).resolve().parents[1] / "configs" / "advrush.yaml"))
    strat = build_strategy(cmd.method, cmd.search)
    assert isinstance(strat, Advrush) and strat.cfg.gamma == 0.01 and strat.cfg.h_max == 1.5
    assert strat.penalty_on(strat.cfg.epochs - 1)
