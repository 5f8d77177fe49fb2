"""Per-image results, intervals in metrics.json, and paired comparisons (compare / benchmark) on digits."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import binomtest
from typer.testing import CliRunner

from robustnas.app.cli import app
from robustnas.results.compare import compare_runs
from robustnas.core.config import TrainCommand, to_yaml
from robustnas.evaluation.evaluate import evaluate_run, read_per_image
from robustnas.nets.models import build_model
from robustnas.core.rundir import atomic_write_text, write_json
from robustnas.nets.arch import save_model

ATTACKS = ("fgsm", "pgd20")


def make_run(path, data, width, epochs, seed=0):
    """A small CNN trained normally for `epochs` epochs, saved as a run directory and evaluated on 60 images."""
    m = data.meta
    torch.manual_seed(seed)
    model = build_model("cnn", m.num_classes, m.shape, m.mean, m.std, width=width)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for i in range(0, len(data.train.y), 64):
            loss = F.cross_entropy(model(data.train.x[i:i + 64]), data.train.y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_model(path, model.eval(), {"kind": "handcrafted", "config": model.config})
    cmd = TrainCommand.model_validate({"seed": seed, "data": {"dataset": "digits", "subset": 200},
                                       "model": {"arch": "cnn"}, "train": {"attack": {"eps": "0.1"}}})
    atomic_write_text(path / "config.yaml", to_yaml(cmd))
    evaluate_run(path, attacks=ATTACKS, n=60, batch_size=64, device="cpu", progress=False)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("paired")
    return {"strong": make_run(tmp / "strong", data, 0.5, 4), "weak": make_run(tmp / "weak", data, 0.25, 1),
            "strong2": make_run(tmp / "strong2", data, 0.5, 4, seed=1)}


def test_evaluate_writes_per_image_results_that_agree_with_metrics_and_intervals(runs):
    run = runs["strong"]
    m = json.loads((run / "metrics.json").read_text())
    table = read_per_image(run)
    assert m["per_image"] == "per_image.csv" and list(table) == ["index", "label", "clean", *ATTACKS]
    assert table["index"].tolist() == list(range(60))
    assert table["clean"].mean() == pytest.approx(m["clean_acc"])
    for a in ATTACKS:
        assert table[a].mean() == pytest.approx(m["robust_acc"][a])
        assert not (table[a] & ~table["clean"]).any()  # robust implies clean-correct
    iv = m["intervals"]
    assert iv["n"] == 60 and iv["method"] == "wilson"
    lo, hi = iv["clean_acc"]
    assert lo < m["clean_acc"] < hi or m["clean_acc"] in (lo, hi)
    k = round(m["robust_acc"]["pgd20"] * 60)
    ci = binomtest(k, 60).proportion_ci(method="wilson" if 3 < k < 57 else "exact")  # Clopper-Pearson at the edge
    assert iv["robust_acc"]["pgd20"] == pytest.approx([ci.low, ci.high])
    report = (run / "report.md").read_text()
    assert "95% interval (wilson, n=60)" in report and f"[{lo:.4f}, {hi:.4f}]" in report


def test_compare_pairs_runs_image_by_image_with_mcnemar_and_holm(runs, tmp_path):
    res = compare_runs([runs["strong"], runs["weak"], runs["strong2"]], tmp_path / "cmp",
                       labels=["strong", "weak", "other"])
    paired = json.loads((tmp_path / "cmp" / "compare.json").read_text())["paired"]
    assert paired == json.loads(json.dumps(res["paired"]))
    assert paired["metric"] == "pgd20" and paired["n"] == 60 and len(paired["pairs"]) == 3
    a, b = read_per_image(runs["strong"])["pgd20"], read_per_image(runs["weak"])["pgd20"]
    pair = next(p for p in paired["pairs"] if {p["a"], p["b"]} == {"strong", "weak"})
    first = a if pair["a"] == "strong" else b
    second = b if pair["a"] == "strong" else a
    only_a, only_b = int((first & ~second).sum()), int((~first & second).sum())
    assert (pair["a_only"], pair["b_only"]) == (only_a, only_b)
    assert pair["diff"] == pytest.approx(first.mean() - second.mean())
    assert pair["p"] == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0)
    ps = sorted(p["p"] for p in paired["pairs"])
    assert min(p["p_holm"] for p in paired["pairs"]) == pytest.approx(min(1.0, 3 * ps[0]))
    means = [m["mean"] for m in paired["members"]]
    assert means == sorted(means, reverse=True)
    assert paired["best_group"][0] == paired["members"][0]["label"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Paired comparison" in report and (tmp_path / "cmp" / "plots" / "forest.png").exists()
    for p in paired["pairs"]:
        assert p["differ"] == (p["p_holm"] < 0.05)
        if not p["differ"]:
            assert f"| {p['a']} - {p['b']} |" in report and "cannot be told apart" in report


def test_two_runs_with_one_label_are_seeds_of_one_member(runs, tmp_path):
    res = compare_runs([runs["strong"], runs["strong2"], runs["weak"]], tmp_path / "cmp",
                       labels=["strong", "strong", "weak"])
    members = {m["label"]: m for m in res["paired"]["members"]}
    s = members["strong"]
    per = [read_per_image(runs[k])["pgd20"].mean() for k in ("strong", "strong2")]
    assert s["seeds"] == 2 and s["per_seed"] == pytest.approx(per)
    assert s["mean"] == pytest.approx(np.mean(per)) and s["sd"] == pytest.approx(np.std(per, ddof=1))
    assert s["interval"].startswith("none") and s["low"] is None  # two seeds: no seed variance, no interval
    (pair,) = res["paired"]["pairs"]
    assert pair["test"] is None and pair["differ"] is None and len(pair["per_seed"]) == 1  # weak has one seed
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "seed 0" in report and "Seed variance cannot be estimated" in report


def test_an_old_run_without_per_image_results_is_reported_unpaired(runs, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(runs["weak"], old)
    (old / "per_image.csv").unlink()
    res = compare_runs([runs["strong"], old], tmp_path / "cmp")
    assert [u["label"] for u in res["paired"]["unpaired"]] == ["old"]
    assert "no per_image.csv" in res["paired"]["unpaired"][0]["why"]
    assert [m["label"] for m in res["paired"]["members"]] == ["strong"]
    assert "unpaired: **old**" in (tmp_path / "cmp" / "report.md").read_text()


def bench_config(tmp_path, baselines, seeds):
    cfg = {"name": "bench", "out": str(tmp_path / "bench"), "data": {"dataset": "digits", "subset": 200},
           "budget": "20k", "methods": {}, "baselines": baselines, "seeds": seeds,
           "train": {"adv": "pgd", "epochs": 1, "batch_size": 32, "val_n": 32, "val_steps": 1,
                     "attack": {"eps": "0.1", "steps": 1}},
           "evaluate": {"attacks": ["fgsm", "pgd20"], "n": 30, "certify": []}}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_benchmark_seeds_and_a_new_member_paired_without_attacking_the_old_ones(tmp_path):
    result = CliRunner().invoke(app, ["benchmark", "--config", str(bench_config(tmp_path, ["cnn"], [0, 1])),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    bench = tmp_path / "bench"
    old = {p: os.stat(p).st_mtime_ns for p in bench.glob("baseline-cnn-s*/*")}
    assert {p.parent.name for p in old} == {"baseline-cnn-s0", "baseline-cnn-s1"}
    cfg = bench_config(tmp_path, ["cnn", "vgg"], [0, 1])
    result = CliRunner().invoke(app, ["benchmark", "--config", str(cfg), "--no-progress", "--resume"])
    assert result.exit_code == 0, result.output
    assert {p: os.stat(p).st_mtime_ns for p in bench.glob("baseline-cnn-s*/*")} == old  # nothing redone
    paired = json.loads((bench / "compare.json").read_text())["paired"]
    assert paired["unpaired"] == [] and paired["n"] == 30
    assert {m["label"]: m["seeds"] for m in paired["members"]} == {"cnn (hand-crafted)": 2, "vgg (hand-crafted)": 2}
    assert [p["test"] for p in paired["pairs"]] == [None]  # two seeds each: no seed-level test
    assert "each seed searched and trained its member anew" in (bench / "report.md").read_text()


def test_plan_estimates_every_member_and_writes_nothing(tmp_path):
    cfg = bench_config(tmp_path, ["cnn", "vgg", "mobilenetv2"], [0, 1])
    result = CliRunner().invoke(app, ["benchmark", "--config", str(cfg), "--plan", "--discordance", "0.3",
                                      "--seed-sd", "0.03"])
    assert result.exit_code == 0, result.output
    assert "cnn" in result.output and "for 2 seed(s)" in result.output
    from robustnas.core.stats import detectable_difference

    out = " ".join(result.output.split())
    # two seeds make no seed-level verdict: the plan gives what three would detect, Holm over the 3 pairs
    assert "no seed-level verdict" in out and "over 3 pairs" in out
    assert f"{detectable_difference(30, 3, 0.3, 0.03, pairs=3):.3f} at n=30" in out
    assert out.index("smallest AutoAttack difference") < out.index("estimated wall time")  # before any timing
    assert "after a few PGD-AT steps" in result.output
    assert not (tmp_path / "bench").exists()


def test_plan_needs_a_seed_sd_with_several_seeds_and_reads_one_from_a_previous_run(tmp_path):
    cfg = bench_config(tmp_path, ["cnn", "vgg"], [0, 1, 2])
    result = CliRunner().invoke(app, ["benchmark", "--config", str(cfg), "--plan"])
    assert result.exit_code != 0 and "--seed-sd" in " ".join(result.output.split())
    from robustnas.app.pipeline import BenchmarkCommand, power_plan, seed_sd_from
    from robustnas.core.stats import detectable_difference

    previous = tmp_path / "prev"
    previous.mkdir()
    (previous / "compare.json").write_text(json.dumps({"paired": {"members": [
        {"label": "a", "sd": 0.03}, {"label": "b", "sd": 0.04}, {"label": "c", "sd": None}]}}))
    measured = seed_sd_from(previous)
    assert measured["seed_sd"] == pytest.approx(math.sqrt((0.03 ** 2 + 0.04 ** 2) / 2)) and measured["members"] == 2
    cmd = BenchmarkCommand.model_validate(yaml.safe_load(cfg.read_text()))
    plan = power_plan(cmd, 0.2, measured["seed_sd"])
    assert plan["pairs"] == 1 and plan["detectable"][30] == detectable_difference(30, 3, 0.2, measured["seed_sd"])


def test_plan_extrapolates_search_cost_from_the_calibration_search(monkeypatch, data, tmp_path):
    """With a search whose epochs cost a known amount (set-up, per batch and per epoch, a warm-up epoch less
    than a full one), the estimate from one short calibration search's records is that cost."""
    from types import SimpleNamespace

    from robustnas.app import pipeline

    warm, full, fixed = (0.2, 1.0), (0.5, 3.0), 4.0  # (per batch, per epoch) of each kind; set-up

    def search(cfg):  # what the calibration search would record, from the settings it was given
        records = []
        for e in range(cfg.epochs):
            per_batch, per_epoch = warm if e < cfg.warmup_epochs else full
            records.append({"epoch": e, "seconds": cfg.max_batches_per_epoch * per_batch + per_epoch,
                            "images_per_s": cfg.batch_size / per_batch})
        return fixed + sum(r["seconds"] for r in records), SimpleNamespace(genotype=None, history=records)

    seen = []
    monkeypatch.setattr(pipeline, "_timed", lambda fn, *a, **k: seen.append(fn.__self__.cfg) or search(seen[-1]))
    settings = {"C": 4, "layers": 3, "epochs": 7, "batch_size": 8, "max_batches_per_epoch": 5, "warmup_epochs": 2}
    cost, _, strategy = pipeline.calibrate_search("darts", settings, data, 0.1, "Linf", "cpu", 0, tmp_path)
    (cal,) = seen  # one short search: two epochs of at most 4 batches, the first a warm-up one
    assert (cal.epochs, cal.max_batches_per_epoch, cal.warmup_epochs) == (2, 4, 1)
    assert strategy.cfg.warmup_epochs == 2  # the real settings, not the calibration's
    assert cost.seconds(strategy, len(data.train)) == pytest.approx(fixed + 2 * (5 * 0.2 + 1) + 5 * (5 * 0.5 + 3))


