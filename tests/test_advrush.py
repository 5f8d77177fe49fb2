"""AdvRush: the curvature penalty (the public code's form by default: lambda * the per-image L2 norm of the
gradient difference in the network's normalised input space, checked against an independent per-image
computation; zero without curvature, the analytic value for a linear model, the Hessian limit for small h,
differentiable in alpha through both gradients), the alpha batch, the logged gradient shares, the h schedule
and the search."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustnas.core.errors import UserError
from robustnas.nets.models.base import Normalize
from robustnas.search import SearchContext, build_strategy
from robustnas.search.advrush import curvature_direction, curvature_penalty, curvature_step

TINY = dict(C=4, layers=3, batch_size=16, epochs=2, max_batches_per_epoch=2, val_n=16, val_steps=1,
            val_curvature_n=8)
MEAN, STD = torch.tensor([0.2, 0.6]).view(1, 2, 1, 1), torch.tensor([0.3, 0.5]).view(1, 2, 1, 1)


def _x(n=6, seed=0, c=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, 4, 4, dtype=torch.float64, generator=g), torch.arange(n) % 3


def _linear(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()


def _smooth_body(seed=0) -> nn.Module:
    """A smooth two-channel net on normalised inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _neg_true_logit(logits, y):  # a loss that is linear in the logits
    return -logits.gather(1, y[:, None]).squeeze(1)


def _reference(body: nn.Module, u: torch.Tensor, y: torch.Tensor, h: float) -> torch.Tensor:
    """Independently, one image at a time in body's own input space u: ||grad l(u + h z) - grad l(u)||_2 with
    z = sign(grad l(u)) scaled to L2 length 1; differentiable in body's parameters through both gradients."""
    norms = []
    for i in range(len(u)):
        here = u[i:i + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(body(here), y[i:i + 1]), here, create_graph=True)
        s = torch.sign(g.detach())
        there = (u[i:i + 1] + h * s / s.norm()).detach().requires_grad_(True)
        (g2,) = torch.autograd.grad(F.cross_entropy(body(there), y[i:i + 1]), there, create_graph=True)
        norms.append((g2 - g).norm())
    return torch.stack(norms).mean()


