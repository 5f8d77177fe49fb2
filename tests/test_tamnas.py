"""TAM-NAS: the NSGA-II operators and loop on a cheap surrogate, and the whole search (supernet training,
NSGA-II on inherited weights, Pareto subnets trained by the Trainer) at a tiny size, with exact resume."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from pymoo.core.problem import Problem

from robustnas.data.datasets import load_dataset
from robustnas.core.errors import UserError
from robustnas.core.executor import InProcessExecutor, make_executor
from robustnas.core.rundir import read_json
from robustnas.search import SearchContext, build_strategy
from robustnas.search.nsga2 import make_operators, run_nsga2
from robustnas.nets.spaces.tiny import BLOCKS, SKIP, TinyGenotype, TinyNetwork, TinySpace, block_kind, network_from_spec

SPACE = TinySpace()


# ----------------------------------------------------------------------------------------- surrogate
def surrogate(encoding):
    """Objectives from the encoding alone: size grows with width and block cost; MBConv blocks lower the
    clean error, plain convs the robust error, so the three objectives conflict."""
    g = SPACE.decode(encoding)
    size = mb = conv = 0.0
    for i, (block, width) in enumerate(g.layers):
        kind, k, e = block_kind(block)
        w = SPACE.layer_widths[i].index(width) + 1
        if kind == "mb":
            size += w * e * k / 3
            mb += w * e
        elif kind == "conv":
            size += 3 * w
            conv += w
        elif kind == "sep":
            size += 0.5 * w
    return {"encoding": list(encoding), "clean_err": 0.9 * math.exp(-0.02 * mb),
            "pgd_err": 0.95 * math.exp(-0.05 * conv), "params": int(1000 + 1000 * size)}


def dominates(a, b):
    fa = (a["clean_err"], a["pgd_err"], a["params"])
    fb = (b["clean_err"], b["pgd_err"], b["params"])
    return all(x <= y for x, y in zip(fa, fb)) and fa != fb


def nsga2(generations=8, **kw):
    opts = dict(pop_size=16, generations=generations, seed=3, params_scale=1000 + 1000 * 11 * 3 * 6 * 5 / 3)
    opts.update(kw)
    return run_nsga2(SPACE, surrogate, InProcessExecutor(), **opts)


def problem():
    xl, xu = SPACE.bounds()
    return Problem(n_var=SPACE.n_var, n_obj=3, xl=xl, xu=xu, vtype=int)


# ----------------------------------------------------------------------------------------- operators
def test_operators_return_valid_canonical_encodings():
    sampling, crossover, mutation = make_operators(SPACE, crossover_prob=1.0)
    rng = np.random.default_rng(0)
    pop = sampling.do(problem(), 40, random_state=rng)
    X = pop.get("X")
    assert all(SPACE.check(x) == list(x) for x in X)
    assert len({tuple(x) for x in X}) == 40
    assert {x[0] for x in X} <= set(SPACE.allowed_blocks(0)) and SKIP in {x[2] for x in X}  # layer 1 may skip

    parents = np.arange(40).reshape(20, 2)
    off = crossover.do(problem(), pop, parents=parents, random_state=rng).get("X")
    assert len(off) == 40
    for k, (a, b) in enumerate(parents):
        for child in (off[k], off[len(parents) + k]):  # pymoo lists all first children, then all second
            assert SPACE.check(child) == list(child)
            for i in range(SPACE.n_layers):  # each layer's block comes whole from one parent
                pair = (child[2 * i], child[2 * i + 1])
                from_a = pair == (X[a][2 * i], X[a][2 * i + 1]) or child[2 * i] == X[a][2 * i] == SKIP
                from_b = pair == (X[b][2 * i], X[b][2 * i + 1]) or child[2 * i] == X[b][2 * i] == SKIP
                assert from_a or from_b

    before = pop.get("X").copy()
    mutated = mutation.do(problem(), pop, random_state=rng).get("X")
    assert all(SPACE.check(x) == list(x) for x in mutated)
    changed = (mutated != before).sum(1)
    assert changed.sum() > 0 and changed.mean() < SPACE.n_var / 4  # a few genes, not a redraw


# ----------------------------------------------------------------------------------------- NSGA-II
def test_nsga2_on_a_surrogate_returns_a_non_dominated_front_with_growing_hypervolume():
    scores, records = nsga2()
    assert [r["generation"] for r in records] == list(range(8))
    front = records[-1]["front"]
    assert len(front) >= 3
    for a in front:
        assert not any(dominates(b, a) for b in front)
    # the front is complete: everything else scored is dominated by (or equal to) a front member
    keys = {tuple(s["encoding"]) for s in front}
    for s in scores:
        if tuple(s["encoding"]) not in keys:
            assert any(dominates(f, s) or (f["clean_err"], f["pgd_err"], f["params"]) ==
                       (s["clean_err"], s["pgd_err"], s["params"]) for f in front)
    hv = [r["hv"] for r in records]
    print("\nhypervolume per generation:", " ".join(f"{h:.4f}" for h in hv))
    assert all(b >= a for a, b in zip(hv, hv[1:]))
    assert hv[-1] > hv[0]
    assert sum(r["evaluated"] for r in records) == len(scores)


def test_nsga2_is_deterministic_and_resumes_exactly_after_any_generation():
    _, full = nsga2(generations=6)
    _, again = nsga2(generations=6)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(full) == strip(again)

    saved = {}

    class Stop(Exception):
        pass

    def stop_after_two(record, state):
        if record["generation"] == 2:
            saved.update(json.loads(json.dumps(state)))  # what the checkpoint file holds
            raise Stop

    with pytest.raises(Stop):
        nsga2(generations=6, on_generation=stop_after_two)
    _, resumed = nsga2(generations=6, state=saved)
    assert strip(resumed) == strip(full)


def test_parameter_ceiling_is_a_constraint():
    ceiling = 50_000  # about a tenth of random subnets fit under it
    scores, records = nsga2(generations=5, max_params=ceiling)
    front = records[-1]["front"]
    assert front and all(s["params"] <= ceiling for s in front)
    assert any(s["params"] > ceiling for s in scores)  # infeasible subnets were scored, but kept off the front


def test_a_constrained_search_with_infeasible_members_checkpoints_and_resumes_exactly():
    ceiling = 20_000  # most of a random population is over it: pymoo leaves their rank unset
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    states = []
    _, full = nsga2(generations=4, max_params=ceiling,
                    on_generation=lambda record, state: states.append(json.loads(json.dumps(state))))
    assert any(r is None for r in states[0]["rank"])
    _, resumed = nsga2(generations=4, max_params=ceiling, state=states[1])
    assert strip(resumed) == strip(full)


def test_executor_keeps_order():
    ex = make_executor("inprocess")
    assert ex.map(lambda v: v * v, [3, 1, 2]) == [9, 1, 4]
    with pytest.raises(UserError, match="unknown executor"):
        make_executor("nope")


# ----------------------------------------------------------------------------------------- the strategy
TINY = {"epochs": 2, "max_batches_per_epoch": 2, "batch_size": 16, "attack_steps": 1, "val_n": 20,
        "eval_n": 30, "eval_pgd_steps": 2, "recal_batches": 1, "recal_batch_size": 16, "pop_size": 4,
        "generations": 2}
FINAL = {"final": "finetune", "final_n": 1,
         "final_train": {"epochs": 1, "batch_size": 256, "lr": 1e-9, "weight_decay": 0.0, "val_n": 20,
                         "val_steps": 1, "attack": {"steps": 1}}}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def full_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("tamnas_full")
    strategy = build_strategy("tamnas", {**TINY, **FINAL})
    result = strategy.search(SearchContext(digits, eps=0.1, seed=1, out_dir=out, progress=False))
    return strategy, result, out


def _strip(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]


def test_search_writes_search_jsonl_and_a_tiny_genotype(full_run):
    strategy, result, out = full_run
    lines = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    assert [line["phase"] for line in lines] == ["supernet"] * 2 + ["nsga2"] * 2
    assert _strip(lines) == _strip(result.history)
    for line in lines[2:]:
        assert line["front"] and line["hv"] >= 0
        assert all(0 <= s["clean_err"] <= 1 and 0 <= s["pgd_err"] <= 1 and s["params"] > 0 for s in line["front"])
    genotype = json.loads((out / "genotype.json").read_text())
    assert genotype["space"] == "tiny" and genotype == result.genotype
    g = TinyGenotype.from_dict(genotype)
    meta = strategy.ctx.data.meta
    net = TinyNetwork(g, meta.num_classes, meta.shape, meta.mean, meta.std)
    assert net(torch.rand(2, *meta.shape)).shape == (2, 10)
    front = json.loads((out / "front.json").read_text())
    assert [s["encoding"] for s in front] == [s["encoding"] for s in lines[-1]["front"]]
    assert g.encoding in [s["encoding"] for s in front]
    freq = result.extra["layer_frequencies"]
    assert np.allclose(np.array(freq["blocks"]).sum(1), 1) and freq["block_names"] == list(BLOCKS)


def test_scores_are_reproducible_from_the_supernet(full_run):
    strategy, result, _ = full_run
    s = result.extra["front"][0]
    again = strategy.scorer()(s["encoding"])
    assert (again["clean_err"], again["pgd_err"], again["params"]) == (s["clean_err"], s["pgd_err"], s["params"])


def test_finetuned_subnet_starts_from_the_supernet_weights(full_run):
    strategy, result, out = full_run
    (entry,) = result.extra["final"]
    assert entry["mode"] == "finetune" and json.loads((out / "final.json").read_text()) == result.extra["final"]
    model = strategy.final_models[0]
    inherited = strategy.net.extract(TinyGenotype.from_dict(entry["genotype"]))
    convs = lambda m: [p for n, p in m.named_parameters() if p.dim() > 1]  # noqa: E731
    # lr 1e-9: training barely moves the weights, so they are the inherited ones
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(convs(model), convs(inherited)))
    run = out / "final" / "0_finetune"
    rebuilt = network_from_spec(read_json(run / "model.json"))
    rebuilt.load_state_dict(load_file(str(run / "model.safetensors")))
    x = torch.rand(3, *strategy.ctx.data.meta.shape)
    model.eval()
    rebuilt.eval()
    assert torch.equal(rebuilt(x), model(x))
    # from scratch: same architecture, other weights
    scratch = strategy.train_final(result.extra["front"][:1], "scratch")
    assert scratch[0]["genotype"] == entry["genotype"]
    assert not torch.allclose(convs(strategy.final_models[0])[0], convs(inherited)[0])


def test_interrupted_search_resumes_to_the_same_result(digits, full_run, tmp_path):
    _, result, out = full_run

    class Stop(Exception):
        pass

    stops = [("supernet", 0), ("nsga2", 0)]

    def stop(record):
        key = (record["phase"], record.get("epoch", record.get("generation")))
        if stops and key == stops[0]:
            stops.pop(0)
            raise Stop

    ctx = SearchContext(digits, eps=0.1, seed=1, out_dir=tmp_path, progress=False, on_epoch_end=stop)
    for _ in range(2):
        with pytest.raises(Stop):
            build_strategy("tamnas", TINY).search(ctx, resume=True)
    resumed = build_strategy("tamnas", TINY).search(ctx, resume=True)
    assert _strip(resumed.history) == _strip(result.history)
    assert resumed.genotype == result.genotype
    assert (tmp_path / "genotype.json").read_text() == (out / "genotype.json").read_text()
    with pytest.raises(UserError, match="pop_size"):
        build_strategy("tamnas", {**TINY, "pop_size": 6}).search(ctx, resume=True)


def test_supernet_training_options(digits):
    s = build_strategy("tamnas", {**TINY, "sampling": "sandwich", "sandwich_random": 1, "adv": "pgd"})
    s.setup(SearchContext(digits, eps=0.1, progress=False))
    t = s.trainer  # the supernet's training (search/tiny_supernet.py)
    subnets = t.step_subnets(np.random.default_rng(0))
    assert subnets[:2] == [s.space.largest(), s.space.smallest()] and len(subnets) == 3
    x, y = digits.train.x[:8], digits.train.y[:8]
    s.net.set_active(subnets[2])
    x_adv = t.training_examples(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_adv, x)
    assert t.eps_at(0) < t.eps_at(t.steps_per_epoch) < t.eps_at(2 * t.steps_per_epoch) == t.eps  # the ramp
    assert torch.equal(t.training_examples(x, y, eps=0.0), x)
    before = [p.detach().clone() for p in s.net.parameters()]
    loss, correct, n = t.train_step(x, y, subnets, lr=0.05)
    assert math.isfinite(loss) and n == 3 * len(y)
    moved = [not torch.equal(a, p) for a, p in zip(before, s.net.parameters())]
    assert any(moved) and not all(moved)  # blocks no subnet of the step chose keep their weights


def test_a_step_size_above_one_is_an_l2_setting(digits):
    s = build_strategy("tamnas", {**TINY, "step_size": "1.5"})
    s.setup(SearchContext(digits, eps=2.0, norm="L2", progress=False))
    assert s.trainer.step_size == 1.5
    with pytest.raises(UserError, match="norm Linf"):
        s.setup(SearchContext(digits, eps=0.1, norm="Linf", progress=False))


@pytest.mark.parametrize("settings, field", [
    ({"max_params": "lots"}, "max_params"),
    ({"executor": "dask"}, "executor"),
    ({"executor": "inprocess", "executor_options": {"workers": 2}}, "workers"),
    ({"executor": "pool", "executor_options": {"workers": 0}}, "workers"),
    ({"adv": "trades"}, "adv"),
    ({"width_mult": 0}, "width_mult"),
])
def test_bad_settings_are_user_errors(settings, field):
    with pytest.raises(UserError, match=field):
        build_strategy("tamnas", settings)


def test_ceiling_below_the_smallest_subnet_is_refused(digits):
    s = build_strategy("tamnas", {**TINY, "max_params": "1k"})
    with pytest.raises(UserError, match="max_params"):
        s.search(SearchContext(digits, eps=0.1, progress=False))


def test_attacks_on_the_supernet_see_each_image_alone(digits):
    """Inside frozen_batch_stats the BN statistics are those of the clean batch: perturbing one image
    changes no other image's output, and no running statistic moves."""
    s = build_strategy("tamnas", TINY)
    s.setup(SearchContext(digits, eps=0.1, progress=False))
    net = s.net
    net.set_active(s.space.sample(np.random.default_rng(1)))
    net.train()
    x = digits.train.x[:8].clone()
    running = [b.clone() for b in net.buffers()]
    with net.frozen_batch_stats(x), torch.no_grad():
        out = net(x)
        x2 = x.clone()
        x2[1:] = torch.rand_like(x2[1:])
        assert torch.allclose(net(x2)[0], out[0], atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(running, net.buffers()))
    with torch.no_grad():  # live batch statistics couple the images
        assert not torch.allclose(net(x2)[0], net(x)[0], atol=1e-4)


def test_a_parameter_ceiling_draws_the_first_population_among_the_subnets_that_fit():
    ceiling = 30_000  # a small share of uniform draws fits (the surrogate's own size measure)
    count = lambda x: surrogate(x)["params"]  # noqa: E731
    _, records = nsga2(generations=1, max_params=ceiling, count=count)
    _, unaided = nsga2(generations=1, max_params=ceiling)
    assert len(records[0]["front"]) > len(unaided[0]["front"])
    assert all(s["params"] <= ceiling for s in records[0]["front"])