def test_plan_search_estimate_grows_with_the_batches_it_will_run(data, tmp_path):
    """A real calibration search (darts, tiny): doubling max_batches_per_epoch doubles the batches' share of
    the estimate (its per-batch cost was measured, > 0) and leaves set-up and per-epoch costs as they are."""
    from robustnas.app import pipeline
    from robustnas.search import build_strategy

    settings = {"C": 4, "layers": 3, "epochs": 3, "batch_size": 8, "max_batches_per_epoch": 6, "val_n": 16,
                "val_steps": 1}
    cost, genotype, strategy = pipeline.calibrate_search("darts", settings, data, 0.1, "Linf", "cpu", 0, tmp_path)
    assert genotype is not None and cost.full[0] > 0 and cost.full[1] >= 0 and cost.warm is None
    one = cost.seconds(strategy, len(data.train))
    two = cost.seconds(build_strategy("darts", {**settings, "max_batches_per_epoch": 12}), len(data.train))
    assert two - one == pytest.approx(3 * 6 * cost.full[0])
    assert one < two <= 2 * one
    more_epochs = cost.seconds(build_strategy("darts", {**settings, "epochs": 6}), len(data.train))
    assert more_epochs - one == pytest.approx(3 * (6 * cost.full[0] + cost.full[1]))


