"""Search strategies: the MGDA min-norm weight, the second-order hypergradient, the search loop's outputs,
exact resume, the registry, and the separation of weight and alpha updates. Tiny supernets on 8x8 digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from robustnas.core.config import load_yaml, parse_eps
from robustnas.core.errors import UserError
from robustnas.nets.genotypes import build_network, load_genotype
from robustnas.search import STRATEGIES, SearchContext, Strategy, build_strategy, get_strategy
from robustnas.search import supernet
from robustnas.search.arnas import Arnas, gamma_summary, min_norm_two
from robustnas.search.darts import Darts
from robustnas.search.supernet import SearchBatch

TINY = dict(C=4, layers=3, batch_size=32, epochs=2, max_batches_per_epoch=2, val_n=32, val_steps=2)


def _ctx(data, out=None, **kw) -> SearchContext:
    return SearchContext(data=data, eps=0.1, seed=3, out_dir=out, progress=False, **kw)


def _batch(data, lr=0.025, epoch=0) -> SearchBatch:
    x, y = data.train.x, data.train.y
    return SearchBatch(x[:32], y[:32], x[:32], x[32:64], y[32:64], lr, epoch, 0)


# ------------------------------------------------------------------------------------------------- MGDA
def _brute_force_gamma(g1: torch.Tensor, g2: torch.Tensor) -> tuple[float, float]:
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    norms = (grid[:, None] * g1.double() + (1 - grid[:, None]) * g2.double()).norm(dim=1)
    k = int(norms.argmin())
    return grid[k].item(), norms[k].item()


@pytest.mark.parametrize("case", range(8))
def test_min_norm_two_is_the_brute_force_minimiser(case):
    g = torch.Generator().manual_seed(case)
    g1, g2 = torch.randn(12, generator=g), torch.randn(12, generator=g)
    if case == 5:  # g2 a shorter copy of g1's direction: the min-norm point is g2 itself (gamma clipped to 0)
        g2 = 0.3 * g1
    if case == 6:  # the other way round: clipped to 1
        g1 = 0.2 * g2
    if case == 7:  # a large and a small gradient at an acute angle (ARNAS's lambda = 0.1 regime)
        g2 = 0.1 * (g1 + 0.5 * g2)
    gamma = min_norm_two(g1, g2)
    best_gamma, best_norm = _brute_force_gamma(g1, g2)
    ours = (gamma * g1.double() + (1 - gamma) * g2.double()).norm().item()
    assert 0.0 <= gamma <= 1.0
    assert ours <= best_norm + 1e-9
    assert abs(gamma - best_gamma) < 1e-4
    if case == 5:
        assert gamma == 0.0
    if case == 6:
        assert gamma == 1.0


def test_min_norm_two_flattens_lists_of_alpha_sets():
    g = torch.Generator().manual_seed(11)
    parts1 = [torch.randn(14, 8, generator=g), torch.randn(14, 8, generator=g)]
    parts2 = [torch.randn(14, 8, generator=g), torch.randn(14, 8, generator=g)]
    flat1 = torch.cat([p.flatten() for p in parts1])
    flat2 = torch.cat([p.flatten() for p in parts2])
    assert min_norm_two(parts1, parts2) == min_norm_two(flat1, flat2)
    assert abs(min_norm_two(parts1, parts2) - _brute_force_gamma(flat1, flat2)[0]) < 1e-4
    assert min_norm_two(flat1, flat1) == 0.5  # every gamma is optimal


@pytest.mark.parametrize("seed", range(6))
def test_mgda_step_lowers_both_losses_on_a_toy_problem(seed):
    """Two quadratics sharing the parameters; their gradients often conflict. A small step along the
    min-norm direction d lowers both, since d . g_i >= ||d||^2 > 0 for both tasks."""
    g = torch.Generator().manual_seed(seed)
    A1, A2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    b1, b2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)

    def losses(t):
        return 0.5 * (A1 @ t - b1).square().sum(), 0.5 * (A2 @ t - b2).square().sum()

    l1, l2 = losses(theta)
    (g1,) = torch.autograd.grad(l1, theta)
    (g2,) = torch.autograd.grad(l2, theta)
    gamma = min_norm_two(g1, g2)
    d = gamma * g1 + (1 - gamma) * g2
    assert d.dot(g1) >= d.dot(d) - 1e-9 and d.dot(g2) >= d.dot(d) - 1e-9
    with torch.no_grad():
        n1, n2 = losses(theta - 1e-3 * d)
    assert n1 < l1 and n2 < l2


# ------------------------------------------------------------------------------------------------- second order
def _double_strategy(data, **kw):
    strat = build_strategy("darts", {**TINY, "order": "second", **kw})
    strat.setup(_ctx(data))
    strat.net.double().train()
    return strat


def test_finite_difference_hvp_matches_autograd_double_backward(data):
    """Checked at r = 1e-6: the network is piecewise linear (ReLU, max-pool), so a central difference that
    straddles a kink is off at any precision; DARTS' r = 0.01 straddles some on this tiny net."""
    strat = _double_strategy(data)
    net, weights, alphas = strat.net, strat.weights, strat.alphas
    x, y = data.train.x[:16].double(), data.train.y[:16]
    g = torch.Generator().manual_seed(0)
    vector = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in weights]
    before = [p.detach().clone() for p in weights]

    fd = strat.hessian_vector_product(vector, x, y, r=1e-6)
    assert all(torch.equal(p, b) for p, b in zip(weights, before))  # weights restored exactly

    loss = F.cross_entropy(net(x), y)
    gw = torch.autograd.grad(loss, weights, create_graph=True)
    dot = sum((gi * vi).sum() for gi, vi in zip(gw, vector))
    exact = torch.autograd.grad(dot, alphas)
    fd_flat, exact_flat = torch.cat([t.flatten() for t in fd]), torch.cat([t.flatten() for t in exact])
    assert exact_flat.norm() > 0
    assert ((fd_flat - exact_flat).norm() / exact_flat.norm()).item() < 1e-4
    strat.cfg.hvp = "autograd"  # the exact option gives the double-backward product itself
    auto = torch.cat([t.flatten() for t in strat.hessian_vector_product(vector, x, y)])
    torch.testing.assert_close(auto, exact_flat, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("momentum", [False, True])
def test_second_order_hypergradient_is_the_derivative_through_the_unrolled_step(data, momentum):
    """DARTS' second-order alpha gradient equals d/d alpha L_val(w - xi * grad_w L_train(w, alpha), alpha),
    taken here by autograd through the unrolled step (double precision)."""
    strat = _double_strategy(data, unrolled_momentum=momentum, hvp_r=1e-6)
    net, weights, alphas = strat.net, strat.weights, strat.alphas
    batch = _batch(data, lr=0.05)
    batch.x_w = batch.x_w_adv = batch.x_w.double()
    batch.x_a = batch.x_a.double()
    if momentum:  # a momentum buffer to unroll with
        strat.weight_step(batch)
    (hyper,), _ = strat.hypergradients(batch, lambda m: F.cross_entropy(m(batch.x_a), batch.y_a))

    names = {id(p): n for n, p in net.named_parameters()}
    loss_train = F.cross_entropy(net(batch.x_w), batch.y_w)
    gw = torch.autograd.grad(loss_train, weights, create_graph=True)
    unrolled = {}
    for p, gp in zip(weights, gw):
        step = gp
        if momentum:
            step = gp + strat.cfg.w_weight_decay * p + strat.cfg.w_momentum * strat.w_opt.state[p]["momentum_buffer"]
        unrolled[names[id(p)]] = p - 0.05 * step
    unrolled.update({names[id(a)]: a for a in alphas})
    loss_val = F.cross_entropy(functional_call(net, unrolled, (batch.x_a,)), batch.y_a)
    exact = torch.autograd.grad(loss_val, alphas)
    h, e = torch.cat([t.flatten() for t in hyper]), torch.cat([t.flatten() for t in exact])
    assert ((h - e).norm() / e.norm()).item() < 1e-4
    # and it is not the first-order gradient: the unrolled term matters
    first = torch.autograd.grad(F.cross_entropy(net(batch.x_a), batch.y_a), alphas)
    assert (torch.cat([t.flatten() for t in first]) - e).norm() > 1e-3 * e.norm()


# ------------------------------------------------------------------------------------------------- the loop
def test_search_writes_history_and_a_genotype_that_builds(data, tmp_path):
    strat = build_strategy("darts", {**TINY, "warmup_epochs": 1, "weight_adv": "fgsm-rs"})
    result = strat.search(_ctx(data, tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "search.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(result.history))
    assert [r["epoch"] for r in lines] == [0, 1]
    assert [r["alpha_updates"] for r in lines] == [False, True]
    for r in lines:
        for key in ("train_loss", "train_acc", "val_clean", "val_robust", "lr", "seconds", "genotype"):
            assert key in r
        assert 0 <= r["val_robust"] <= 1 and 0 <= r["val_clean"] <= 1
        for rows in r["alphas"].values():
            np.testing.assert_allclose(np.sum(rows, axis=1), 1.0, rtol=1e-5)
    assert "alpha_loss" in lines[1] and "alpha_loss" not in lines[0]
    assert lines[1]["lr"] < lines[0]["lr"]  # cosine schedule

    # alphas are frozen during warm-up and move afterwards
    torch.manual_seed(3)
    init = {k: torch.softmax(v.detach(), -1) for k, v in strat.build_supernet(data.meta).alphas().items()}
    for k, w in init.items():
        assert torch.equal(torch.tensor(lines[0]["alphas"][k]), w)
        assert not torch.equal(torch.tensor(lines[1]["alphas"][k]), w)

    genotype = load_genotype(tmp_path / "genotype.json")
    assert genotype == result.genotype
    assert {k: v for k, v in genotype.to_dict().items() if k != "source"} == lines[-1]["genotype"]
    m = data.meta
    net = build_network(genotype, C=4, layers=3, num_classes=m.num_classes, in_shape=m.shape, mean=m.mean, std=m.std)
    assert net(data.test.x[:2]).shape == (2, 10)


def test_killed_and_resumed_search_equals_an_uninterrupted_one(data, tmp_path):
    # 4 cells: accurate, reduce, reduce, robust (every alpha set in use)
    settings = {**TINY, "layers": 4, "batch_size": 16, "attack_steps": 1, "adv_only_epochs": 1}
    full = build_strategy("arnas", settings).search(_ctx(data, tmp_path / "full"))

    def kill_after_first_epoch(record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_strategy("arnas", settings).search(_ctx(data, tmp_path / "cut", on_epoch_end=kill_after_first_epoch))
    assert len((tmp_path / "cut" / "search.jsonl").read_text().splitlines()) == 1
    resumed = build_strategy("arnas", settings).search(_ctx(data, tmp_path / "cut"), resume=True)

    def strip(history):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]

    assert strip(resumed.history) == strip(full.history)
    assert resumed.genotype == full.genotype
    assert resumed.extra["alphas"] == full.extra["alphas"]
    assert (tmp_path / "cut" / "genotype.json").read_text() == (tmp_path / "full" / "genotype.json").read_text()
    assert [r["stage"] for r in full.history] == ["adv-only", "mgda"]
    assert "alpha_loss_nat" in full.history[1]
    # gamma of every MGDA alpha step; none in the adversarial-only stage, which has no gamma
    assert "gamma" not in full.history[0] and "gamma_steps" not in full.history[0]
    steps = full.history[1]["gamma_steps"]
    assert len(steps) == TINY["max_batches_per_epoch"] and all(0.0 <= v <= 1.0 for v in steps)
    assert full.history[1]["gamma"] == pytest.approx(sum(steps) / len(steps))
    assert full.history[1]["gamma_at_0"] == sum(v == 0.0 for v in steps) / len(steps)
    assert full.history[1]["gamma_at_1"] == sum(v == 1.0 for v in steps) / len(steps)
    logged = [json.loads(line) for line in (tmp_path / "full" / "search.jsonl").read_text().splitlines()]
    assert logged[1]["gamma_steps"] == steps
    # and the run report plots them
    lines = build_strategy("arnas", settings).report_sections(full, tmp_path / "full", data.meta)
    assert (tmp_path / "full" / "plots" / "gamma.png").stat().st_size > 0
    assert any(f"{len(steps)} alpha steps" in line for line in lines)

    # resuming a finished search runs nothing more and gives the same answer
    again = build_strategy("arnas", settings).search(_ctx(data, tmp_path / "cut"), resume=True)
    assert strip(again.history) == strip(full.history) and again.genotype == full.genotype

    # a resume with other settings is refused with one line naming the setting
    with pytest.raises(UserError, match="config.C"):
        build_strategy("arnas", {**settings, "C": 6}).search(_ctx(data, tmp_path / "cut"), resume=True)


def test_weight_and_alpha_updates_are_separate(data):
    strat = build_strategy("arnas", {**TINY, "layers": 4, "attack_steps": 1})
    strat.setup(_ctx(data))
    w_ids = {id(p) for g in strat.w_opt.param_groups for p in g["params"]}
    a_ids = {id(p) for g in strat.a_opt.param_groups for p in g["params"]}
    assert w_ids.isdisjoint(a_ids)
    assert w_ids | a_ids == {id(p) for p in strat.net.parameters()}
    assert a_ids == {id(a) for a in strat.net.arch_parameters()} and len(a_ids) == 3

    batch = _batch(data)
    alphas0 = [a.detach().clone() for a in strat.alphas]
    weights0 = [p.detach().clone() for p in strat.weights]
    strat.weight_step(batch)
    assert all(torch.equal(a, a0) and a.grad is None for a, a0 in zip(strat.alphas, alphas0))
    assert any(not torch.equal(p, p0) for p, p0 in zip(strat.weights, weights0))

    weights1 = [p.detach().clone() for p in strat.weights]
    info = strat.alpha_step(batch)
    assert all(torch.equal(p, p1) for p, p1 in zip(strat.weights, weights1))
    assert all(not torch.equal(a, a0) for a, a0 in zip(strat.alphas, alphas0))
    assert 0.0 <= info["gamma"] <= 1.0


def test_gamma_summary_counts_clipped_steps():
    assert gamma_summary([0.0, 0.0, 1.0, 0.5]) == {"n": 4, "at_0": 0.5, "at_1": 0.25, "mean": 0.375}
    assert gamma_summary([1e-9, 0.999])["at_0"] == 0.0 and gamma_summary([])["n"] == 0


# ------------------------------------------------------------------------------------------------- search attack
def _bn_modes_during(strat, fn) -> tuple[set, bool]:
    """BatchNorm modes seen by the forwards of fn(), and whether fn() moved any running mean."""
    modes: set = set()
    bns = [m for m in strat.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(lambda mod, inp: modes.add(mod.training)) for m in bns]
    before = [m.running_mean.clone() for m in bns]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return modes, any(not torch.equal(m.running_mean, b) for m, b in zip(bns, before))


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_arnas_search_attack_bn_mode(data, bn_mode, monkeypatch):
    """ARNAS' code runs cleverhans' PGD on the supernet left in train mode: batch statistics, and the
    attack's forwards move the running statistics. `attack_bn_mode: eval` is the project's convention."""
    settings = {**TINY, "layers": 4, "attack_steps": 2}
    if bn_mode == "eval":
        settings["attack_bn_mode"] = "eval"
    strat = build_strategy("arnas", settings)  # train is the default
    strat.setup(_ctx(data))
    x, y = data.train.x[:16], data.train.y[:16]
    modes, moved = _bn_modes_during(strat, lambda: strat.weight_examples(x, y))
    assert modes == {bn_mode == "train"} and moved == (bn_mode == "train")
    assert strat.net.training  # the caller's mode is back
    assert all(p.grad is None for p in strat.net.parameters())

    # the alpha step's attack on the validation batch: the modes seen inside each PGD call
    seen = []
    real_pgd = supernet.pgd

    def spy(*a, **kw):
        out = []
        modes, _ = _bn_modes_during(strat, lambda: out.append(real_pgd(*a, **kw)))
        seen.append(modes)
        return out[0]

    monkeypatch.setattr(supernet, "pgd", spy)
    strat.alpha_step(_batch(data))
    assert seen == [{bn_mode == "train"}]


def test_arnas_search_attack_step_and_clip_follow_the_public_code(data, monkeypatch):
    """Default: step eps/4 (2/255 at 8/255), no clipping to [0, 1]; `attack_clip` and `step_size` restore ours."""
    calls = []
    real_pgd = supernet.pgd
    monkeypatch.setattr(supernet, "pgd", lambda *a, **kw: calls.append(kw) or real_pgd(*a, **kw))
    x, y = data.train.x[:16], data.train.y[:16]
    assert (x == 0).any()  # digits have black pixels, which an unclipped attack pushes below 0

    strat = build_strategy("arnas", {**TINY, "layers": 4, "attack_steps": 3})
    strat.setup(_ctx(data))
    x_adv = strat.weight_examples(x, y)
    assert calls[-1]["step_size"] == pytest.approx(0.25 * 0.1) and calls[-1]["steps"] == 3
    assert x_adv.min() < 0 and (x_adv - x).abs().max() <= 0.1 + 1e-6

    strat = build_strategy("arnas", {**TINY, "layers": 4, "attack_steps": 3, "attack_clip": True,
                                     "step_size": "0.03"})
    strat.setup(_ctx(data))
    x_adv = strat.weight_examples(x, y)
    assert calls[-1]["step_size"] == pytest.approx(0.03)
    assert x_adv.min() >= 0 and x_adv.max() <= 1

    # DARTS keeps the project's attack: eval mode, 2.5*eps/steps, clipped
    cfg = build_strategy("darts").cfg
    assert (cfg.attack_bn_mode, cfg.step_size_fraction, cfg.attack_clip) == ("eval", None, True)


def test_arnas_config_carries_the_public_search_settings():
    search = load_yaml(Path(__file__).parents[1] / "configs" / "arnas.yaml")["search"]
    cfg = build_strategy("arnas", search).cfg
    assert cfg.attack_bn_mode == "train" and not cfg.attack_clip and cfg.unrolled_momentum
    assert cfg.order == "second" and cfg.attack_steps == 7
    assert math.isclose(parse_eps(cfg.step_size), 2 / 255)


# ------------------------------------------------------------------------------------------------- registry
def test_registry_finds_the_strategies_and_refuses_unknown_names():
    assert get_strategy("darts") is Darts and get_strategy("arnas") is Arnas
    assert {"darts", "arnas"} <= set(STRATEGIES)
    with pytest.raises(UserError, match="unknown search method 'nope'.*arnas.*darts"):
        get_strategy("nope")
    strat = build_strategy("arnas", {"epochs": 3})
    assert isinstance(strat, Strategy) and strat.cfg.epochs == 3 and strat.cfg.space == "arnas"
    assert build_strategy("darts").cfg.weight_adv == "none" and build_strategy("arnas").cfg.weight_adv == "pgd"
    with pytest.raises(UserError, match="bad setting order"):
        build_strategy("darts", {"order": "third"})
    with pytest.raises(UserError, match="bad setting lr"):
        build_strategy("darts", {"lr": 0.1})  # unknown field: a typo is not silently ignored
    with pytest.raises(UserError, match="warmup_epochs"):
        build_strategy("darts", {"epochs": 2, "warmup_epochs": 2})
