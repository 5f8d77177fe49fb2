"""DSRNA: the Jacobian metric (against torch's Jacobian and finite differences, unbiased projections,
differentiable in weights), the certified-bound metric through the supernet (sound on sampled
perturbations, differentiable in alpha), and the dsrna strategy (alpha objective, logging, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustnas.robustness.attacks import pgd
from robustnas.robustness.certify import margin_lower_bound, radius_bracket
from robustnas.core.errors import UserError
from robustnas.robustness.jacobian import dual_order, frobenius_sq_estimate, jacobian_metric, jacobian_row_norms
from robustnas.search import SearchContext, build_strategy
from robustnas.search.dsrna import Dsrna, certified_bound_metric
from robustnas.search.supernet import SearchBatch
from robustnas.nets.spaces.darts import SuperNet

TINY = dict(C=4, layers=3, batch_size=16, epochs=2, max_batches_per_epoch=2, val_n=16, val_steps=1,
            val_metric_n=8)


def _smooth_net(seed: int = 0) -> nn.Module:
    """A small conv net with tanh: smooth, so finite differences are accurate in double precision."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 12, 5)).double()


def _x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _torch_jacobian(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, K, d) per-sample Jacobians from torch.autograd.functional.jacobian, one sample at a time."""
    rows = [torch.autograd.functional.jacobian(lambda z: net(z[None])[0], xi).reshape(-1, xi.numel()) for xi in x]
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------- the Jacobian metric
@pytest.mark.parametrize("q", [1.0, 2.0])
def test_exact_row_norms_match_torch_jacobian(q):
    net, x = _smooth_net(), _x()
    J = _torch_jacobian(net, x)
    ours = jacobian_row_norms(net, x, q)
    torch.testing.assert_close(ours, torch.linalg.vector_norm(J, ord=q, dim=2), rtol=1e-10, atol=1e-12)
    assert ours.requires_grad  # create_graph: a loss built on it can be differentiated again


def test_exact_row_norms_match_finite_differences():
    net, x = _smooth_net(2), _x(3, seed=5)
    d, h = x[0].numel(), 1e-6
    fd = torch.zeros(3, 5, d, dtype=torch.float64)
    with torch.no_grad():
        for j in range(d):
            e = torch.zeros(d, dtype=torch.float64)
            e[j] = h
            e = e.view(1, *x.shape[1:])
            fd[:, :, j] = (net(x + e) - net(x - e)) / (2 * h)
    for q in (1.0, 2.0):
        torch.testing.assert_close(jacobian_row_norms(net, x, q, create_graph=False),
                                   torch.linalg.vector_norm(fd, ord=q, dim=2), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_exact_metric_is_the_published_formula_and_linear_in_eps(norm):
    net, x = _smooth_net(), _x()
    J = _torch_jacobian(net, x)
    q = dual_order(norm)
    expected = -(0.1 / 5) * torch.linalg.vector_norm(J, ord=q, dim=2).sum(1).mean()
    torch.testing.assert_close(jacobian_metric(net, x, 0.1, norm), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(jacobian_metric(net, x, 0.3, norm), 3 * expected, rtol=1e-10, atol=0)
    assert jacobian_metric(net, x, 0.0, norm).item() == 0.0


@pytest.mark.parametrize("projection", ["sphere", "gaussian"])
def test_projection_estimate_is_unbiased(projection):
    net, x = _smooth_net(3), _x(3, seed=7)
    exact = _torch_jacobian(net, x).square().sum((1, 2))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([frobenius_sq_estimate(net, x, projection=projection, generator=g, create_graph=False)
                         for _ in range(3000)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert bool((draws.std(0) > 0.05 * exact).all())  # one draw is noisy: this is an estimate
    assert bool(((mean - exact).abs() < 4 * se).all()), (mean, exact, se)
    # the `projections` argument averages draws: many of them land near the exact value
    many = frobenius_sq_estimate(net, x, projections=2000, projection=projection, generator=g)
    torch.testing.assert_close(many, exact, rtol=0.1, atol=0)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_projection_metric_has_the_scale_of_the_frobenius_bound(norm):
    """Many projections: R -> -(eps/K) * c_q * sqrt(K) * mean ||J||_F, an upper bound on the exact sum."""
    net, x = _smooth_net(4), _x()
    J = _torch_jacobian(net, x)
    c = math.sqrt(x[0].numel()) if norm == "Linf" else 1.0
    bound = -(0.1 / 5) * c * math.sqrt(5) * J.square().sum((1, 2)).sqrt().mean()
    g = torch.Generator().manual_seed(1)
    proj = jacobian_metric(net, x, 0.1, norm, mode="projection", projections=3000, generator=g)
    torch.testing.assert_close(proj, bound, rtol=0.05, atol=0)
    assert proj.item() <= jacobian_metric(net, x, 0.1, norm).item()


@pytest.mark.parametrize("mode", ["exact", "projection"])
def test_metric_gradient_in_the_weights_matches_finite_differences(mode):
    net, x = _smooth_net(5), _x()
    w = net[0].weight
    direction = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def metric() -> torch.Tensor:  # the same projections at every call
        return jacobian_metric(net, x, 0.1, "Linf", mode, generator=torch.Generator().manual_seed(9))

    (grad,) = torch.autograd.grad(metric(), w)
    h = 1e-6
    with torch.no_grad():
        w += h * direction
        plus = metric().item()
        w -= 2 * h * direction
        minus = metric().item()
        w += h * direction
    fd = (plus - minus) / (2 * h)
    assert abs(fd) > 1e-6
    assert abs((grad * direction).sum().item() - fd) < 1e-5 * abs(fd)


def test_bad_arguments_raise_user_errors():
    net, x = _smooth_net(), _x()
    with pytest.raises(UserError, match="eps"):
        jacobian_metric(net, x, -0.1)
    with pytest.raises(UserError, match="norm"):
        jacobian_metric(net, x, 0.1, "L3")
    with pytest.raises(UserError, match="mode"):
        jacobian_metric(net, x, 0.1, mode="fast")
    with pytest.raises(UserError, match="projections"):
        frobenius_sq_estimate(net, x, projections=0)
    with pytest.raises(UserError, match="logits"):
        jacobian_metric(nn.Identity(), x, 0.1)


# ------------------------------------------------------------------------------------------- the supernet
def _supernet(data, k: int = 1, seed: int = 0) -> SuperNet:
    """A tiny supernet whose BatchNorm running statistics have seen some data (the bounds use them)."""
    m = data.meta
    torch.manual_seed(seed)
    net = SuperNet(4, 10, 3, m.shape, m.mean, m.std, partial_channels_k=k)
    with torch.no_grad():
        net.alpha_normal.normal_(0, 0.5)  # ops weigh differently, as they do during a search
        net.alpha_reduce.normal_(0, 0.5)
        net.train()
        for i in range(0, 96, 32):
            net(data.train.x[i:i + 32])
    return net.eval()


def _margins(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = net(x)
    true = z.gather(1, y[:, None]).squeeze(1)
    return true - z.scatter(1, y[:, None], float("-inf")).max(1).values


@pytest.mark.parametrize("method,k", [("ibp", 1), ("crown-ibp", 1), ("ibp", 2)])
def test_certified_bound_is_sound_on_sampled_perturbations_of_the_supernet(data, method, k):
    net = _supernet(data, k)
    x, y = data.val.x[:4], data.val.y[:4]
    for eps in (1e-4, 1e-3):
        with torch.no_grad():
            bound = margin_lower_bound(net, x, y, eps, method)
        g = torch.Generator().manual_seed(0)
        # random points of the ball and random corners, clipped to the pixel box, all in one batch
        u = torch.rand(40, *x.shape, generator=g)
        deltas = torch.cat([(2 * u - 1) * eps, torch.sign(u - 0.5) * eps])
        points = (x[None] + deltas).clamp(0, 1).reshape(-1, *x.shape[1:])
        sampled = _margins(net, points, y.repeat(len(deltas))).view(len(deltas), len(x))
        worst = torch.minimum(sampled.min(0).values, _margins(net, x, y))
        assert bool((bound <= worst + 1e-4).all()), (method, eps, bound, worst)
    # not vacuous at a tiny radius: the bound closes in on the clean margin
    with torch.no_grad():
        tiny = margin_lower_bound(net, x, y, 1e-8, method)
    torch.testing.assert_close(tiny, _margins(net, x, y), rtol=0, atol=1e-2)


def _dsrna(data, eps: float = 0.01, **kw) -> Dsrna:
    strat = build_strategy("dsrna", {**TINY, **kw})
    strat.setup(SearchContext(data=data, eps=eps, seed=3, progress=False))
    with torch.no_grad():
        strat.net.train()
        strat.net(data.train.x[:32])  # BN running statistics away from their initial values
    return strat


@pytest.mark.parametrize("settings", [
    {"metric": "jacobian", "jacobian_mode": "exact"},
    {"metric": "jacobian", "jacobian_mode": "projection"},
    {"metric": "cb", "cb_method": "ibp", "cb_form": "margin"},
    {"metric": "cb", "cb_method": "crown-ibp", "cb_form": "asinh"},
    {"metric": "combined", "cb_method": "ibp", "cb_form": "margin"},
])
def test_alpha_gradient_of_each_metric_is_nonzero_and_finite(data, settings):
    strat = _dsrna(data, **settings)
    x, y = data.train.x[:4], data.train.y[:4]
    r, parts = strat.metric(strat.net, x, y)
    assert strat.net.training  # the caller's mode is back
    grads = torch.autograd.grad(r, strat.alphas)
    for g in grads:
        assert bool(torch.isfinite(g).all()) and g.abs().sum() > 0
    if settings["metric"] == "combined":
        assert set(parts) == {"metric_jacobian", "metric_cb"}
        torch.testing.assert_close(r, parts["metric_jacobian"] + parts["metric_cb"])
    assert all(a.grad is None for a in strat.alphas)


def test_default_certified_bound_is_a_radius_that_is_certified_and_not_vacuous(data):
    """The default cb metric on a supernet at the search eps 0.1 is the mean certified radius (CROWN over zonotope
    intermediate bounds): for each image the radius' margin bound is >= 0 and the bracket's upper end's is < 0,
    within 10%; it lies in (0, eps], its alpha gradient is finite and nonzero, and no PGD-50 margin attack at that
    radius flips the image. The margin bound at eps itself (the form before) is vacuous on the same images."""
    strat = _dsrna(data, metric="cb", C=2, cb_n=2, eps=0.1)
    assert (strat.cfg.cb_form, strat.cfg.cb_method, strat.cfg.cb_n) == ("radius", "crown-zono", 2)
    net = strat.net.eval()
    x = data.val.x[:2]
    with torch.no_grad():
        y = net(x).argmax(1)  # radii of the supernet's own predictions (an untrained supernet is mostly wrong)
    r, parts = strat.metric(net, x, y)
    grads = torch.autograd.grad(r, strat.alphas)
    for g in grads:
        assert bool(torch.isfinite(g).all()) and g.abs().sum() > 0
    lo, hi = radius_bracket(net, x, y, "crown-zono", 0.1, rtol=0.1)
    torch.testing.assert_close(r.detach(), lo.mean())
    assert bool((lo > 0).all()) and bool((hi <= 0.1).all()) and bool((hi <= lo * 1.1 + 1e-12).all())
    with torch.no_grad():
        assert bool((margin_lower_bound(net, x, y, lo, "crown-zono") >= 0).all())
        inner = hi > lo
        assert bool((margin_lower_bound(net, x[inner], y[inner], hi[inner], "crown-zono") < 0).all())
        at_eps = margin_lower_bound(net, x, y, 0.1, "crown-zono")
    assert bool((at_eps < 0).all())  # the margin form is vacuous here; the radius is not
    for i in range(len(y)):
        x_adv = pgd(net, x[i:i + 1], y[i:i + 1], lo[i].item(), steps=50, loss="margin",
                    generator=torch.Generator().manual_seed(0))
        assert _margins(net, x_adv, y[i:i + 1]).item() > 0


def test_default_radius_stays_measurable_on_a_trained_supernet(data):
    """Interval intermediate bounds compound through a supernet's dense DAG of eight-op mixtures (every node sums
    every earlier one), and more so once it is trained: after 40 SGD steps the CROWN-IBP radius of correctly
    classified images is below 1/100 of the default's (0 or ~5e-7 against ~5e-3 measured). The default's radius is
    certified (its margin bound >= 0) and a PGD-50 margin attack at it flips nothing (the test above checks the
    metric's gradient)."""
    m = data.meta
    torch.manual_seed(0)
    net = SuperNet(4, 10, 3, m.shape, m.mean, m.std)
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(40):
        idx = torch.randint(0, len(data.train.x), (32,), generator=g)
        loss = F.cross_entropy(net(data.train.x[idx]), data.train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        right = (net(data.val.x[:32]).argmax(1) == data.val.y[:32]).nonzero().flatten()[:2]
    assert len(right) == 2
    x, y = data.val.x[right], data.val.y[right]
    lo, _ = radius_bracket(net, x, y, "crown-zono", 0.1, rtol=0.1)
    ibp_lo, _ = radius_bracket(net, x, y, "crown-ibp", 0.1, rtol=0.1)
    assert bool((lo > 0).all()) and bool((ibp_lo < lo / 100).all())
    with torch.no_grad():
        assert bool((margin_lower_bound(net, x, y, lo, "crown-zono") >= 0).all())
    for i in range(len(y)):
        x_adv = pgd(net, x[i:i + 1], y[i:i + 1], lo[i].item(), steps=50, loss="margin",
                    generator=torch.Generator().manual_seed(0))
        assert _margins(net, x_adv, y[i:i + 1]).item() > 0


def test_radius_gradient_matches_finite_differences_in_alpha(data):
    """The implicit-function gradient of the radius (dm/dalpha over the secant of m in eps) against central
    differences of radii bisected to 1e-3 relative, along the gradient's own direction: the radius grows along
    it at the predicted rate within 10% (2% measured). With IBP, whose bound is piecewise smooth in eps and alpha;
    CROWN's adaptive lower ReLU slope jumps between 0 and 1, so its bound is discontinuous and finite differences
    scatter (1.5x and 2.3x the gradient measured): the default's ascent is checked by the test below."""
    method = "ibp"
    strat = _dsrna(data, metric="cb", C=2, cb_method=method, eps=0.1)
    net = strat.net.eval()
    x = data.val.x[:1]
    with torch.no_grad():
        y = net(x).argmax(1)
    alphas = strat.alphas
    r = certified_bound_metric(net, x, y, 0.1, method, "radius", rtol=1e-2)
    grads = torch.autograd.grad(r, alphas)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    direction = [g / norm for g in grads]
    base = [a.detach().clone() for a in alphas]

    def radius_at(t: float) -> float:
        with torch.no_grad():
            for a, b, d in zip(alphas, base, direction):
                a.copy_(b + t * d)
            return radius_bracket(net, x, y, method, 0.1, rtol=1e-3)[0].mean().item()

    h = 0.1
    fd = (radius_at(h) - radius_at(-h)) / (2 * h)
    assert abs(fd - norm) <= 0.1 * norm, (fd, norm)


def test_forward_intermediate_bounds_are_sound_tighter_than_intervals_and_differentiable(data):
    """crown-fwd (forward linear intermediate bounds, backward final bound) on a supernet with max/avg pools,
    skips and separable/dilated convs at the search eps: at most the margin at random points of the ball and
    at the point a PGD-50 margin attack finds, at least the IBP and CROWN-IBP bounds of each image, and its
    alpha gradient (through the final backward pass) is finite and nonzero. PC-DARTS (k=2): the channel
    shuffle goes through the vmapped forward step too."""
    net = _supernet(data, k=2)
    x, y = data.val.x[:3], data.val.y[:3]
    eps = 0.1
    bound = margin_lower_bound(net, x, y, eps, "crown-fwd")
    grads = torch.autograd.grad(bound.sum(), [net.alpha_normal, net.alpha_reduce])
    for g in grads:
        assert bool(torch.isfinite(g).all()) and g.abs().sum() > 0
    bound = bound.detach()
    with torch.no_grad():
        ibp = margin_lower_bound(net, x, y, eps, "ibp")
        crown_ibp = margin_lower_bound(net, x, y, eps, "crown-ibp")
    assert bool((bound >= crown_ibp - 1e-5).all()) and bool((crown_ibp >= ibp - 1e-5).all())
    assert bool((ibp < 0).all()) and bool((bound > ibp / 5).all())  # far tighter than intervals (6.7-9.8x here)
    u = torch.rand(30, *x.shape, generator=torch.Generator().manual_seed(1))
    points = (x[None] + (2 * u - 1) * eps).clamp(0, 1).reshape(-1, *x.shape[1:])
    sampled = _margins(net, points, y.repeat(30)).view(30, len(x)).min(0).values
    x_adv = pgd(net, x, y, eps, steps=50, loss="margin", generator=torch.Generator().manual_seed(0))
    assert bool((bound <= torch.minimum(sampled, _margins(net, x_adv, y)) + 1e-5).all())


def test_crown_window_trades_tightness_for_cost(data):
    net = _supernet(data)
    x, y = data.val.x[:1], data.val.y[:1]
    with torch.no_grad():
        narrow = margin_lower_bound(net, x, y, 1e-3, "crown", window=5)
        wide = margin_lower_bound(net, x, y, 1e-3, "crown", window=40)
        crown_ibp = margin_lower_bound(net, x, y, 1e-3, "crown-ibp")
    clean = _margins(net, x, y).item()
    assert crown_ibp.item() < narrow.item() < clean and crown_ibp.item() < wide.item() < clean


def test_each_metric_can_have_its_own_gamma(data):
    strat = _dsrna(data, metric="combined", cb_method="ibp", gamma=0.5, gamma_cb=0.25)
    parts = {"metric_jacobian": torch.tensor(2.0), "metric_cb": torch.tensor(-8.0)}
    assert strat.weighted_metric(parts).item() == 0.5 * 2.0 + 0.25 * -8.0


def test_alpha_step_descends_val_loss_minus_gamma_times_the_metric(data):
    """The gradient the alpha optimizer gets is d(CE_val - gamma * R)/d alpha, taken here by hand."""
    strat = _dsrna(data, metric="combined", gamma=0.5, metric_n=5, cb_method="ibp", cb_n=None)
    x, y = data.train.x, data.train.y
    batch = SearchBatch(x[:16], y[:16], x[:16], x[16:32], y[16:32], 0.025, 0, 0)
    torch.manual_seed(0)
    net = strat.net.eval()  # no BatchNorm statistics updates between the two computations
    ce = F.cross_entropy(net(batch.x_a), batch.y_a)
    r, _ = strat.metric(net, batch.x_a[:5], batch.y_a[:5])
    expected = torch.autograd.grad(ce - 0.5 * r, strat.alphas, retain_graph=True)

    captured = {}
    strat.apply_alpha_gradient = lambda grads: captured.setdefault("g", grads)
    torch.manual_seed(0)  # the same projections
    info = strat.alpha_step(batch)
    for g, e in zip(captured["g"], expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(info["alpha_loss"], (ce - 0.5 * r).detach(), rtol=1e-5, atol=1e-6)
    assert set(info) >= {"ce_val", "metric", "metric_jacobian", "metric_cb", "grad_cos"}
    # how much the metric steers: the norms of the two gradients and the metric's share
    g_ce = torch.cat([g.flatten() for g in torch.autograd.grad(ce, strat.alphas, retain_graph=True)])
    g_m = torch.cat([g.flatten() for g in torch.autograd.grad(-0.5 * r, strat.alphas)])
    torch.testing.assert_close(info["grad_ce"], g_ce.norm(), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(info["grad_metric"], g_m.norm(), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(info["metric_share"], g_m.norm() / (g_ce.norm() + g_m.norm()), rtol=1e-4, atol=1e-8)


def test_alpha_steps_on_the_metric_alone_raise_it(data):
    """The default cb metric (certified radius, CROWN over zonotope intermediate bounds) rises under alpha steps
    that weigh it alone."""
    strat = _dsrna(data, metric="cb", C=2, cb_n=1, gamma=1e4, alpha_lr=0.02, alpha_weight_decay=0.0, eps=0.1)
    x, y = data.train.x, data.train.y
    strat.net.eval()  # fixed BatchNorm statistics: only the alphas change R
    with torch.no_grad():
        y_a = strat.net(x[16:24]).argmax(1)  # the supernet's own predictions: radii > 0 (it is untrained)
    batch = SearchBatch(x[:16], y[:16], x[:16], x[16:24], y_a, 0.025, 0, 0)
    before, _ = strat.metric(strat.net, batch.x_a, batch.y_a, create_graph=False)
    for _ in range(2):
        strat.alpha_step(batch)
    after, _ = strat.metric(strat.net, batch.x_a, batch.y_a, create_graph=False)
    assert after.item() > before.item()


def test_weight_regularisation_starts_after_its_warmup(data):
    strat = _dsrna(data, metric="cb", cb_method="ibp", weight_reg=1e-2, weight_reg_start=1)
    x, y = data.train.x[:8], data.train.y[:8]
    strat.net.eval()
    strat._epoch = 0
    plain, _ = strat.weight_loss(strat.net, x, y)
    torch.testing.assert_close(plain, F.cross_entropy(strat.net(x), y))
    strat._epoch = 1
    regularised, _ = strat.weight_loss(strat.net, x, y)
    r, _ = strat.metric(strat.net, x, y)
    torch.testing.assert_close(regularised, F.cross_entropy(strat.net(x), y) - 1e-2 * r)


def test_settings_are_checked(data):
    with pytest.raises(UserError, match="bad setting metric"):
        build_strategy("dsrna", {"metric": "lipschitz"})
    with pytest.raises(UserError, match="cb_eps"):
        build_strategy("dsrna", {"cb_eps": "2"})
    with pytest.raises(UserError, match="weight_reg_start"):
        build_strategy("dsrna", {"epochs": 5, "weight_reg": 1e-4, "weight_reg_start": 10})
    strat = build_strategy("dsrna", {**TINY, "metric": "cb"})
    with pytest.raises(UserError, match="Linf"):
        strat.search(SearchContext(data=data, eps=0.5, norm="L2", progress=False))
    assert build_strategy("dsrna").cfg.order == "first" and build_strategy("dsrna").cfg.gamma == 0.01


# ------------------------------------------------------------------------------------------- the search
def test_killed_and_resumed_search_equals_an_uninterrupted_one(data, tmp_path):
    # combined metric with random projections and PC-DARTS: every random and stateful part is exercised
    settings = {**TINY, "metric": "combined", "cb_method": "ibp", "partial_channels_k": 2, "max_batches_per_epoch": 1,
                "metric_n": 4}

    def ctx(out, **kw):
        return SearchContext(data=data, eps=0.03, seed=5, out_dir=out, progress=False, **kw)

    full = build_strategy("dsrna", settings).search(ctx(tmp_path / "full"))

    def kill_after_first_epoch(record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_strategy("dsrna", settings).search(ctx(tmp_path / "cut", on_epoch_end=kill_after_first_epoch))
    resumed = build_strategy("dsrna", settings).search(ctx(tmp_path / "cut"), resume=True)

    def strip(history):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]

    assert strip(resumed.history) == strip(full.history)
    assert resumed.genotype == full.genotype
    assert resumed.extra["alphas"] == full.extra["alphas"]

    lines = [json.loads(line) for line in (tmp_path / "full" / "search.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    for r in lines:
        # the metric on fixed validation images, every epoch
        assert r["val_metric"] == pytest.approx(r["val_metric_jacobian"] + r["val_metric_cb"])
        assert r["val_metric_jacobian"] < 0
        # and its batch average from the alpha steps
        assert math.isfinite(r["metric"]) and r["metric"] == pytest.approx(r["metric_jacobian"] + r["metric_cb"])
        assert r["alpha_loss"] == pytest.approx(r["ce_val"] - 0.01 * r["metric"], rel=1e-5)


def test_the_shipped_config_is_a_valid_run_of_this_method():
    from robustnas.core.config import RunCommand, load_yaml, validate

    cmd = validate(RunCommand, load_yaml(Path(__file__).resolve().parents[1] / "configs" / "dsrna.yaml"))
    strat = build_strategy(cmd.method, cmd.search)
    assert isinstance(strat, Dsrna) and strat.cfg.gamma == 0.01 and strat.cfg.order == "first"
    assert cmd.train.adv == "none"  # the paper's final training; adversarial is one setting away


def test_the_verdict_says_when_the_certified_term_steered_nothing(data):
    """A radius that was 0 at every alpha step, a margin term 100x the validation loss, or a metric term under 1% of
    the alpha gradient adds an "inert" line to the search's verdict (and so to report.md and the terminal); a working
    metric with a real share and an epoch without alpha steps add none."""
    from robustnas.results.report import decision_section

    alphas = {k: torch.softmax(a.detach(), -1).tolist() for k, a in zip(("normal", "reduce"), _dsrna(data).alphas)}
    radius = _dsrna(data, metric="cb")
    inert = radius.decision(alphas, 0.5, {"alpha_updates": True, "metric_cb": 0.0, "ce_val": 2.0}).get("inert")
    assert inert and "0 at every alpha step" in inert[0]
    assert any(line.startswith("- inert: the certified-bound metric was 0") for line in decision_section(
        radius.decision(alphas, 0.5, {"alpha_updates": True, "metric_cb": 0.0, "ce_val": 2.0})))
    assert "inert" not in radius.decision(alphas, 0.5, {"alpha_updates": True, "metric_cb": 3e-4, "ce_val": 2.0})
    assert "inert" not in radius.decision(alphas, 0.5, {"alpha_updates": False, "ce_val": 2.0})
    margin = _dsrna(data, metric="combined", cb_form="margin")  # gamma 0.01
    assert "outweighs" in margin.decision(alphas, 0.5, {"alpha_updates": True, "metric_cb": -1e5, "ce_val": 2.0})["inert"][0]
    assert "inert" not in margin.decision(alphas, 0.5, {"alpha_updates": True, "metric_cb": -10.0, "ce_val": 2.0})
    jacobian = _dsrna(data, metric="jacobian")
    assert "inert" not in jacobian.decision(alphas, 0.5, {"alpha_updates": True, "metric_jacobian": 0.0, "ce_val": 2.0})
    # a working metric whose term is under 1% of the alpha gradient (the digits search at gamma 0.01: 0.0015%)
    for strat, record in ((radius, {"metric_cb": 2e-4}), (jacobian, {"metric_jacobian": -9.0})):
        record = {**record, "alpha_updates": True, "ce_val": 2.0}
        assert "(< 1%)" in strat.decision(alphas, 0.5, {**record, "metric_share": 1.5e-5})["inert"][0]
        assert "inert" not in strat.decision(alphas, 0.5, {**record, "metric_share": 0.1})