def test_evaluate_takes_the_exact_interval_and_refuses_an_unknown_one(runs, tmp_path):
    import shutil

    from robustnas.core.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(runs["weak"], run)
    m = evaluate_run(run, attacks=("fgsm",), n=20, device="cpu", progress=False, interval="exact")
    k = round(m["clean_acc"] * 20)
    ci = binomtest(k, 20).proportion_ci(method="exact")
    assert m["intervals"]["method"] == "exact" and m["intervals"]["clean_acc"] == pytest.approx([ci.low, ci.high])
    with pytest.raises(UserError, match="unknown interval"):
        evaluate_run(run, attacks=("fgsm",), n=20, device="cpu", progress=False, interval="wald")


def test_compare_command_takes_labels_that_join_seeds(runs, tmp_path):
    dirs = [str(runs["strong"]), str(runs["strong2"]), str(runs["weak"])]
    result = CliRunner().invoke(app, ["compare", *dirs, "--out", str(tmp_path / "cmp"), "--labels", "s,s,w"])
    assert result.exit_code == 0, result.output
    paired = json.loads((tmp_path / "cmp" / "compare.json").read_text())["paired"]
    assert {m["label"]: m["seeds"] for m in paired["members"]} == {"s": 2, "w": 1}
    result = CliRunner().invoke(app, ["compare", *dirs, "--out", str(tmp_path / "cmp2"), "--labels", "s,w"])
    assert result.exit_code == 2 and "3 run directories" in result.output