# ------------------------------------------------------------------------------------------- the penalty
def test_direction_is_the_unit_sign_of_the_input_gradient():
    net, (x, y) = _linear(), _x()
    z = curvature_direction(net, x, y)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(xg), y, reduction="sum"), xg)
    torch.testing.assert_close(z.flatten(1).norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert torch.equal(torch.sign(z), torch.sign(g))
    assert not z.requires_grad


def test_the_step_has_l2_length_h_per_image_in_the_normalised_input_space():
    """The public code builds z in the network's input space, which its CIFAR transform normalises."""
    net = nn.Sequential(Normalize(MEAN.flatten(), STD.flatten()), _smooth_body()).double()
    x, y = _x(5, seed=4, c=2)
    step = curvature_step(net, x, y, 1.5, std=STD)
    torch.testing.assert_close((step / STD).flatten(1).norm(dim=1), torch.full((5,), 1.5, dtype=torch.float64))
    assert not torch.allclose(step.flatten(1).norm(dim=1), torch.full((5,), 1.5, dtype=torch.float64))
    torch.testing.assert_close(curvature_step(net, x, y, 1.5).flatten(1).norm(dim=1),  # pixel space
                               torch.full((5,), 1.5, dtype=torch.float64))


def test_default_penalty_is_the_per_image_norm_in_the_normalised_input_space():
    """Not squared, per image then averaged, in u = (x - mean) / std: equal to the independent computation
    on the body alone (fed u directly), and differentiable through both input gradients (not detached)."""
    body = _smooth_body(1)
    net = nn.Sequential(Normalize(MEAN.flatten(), STD.flatten()), body).double()
    x, y = _x(5, seed=5, c=2)
    u = (x - MEAN.double()) / STD.double()
    p = curvature_penalty(net, x, y, 0.8, std=STD)
    ref = _reference(body, u, y, 0.8)
    torch.testing.assert_close(p, ref)
    # the forms it is not: squared, or pixel-space steps and gradients
    assert not torch.allclose(curvature_penalty(net, x, y, 0.8, std=STD, penalty="squared"), ref)
    assert not torch.allclose(curvature_penalty(net, x, y, 0.8), ref)
    # the gradient reaches the weights through grad l(x) as well as grad l(x + h z)
    w = [body[1].weight, body[3].weight]
    for a, b in zip(torch.autograd.grad(p, w), torch.autograd.grad(ref, w)):
        torch.testing.assert_close(a, b)


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
    torch.testing.assert_close(curvature_penalty(net, x, y, h, penalty="squared"), diff.square().sum(1).mean())
    torch.testing.assert_close(curvature_penalty(net, x, y, h, penalty="norm"), diff.norm(dim=1).mean())


def test_small_steps_measure_the_hessian_along_z():
    """For a smooth model, ||grad l(x + hz) - grad l(x)|| / h -> ||H z|| as h -> 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = _x(1, seed=2)
    z = curvature_direction(net, x, y)
    _, hz = torch.autograd.functional.hvp(lambda t: F.cross_entropy(net(t), y, reduction="sum"), x, z)
    h = 1e-5
    torch.testing.assert_close(curvature_penalty(net, x, y, h) / h, hz.norm(), rtol=1e-4, atol=0)
    torch.testing.assert_close(curvature_penalty(net, x, y, h, penalty="squared") / h**2, hz.square().sum(),
                               rtol=1e-4, atol=0)


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
def _ctx(data, **kw):
    return SearchContext(data=data, eps=0.1, seed=kw.pop("seed", 1), progress=False, **kw)


def test_strategy_penalty_is_lambda_times_the_norm_in_the_supernets_input_space(data):
    """Default settings on the supernet: 4 * the independent per-image norm, computed on a copy whose
    Normalize layer is removed and which is fed u = (x - mean) / std."""
    strat = build_strategy("advrush", TINY)
    strat.setup(_ctx(data))
    net = strat.net
    with torch.no_grad():
        net(data.train.x[:32])  # BN running statistics (the penalty uses eval mode)
    x, y = data.train.x[:3], data.train.y[:3]
    body = copy.deepcopy(net).eval()
    assert isinstance(body.stem[0], Normalize)
    body.stem[0] = nn.Identity()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.meta.mean, data.meta.std))
    expected = 4 * _reference(body, (x - mean) / std, y, 1.5)
    p = strat.penalty(net, x, y, 1.5)
    torch.testing.assert_close(p, expected, rtol=1e-4, atol=1e-6)
    assert net.training and p.item() > 0
    for g in torch.autograd.grad(p, strat.alphas):
        assert bool(torch.isfinite(g).all()) and g.abs().sum() > 0


def test_the_alpha_step_uses_the_first_training_batch_by_default_and_the_weights_all_images(data):
    """The public code draws next(iter(...)) from an unshuffled loader over the training set every step."""
    seen = {}
    for mode in ("fixed", "split"):
        # h_max 0: the penalty is on in epoch 1 but zero, which keeps this test cheap
        strat = build_strategy("advrush", {**TINY, "alpha_batch": mode, "reg_warmup_epochs": 1, "h_max": 0.0,
                                           "val_n": 8, "val_curvature_n": 0})
        batches = []
        orig = strat.hypergradients

        def record(batch, *fns, orig=orig, batches=batches):
            batches.append(batch.x_a.clone())
            return orig(batch, *fns)

        strat.hypergradients = record
        strat.search(_ctx(data))
        seen[mode] = (strat, batches)
    strat, batches = seen["fixed"]
    assert len(batches) == 4 and len(strat.w_idx) == len(data.train)
    assert all(torch.equal(b, data.train.x[:16]) for b in batches)
    strat, batches = seen["split"]
    assert len(strat.w_idx) + len(strat.a_idx) == len(data.train)
    assert not torch.equal(batches[0], batches[1])


def test_search_logs_the_curvature_and_its_share_of_the_alpha_gradient(data, tmp_path):
    """search.jsonl carries, per epoch, the penalty and the alpha-gradient norms of CE and gamma * penalty;
    at the first step they equal the ones computed here from the same initial supernet."""
    settings = {**TINY, "epochs": 1, "max_batches_per_epoch": 1, "h_schedule": "after-warmup",
                "h_ramp_epochs": 2, "val_n": 8, "val_curvature_n": 0}
    build_strategy("advrush", settings).search(_ctx(data, out_dir=tmp_path))
    (first,) = [json.loads(line) for line in (tmp_path / "search.jsonl").read_text().splitlines()]
    assert first["h"] == 0.75 and first["penalty_on"]

    ref = build_strategy("advrush", settings)
    ref.setup(_ctx(data))
    x, y = data.train.x[:16], data.train.y[:16]
    g_ce = torch.autograd.grad(F.cross_entropy(ref.net(x), y), ref.alphas)
    pen = ref.penalty(ref.net, x, y, 0.75)
    g_pen = torch.autograd.grad(0.01 * pen, ref.alphas)
    n_ce = torch.cat([g.flatten() for g in g_ce]).norm().item()
    n_pen = torch.cat([g.flatten() for g in g_pen]).norm().item()
    assert first["curvature"] == pytest.approx(pen.item(), rel=1e-4)
    assert first["grad_ce"] == pytest.approx(n_ce, rel=1e-4)
    assert first["grad_curv"] == pytest.approx(n_pen, rel=1e-4)
    assert first["curv_share"] == pytest.approx(n_pen / (n_ce + n_pen), rel=1e-4)
    assert 0 < first["curv_share"] < 1 and -1 <= first["grad_cos"] <= 1
    assert first["alpha_loss"] == pytest.approx(first["ce_val"] + 0.01 * first["curvature"], rel=1e-5)


def test_h_schedules_and_warmup():
    code = build_strategy("advrush", {"epochs": 10})
    assert [round(code.h_at(e), 6) for e in range(8)] == [0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.5, 1.5]
    assert code.reg_warmup == 0 and code.penalty_on(0)  # the README's --a_warmup_epochs 0
    ramp = build_strategy("advrush", {"epochs": 10, "reg_warmup_epochs": 6, "h_schedule": "after-warmup",
                                      "h_ramp_epochs": 3})
    assert [round(ramp.h_at(e), 6) for e in range(5, 10)] == [0.0, 0.5, 1.0, 1.5, 1.5]
    assert [ramp.penalty_on(e) for e in (5, 6)] == [False, True]
    # None: the share of train_search.py's own default, 50 of 60 epochs
    assert build_strategy("advrush", {"epochs": 60, "reg_warmup_epochs": None}).reg_warmup == 50
    assert build_strategy("advrush", {"epochs": 2, "reg_warmup_epochs": None}).reg_warmup == 1


def test_search_turns_the_penalty_on_after_its_warmup_and_resumes_exactly(data, tmp_path):
    settings = {**TINY, "reg_warmup_epochs": 1, "h_schedule": "after-warmup", "h_ramp_epochs": 2,
                "max_batches_per_epoch": 1, "alpha_batch": "split"}

    def ctx(out, **kw):
        return SearchContext(data=data, eps=0.1, seed=2, out_dir=out, progress=False, **kw)

    full = build_strategy("advrush", settings).search(ctx(tmp_path / "full"))
    lines = [json.loads(line) for line in (tmp_path / "full" / "search.jsonl").read_text().splitlines()]
    assert [r["penalty_on"] for r in lines] == [False, True]
    assert [r["h"] for r in lines] == [0.0, 0.75]
    assert "curvature" not in lines[0] and lines[1]["curvature"] > 0
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
    from robustnas.core.config import RunCommand, load_yaml, validate
    from robustnas.search.advrush import Advrush

    cmd = validate(RunCommand, load_yaml(Path(__file__).resolve().parents[1] / "configs" / "advrush.yaml"))
    strat = build_strategy(cmd.method, cmd.search)
    assert isinstance(strat, Advrush) and strat.cfg.gamma == 0.01 and strat.cfg.h_max == 1.5
    assert strat.penalty_on(strat.cfg.epochs - 1)