def test_sequential_evaluation_stops_a_pair_once_its_interval_excludes_zero(runs, tmp_path):
    import shutil

    from robustnas.app.pipeline import sequential_evaluation

    dirs = []
    for name in ("strong", "weak", "strong2"):
        shutil.copytree(runs[name], tmp_path / name)
        dirs.append(tmp_path / name)
    first = {d.name: (d / "per_image.csv").read_text() for d in dirs}
    stops = sequential_evaluation(dirs, ["strong", "weak", "other"], chunk=20, max_n=100, device="cpu")
    by_pair = {frozenset((q["a"], q["b"])): q for q in stops}
    assert len(by_pair) == 3
    rows = {d.name: len(read_per_image(d)["index"]) for d in dirs}
    for q in by_pair.values():
        assert q["n"] <= 100 and q["early"] == (q["n"] < 100)
        assert (q["differ"] and "differs" in q["why"]) or ("maximum" in q["why"] and q["n"] == 100)
        assert q["p"] == q["looks"][-1][1] and [k for k, _ in q["looks"]] == list(range(60, q["n"] + 1, 20))
    # the first 60 images were not attacked again: their rows are unchanged
    for d in dirs:
        assert (d / "per_image.csv").read_text().startswith(first[d.name])
        t = read_per_image(d)
        assert t["index"].tolist() == list(range(rows[d.name])) and not (t["pgd20"] & ~t["clean"]).any()
    # a member grows only while one of its pairs is undecided
    for d, label in zip(dirs, ["strong", "weak", "other"]):
        assert (rows[d.name] > 60) == any(q["n"] > 60 for p, q in by_pair.items() if label in p)
    assert by_pair[frozenset(("strong", "other"))]["n"] == 100  # two equal networks: grown to the maximum
    res = compare_runs(dirs, tmp_path / "cmp", labels=["strong", "weak", "other"], sequential=stops)
    assert res["paired"]["sequential"] == stops
    assert "Sequential evaluation" in (tmp_path / "cmp" / "report.md").read_text()


@pytest.mark.parametrize("method,settings", [("darts", {}), ("advrush", {"alpha_batch": "fixed"}),
                                             ("advrush", {"alpha_batch": "split"}), ("tamnas", {})])
def test_plan_counts_the_steps_per_epoch_the_search_will_run(data, method, settings):
    """The plan's steps per epoch come from the strategy itself (`steps_for`) and equal what its set-up then
    runs: AdvRush's fixed alpha batch walks the whole training split, DARTS' halves half of it."""
    from robustnas.app import pipeline
    from robustnas.search import SearchContext, build_strategy

    tiny = {"C": 2, "layers": 3} if method != "tamnas" else {}
    strategy = build_strategy(method, {**tiny, **settings, "batch_size": 10, "epochs": 1})
    planned = pipeline.batches_per_epoch(strategy, len(data.train))
    strategy.setup(SearchContext(data=data, eps=0.1, seed=0, progress=False))
    ran = strategy.trainer.steps_per_epoch if method == "tamnas" else strategy.steps_per_epoch
    assert planned == ran
    whole = math.ceil(len(data.train) / 10)
    assert planned == (whole if method == "tamnas" or settings.get("alpha_batch") == "fixed" else
                       math.ceil(round(0.5 * len(data.train)) / 10))
