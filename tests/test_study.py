"""The architecture study (study.py, ensemble.py, study_report.py), the random genotype sampler and the
random search strategy, on digits with tiny networks."""

from __future__ import annotations

import copy
import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from robustnas.evaluation.analysis import hrs
from robustnas.nets.arch import build_arch, channels_for_params
from robustnas.robustness.attacks import accuracy
from robustnas.app.cli import app
from robustnas.core.config import SearchCommand, validate
from robustnas.data.datasets import load_dataset
from robustnas.evaluation.ensemble import (FeatureEnsemble, LogitEnsemble, feature_ensemble, feature_ensemble_params, init_weights,
                                split_classifier)
from robustnas.core.errors import UserError
from robustnas.nets.genotypes import build_network, load_genotype
from robustnas.nets.arch import load_model
from robustnas.nets.spaces.darts import PRIMITIVES, Genotype, random_genotype
from robustnas.nets.size import count_params
from robustnas.app.study import StudyCommand, matched_member_params, run_study, sized_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _net(genotype, meta, C=4, layers=3):
    return build_network(genotype, C=C, layers=layers, num_classes=meta.num_classes, in_shape=meta.shape,
                         mean=meta.mean, std=meta.std)


# ------------------------------------------------------------------------------------------ random genotypes
def test_random_genotype_is_a_valid_derivation_reproducible_and_seed_dependent(digits):
    draws = [random_genotype(seed) for seed in range(40)]
    ops, inputs = Counter(), Counter()
    for g in draws:
        for kind in ("normal", "reduce"):
            cell, concat = g.cell(kind)
            assert len(cell) == 8 and concat == [2, 3, 4, 5]
            for node in range(4):
                (op_a, a), (op_b, b) = cell[2 * node], cell[2 * node + 1]
                assert a != b and 0 <= a < node + 2 and 0 <= b < node + 2  # two distinct earlier states
                assert "none" not in (op_a, op_b)
                ops.update([op_a, op_b])
                inputs.update([(node, a), (node, b)])
        assert Genotype.from_json(g.to_json()) == g  # survives JSON
    # every non-none op and every possible input of every node occurs
    assert set(ops) == set(PRIMITIVES) - {"none"}
    assert set(inputs) == {(node, j) for node in range(4) for j in range(node + 2)}
    # reproducible for a seed (int or Generator), different across seeds
    assert random_genotype(7) == random_genotype(np.random.default_rng(7)) == draws[7]
    assert len({g.to_json() for g in draws}) == len(draws)
    # a drawn genotype builds a network that runs
    out = _net(draws[0], digits.meta)(digits.test.x[:4])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    arnas = random_genotype(3, space="arnas")
    assert arnas.space == "arnas" and arnas.robust is not None and arnas.accurate is not None
    with pytest.raises(UserError, match="space"):
        random_genotype(0, space="tiny")
    with pytest.raises(UserError, match="primitives"):
        random_genotype(0, primitives=["none"])


# ------------------------------------------------------------------------------------------ ensembles
def test_logit_ensemble_is_the_mean_of_its_members_logits(digits):
    meta, x = digits.meta, digits.test.x[:16]
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_arch("cnn", meta, width=0.25)[0].eval())
    ens = LogitEnsemble(members).eval()
    with torch.no_grad():
        expected = (members[0](x) + members[1](x) + members[2](x)) / 3
        assert torch.allclose(ens(x), expected, atol=1e-6)
        assert not torch.allclose(members[0](x), members[1](x))  # the members differ, so the mean is not trivial
    # white-box: the input gradient flows through every member
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ens(xg).logsumexp(1).sum(), xg)
    assert g.abs().sum() > 0


def test_feature_ensemble_averages_pooled_features_under_one_classifier(digits):
    meta, x = digits.meta, digits.test.x[:16]
    genotype = load_genotype("darts_v2")
    torch.manual_seed(0)
    net = _net(genotype, meta).eval()
    # split_classifier keeps the function: classifier(body(x)) is the network's output
    body, linear = split_classifier(copy.deepcopy(net))
    with torch.no_grad():
        assert torch.allclose(linear(body(x)), net(x), atol=1e-6)
        assert body(x).shape == (16, linear.in_features)

    inits = ["kaiming_normal", "xavier_normal", "kaiming_uniform"]
    ens = feature_ensemble(lambda: _net(genotype, meta), inits, seed=5).eval()
    assert isinstance(ens, FeatureEnsemble) and len(ens.bodies) == 3
    with torch.no_grad():
        feats = [b(x) for b in ens.bodies]
        assert torch.allclose(ens(x), ens.classifier((feats[0] + feats[1] + feats[2]) / 3), atol=1e-6)
        assert not torch.allclose(feats[0], feats[1])  # different initialisations, different features
    # the same seed builds the same ensemble
    again = feature_ensemble(lambda: _net(genotype, meta), inits, seed=5).eval()
    with torch.no_grad():
        assert torch.equal(again(x), ens(x))
    # one loss trains every body and the shared classifier
    ens.train()
    torch.nn.functional.cross_entropy(ens(x), digits.test.y[:16]).backward()
    for part in [*ens.bodies, ens.classifier]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_default_init_is_the_public_codes_kaiming_fan_out_on_convs_only():
    """tdchaitanya/nas-robustness (DARTSEnsemble*): kaiming_normal_/kaiming_uniform_ with mode fan_out and relu,
    xavier_normal_, on Conv2d weights only; BatchNorm to 1/0; Linear layers keep PyTorch's default."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 256, 3, bias=False), torch.nn.BatchNorm2d(256),
                                torch.nn.Linear(400, 300))
    conv, bn, linear = model
    fan_in, fan_out = 64 * 9, 256 * 9
    expected = {"kaiming_normal": (2 / fan_out) ** 0.5, "xavier_normal": (2 / (fan_in + fan_out)) ** 0.5,
                "kaiming_uniform": (2 / fan_out) ** 0.5}
    linear_before = linear.weight.detach().clone()
    for scheme, std in expected.items():
        with torch.no_grad():
            bn.weight.fill_(3.0), bn.bias.fill_(0.5)
        init_weights(model, scheme)
        assert abs(conv.weight.std().item() - std) < 0.03 * std
        assert torch.equal(linear.weight, linear_before) and linear.bias.abs().sum() > 0
        assert (bn.weight == 1).all() and (bn.bias == 0).all()
    # kaiming_uniform is uniform: its bound is sqrt(3) standard deviations
    assert conv.weight.abs().max().item() == pytest.approx(3 ** 0.5 * expected["kaiming_uniform"], rel=0.01)


def test_fan_in_conv_linear_init_is_the_previous_behaviour():
    torch.manual_seed(0)
    layer = torch.nn.Linear(400, 300)
    fan_in, fan_out = 400, 300
    expected = {"kaiming_normal": (2 / fan_in) ** 0.5, "xavier_normal": (2 / (fan_in + fan_out)) ** 0.5,
                "kaiming_uniform": (2 / fan_in) ** 0.5}
    for scheme, std in expected.items():
        init_weights(layer, scheme, mode="fan_in", layers="conv_linear")
        assert abs(layer.weight.std().item() - std) < 0.03 * std
        assert layer.bias.abs().sum() == 0
    conv = torch.nn.Conv2d(64, 256, 3)
    init_weights(conv, "kaiming_normal", mode="fan_in", layers="conv_linear")
    assert abs(conv.weight.std().item() - (2 / (64 * 9)) ** 0.5) < 0.03 * (2 / (64 * 9)) ** 0.5
    with pytest.raises(UserError, match="initialisation"):
        init_weights(layer, "orthogonal")
    with pytest.raises(UserError, match="mode"):
        init_weights(layer, "kaiming_normal", mode="fan_avg")


def test_feature_ensemble_keeps_the_classifier_at_its_default_init(digits):
    """As the public code's fresh nn.Linear: the shared classifier is not re-initialised by default (it was,
    under the first scheme, before), while every body's convolutions are."""
    meta, genotype = digits.meta, load_genotype("darts_v2")
    ens = feature_ensemble(lambda: _net(genotype, meta), ["kaiming_normal", "xavier_normal"], seed=5)
    torch.manual_seed(5)
    fresh = _net(genotype, meta)
    assert torch.equal(ens.classifier.weight, fresh.classifier.weight)
    assert not torch.equal(ens.bodies[0].stem[1].weight, fresh.stem[1].weight)  # the stem conv is re-initialised
    old = feature_ensemble(lambda: _net(genotype, meta), ["kaiming_normal", "xavier_normal"], seed=5,
                           mode="fan_in", layers="conv_linear")
    assert not torch.equal(old.classifier.weight, fresh.classifier.weight) and old.classifier.bias.abs().sum() == 0


def _tiny_cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 10))


def test_one_by_one_ensemble_is_a_1x1_conv_on_the_concatenated_feature_maps(digits):
    """The public DARTSEnsembleOneByOne: the members' final feature maps concatenated, a 1x1 conv (with bias)
    back to one member's channels, global pooling, one classifier."""
    x = digits.test.x[:16]
    inits = ["kaiming_normal", "xavier_normal", "kaiming_uniform"]
    ens = feature_ensemble(_tiny_cnn, inits, seed=2, combine="one_by_one").eval()
    maps = torch.cat([b[:2](x) for b in ens.bodies], 1)  # each body's conv + relu: its final feature map
    conv = torch.nn.Conv2d(12, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(ens.combine.weight.view(4, 12, 1, 1))
        conv.bias.copy_(ens.combine.bias)
        public = ens.classifier(conv(maps).mean((2, 3)))
        assert torch.allclose(ens(x), public, atol=1e-5)
        mean = feature_ensemble(_tiny_cnn, inits, seed=2).eval()
        assert mean.combine is None and not torch.allclose(mean(x), ens(x))
    # the combine layer learns with the rest; the size formula counts what is built
    torch.nn.functional.cross_entropy(ens.train()(x), digits.test.y[:16]).backward()
    assert ens.combine.weight.grad.abs().sum() > 0
    for combine, model in (("one_by_one", ens), ("mean", mean)):
        assert feature_ensemble_params(_tiny_cnn(), 3, combine) == count_params(model)
    assert count_params(ens) - count_params(mean) == 3 * 4 * 4 + 4


def test_matched_member_params_keeps_the_ensemble_within_the_budget(digits):
    meta, genotype, budget, k = digits.meta, load_genotype("darts_v2"), 20000, 3
    cmd = validate(StudyCommand, {"layers": 3})
    for combine in ("mean", "one_by_one"):
        p = matched_member_params(lambda q: sized_model(cmd, meta, genotype, q), budget, k, combine, "darts_v2")
        assert p <= budget // k
        member = sized_model(cmd, meta, genotype, p)
        ens = feature_ensemble(lambda: sized_model(cmd, meta, genotype, p), ["kaiming_normal"] * k, seed=0,
                               combine=combine)
        assert count_params(member) <= budget // k and count_params(ens) <= budget
        assert all(count_params(b) < budget / k for b in ens.bodies)
        # the next C up would break the budget: p is the largest member budget that fits
        C = channels_for_params(genotype, meta, 3, p)
        bigger = _net(genotype, meta, C=C + 2, layers=3)
        assert count_params(bigger) > budget // k or feature_ensemble_params(bigger, k, combine) > budget
    with pytest.raises(UserError, match="does not fit"):
        matched_member_params(lambda q: sized_model(cmd, meta, genotype, q), 3000, k, "one_by_one", "darts_v2")


def test_hrs_is_the_harmonic_mean_of_clean_and_robust_accuracy():
    assert hrs(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert hrs(0.6, 0.6) == pytest.approx(0.6)
    assert hrs(0.9, 0.0) == 0.0 and hrs(0.0, 0.0) == 0.0
    assert hrs(0.9, 0.1) < (0.9 + 0.1) / 2  # below the arithmetic mean when the two differ


# ------------------------------------------------------------------------------------------ the study
STUDY = {
    "device": "cpu", "data": {"dataset": "digits", "subset": 400}, "params": "8k", "layers": 3, "random": 2,
    "published": ["darts_v2"], "handcrafted": ["cnn"],
    "train": {"adv": "none", "epochs": 1, "batch_size": 32, "lr": 0.1, "val_n": 50, "val_steps": 1},
    "attacks": ["fgsm", "pgd20"], "eps": ["0.05", "0.2"], "n": 40, "batch_size": 40,
    "ensembles": {"feature": ["cnn"], "inits": ["kaiming_normal", "xavier_normal"], "random": [2]},
}
MODELS = ["random-0", "random-1", "darts_v2", "cnn", "random-0-1of2", "random-1-1of2"]
ENSEMBLES = ["feature-cnn", "feature-cnn-matched", "onebyone-cnn", "onebyone-cnn-matched", "logit-random-2",
             "logit-random-2-matched"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    cfg = tmp_path_factory.mktemp("cfg") / "study.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(STUDY))
    result = CliRunner().invoke(app, ["study", "--config", str(cfg), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def test_study_reports_every_architecture_and_ensemble(study, digits):
    s = json.loads((study / "study.json").read_text())
    assert [m["name"] for m in s["models"]] == MODELS
    assert [m["group"] for m in s["models"]] == ["random", "random", "published", "handcrafted", "member", "member"]
    assert [e["name"] for e in s["ensembles"]] == ENSEMBLES
    assert s["eps"] == ["0.05", "0.2"] and s["attacks"] == ["fgsm", "pgd20"]
    for r in s["models"] + s["ensembles"]:
        for e in s["eps"]:
            acc = r["robust_acc_by_eps"][e]
            assert set(acc) == {"fgsm", "pgd20"}
            # robust means right clean and attacked; worst means robust to both attacks
            assert r["worst_acc"][e] <= min(acc.values()) <= max(acc.values()) <= r["clean_acc"]
            assert r["hrs"][e] == pytest.approx(hrs(r["clean_acc"], r["worst_acc"][e]))
        assert r["in_ball"] and r["flops"] > 0
    # single networks stay within the budget; the random genotypes are the seed's draws
    for m in s["models"][:4]:
        assert m["params"] <= 8000
    for k in range(2):
        assert load_genotype(str(study / "genotypes" / f"random-{k}.json")).normal is not None
    # group means and the NAS - hand-crafted difference follow from the rows (members are in no group)
    e = "0.05"
    nas = [m["robust_acc_by_eps"][e]["pgd20"] for m in s["models"] if m["group"] in ("random", "published")]
    assert s["groups"]["nas"][e]["count"] == 3
    assert s["groups"]["nas"][e]["pgd20"] == pytest.approx(sum(nas) / 3)
    assert s["nas_minus_handcrafted"][e]["pgd20"] == pytest.approx(sum(nas) / 3 - s["models"][3]["robust_acc_by_eps"][e]["pgd20"])
    by = {r["name"]: r for r in s["models"] + s["ensembles"]}
    # the feature ensembles: the public code's initialisation by default; two bodies and one classifier
    fe = by["feature-cnn"]
    assert fe["job"]["init_mode"] == "fan_out" and fe["job"]["init_layers"] == "conv"
    assert by["cnn"]["params"] < fe["params"] < 2 * by["cnn"]["params"] < by["onebyone-cnn"]["params"]
    # unmatched: every member at the full budget; matched: the whole ensemble within it, each member at most half
    for name in ENSEMBLES:
        r = by[name]
        assert r["budget"] == ("matched" if name.endswith("-matched") else "unmatched")
        assert r["reference"] == (["cnn"] if "cnn" in name else ["random-0", "random-1"])  # full-budget rows
        if r["budget"] == "matched":
            assert r["params"] <= 8000
            if r["kind"] == "feature":
                assert r["job"]["params"] <= 4000
    for m in ("random-0-1of2", "random-1-1of2"):
        assert by[m]["params"] <= 4000 and by[m]["job"]["params"] == 4000
    assert by["logit-random-2-matched"]["job"]["members"] == ["random-0-1of2", "random-1-1of2"]
    assert by["logit-random-2-matched"]["params"] == by["random-0-1of2"]["params"] + by["random-1-1of2"]["params"]
    assert by["onebyone-cnn-matched"]["job"]["params"] < by["feature-cnn-matched"]["job"]["params"] == 4000
    le = by["logit-random-2"]
    assert le["params"] == by["random-0"]["params"] + by["random-1"]["params"]
    assert le["gain_vs_mean"][e]["pgd20"] == pytest.approx(
        le["robust_acc_by_eps"][e]["pgd20"] - (by["random-0"]["robust_acc_by_eps"][e]["pgd20"]
                                        + by["random-1"]["robust_acc_by_eps"][e]["pgd20"]) / 2)
    lm = by["logit-random-2-matched"]  # compared with the same genotypes at the full budget
    assert lm["gain_vs_mean"][e]["pgd20"] == pytest.approx(
        lm["robust_acc_by_eps"][e]["pgd20"] - (by["random-0"]["robust_acc_by_eps"][e]["pgd20"]
                                        + by["random-1"]["robust_acc_by_eps"][e]["pgd20"]) / 2)
    assert lm["reference_params"] == pytest.approx((by["random-0"]["params"] + by["random-1"]["params"]) / 2)


def test_the_logit_ensemble_row_is_the_ensemble_of_the_saved_members(study):
    s = json.loads((study / "study.json").read_text())
    data = load_dataset("digits", subset=400)
    by = {r["name"]: r for r in s["models"] + s["ensembles"]}
    x, y = data.test.x[:40], data.test.y[:40]
    for ens in ("logit-random-2", "logit-random-2-matched"):
        members = [load_model(study / "models" / name)[0] for name in by[ens]["job"]["members"]]
        assert accuracy(LogitEnsemble(members), x, y) == pytest.approx(by[ens]["clean_acc"])
        assert accuracy(members[0], x, y) == pytest.approx(by[by[ens]["job"]["members"][0]]["clean_acc"])


def test_a_study_model_directory_is_a_run_directory(study):
    from robustnas.evaluation.evaluate import evaluate_run

    s = json.loads((study / "study.json").read_text())
    m = evaluate_run(study / "models" / "darts_v2", attacks=["fgsm"], n=40, device="cpu", progress=False)
    assert m["dataset"] == "digits" and m["params"] == s["models"][2]["params"]
    assert m["clean_acc"] == pytest.approx(s["models"][2]["clean_acc"])  # the same model on the same images


def test_study_writes_report_table_and_plots(study):
    s = json.loads((study / "study.json").read_text())
    report = (study / "report.md").read_text()
    for e in s["eps"]:
        assert f"## eps {e}" in report
    for name in MODELS + ENSEMBLES:
        rows = [line for line in report.splitlines() if line.startswith(f"| {name} |")]
        per_eps = 2 if name in ENSEMBLES else 1  # ensembles also fill the ensembles table
        assert len(rows) == per_eps * len(s["eps"])
    assert "NAS - hand-crafted" in report and "## Ensembles" in report
    # both comparisons, each ensemble under its own heading
    unmatched, matched = report.index("### Unmatched"), report.index("### Budget-matched")
    assert unmatched < report.index("| logit-random-2 | random-0, random-1 |") < matched
    assert matched < report.index("| logit-random-2-matched | random-0-1of2, random-1-1of2 |")
    rows = list(csv.DictReader((study / "table.csv").open()))
    assert len(rows) == 12 * (1 + 2 * 3)  # per model: clean, and per eps two attacks + worst
    assert all(int(r["flops"]) > 0 for r in rows)
    assert {r["attack"] for r in rows} == {"clean", "fgsm", "pgd20", "worst"}
    for png in ("robust_vs_eps", "groups", "ensembles"):
        assert (study / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_pickled_worker_reproduces_a_job(study, tmp_path):
    """What the pool and Ray executors rely on: the worker survives pickling and its job fixes its result."""
    import pickle

    from robustnas.data.datasets import Dataset, Split
    from robustnas.app.study import StudyWorker

    s = json.loads((study / "study.json").read_text())
    row = next(m for m in s["models"] if m["name"] == "cnn")
    cmd = validate(StudyCommand, STUDY)
    data = load_dataset("digits", subset=400)
    used = Dataset(data.meta, data.train, Split(data.val.x[:50], data.val.y[:50]),
                   Split(data.test.x[:40], data.test.y[:40]))
    worker = pickle.loads(pickle.dumps(StudyWorker(cmd, used, tmp_path, "cpu")))
    again = worker(row["job"])
    assert again["robust_acc_by_eps"] == row["robust_acc_by_eps"] and again["clean_acc"] == row["clean_acc"]


def test_study_resume_reuses_finished_jobs(study):
    before = json.loads((study / "study.json").read_text())
    cmd = validate(StudyCommand, {**STUDY, "out": str(study)})
    with pytest.raises(UserError, match="already exists"):
        run_study(cmd, progress=False)
    again = run_study(cmd, resume=True, progress=False)
    assert [m["seconds"] for m in again["models"]] == [m["seconds"] for m in before["models"]]  # nothing rerun
    assert [m["robust_acc_by_eps"] for m in again["ensembles"]] == [m["robust_acc_by_eps"] for m in before["ensembles"]]


@pytest.mark.parametrize("change, message", [
    ({"ensembles": {"feature": ["resnet"], "random": []}}, "ensembles.feature"),
    ({"ensembles": {"feature": [], "random": [3]}}, "ensembles.random"),
    ({"handcrafted": ["alexnet"]}, "hand-crafted"),
    ({"attacks": ["pgd20", "nope"]}, "unknown attack"),
    ({"published": ["darts_v2"], "params": "100"}, "budget"),
    ({"params": "5k", "ensembles": {"feature": ["random-0"], "combine": ["one_by_one"], "random": []}},
     "one_by_one feature ensemble of 3 random-0 does not fit"),
    ({"params": "5k", "ensembles": {"feature": [], "random": [2]}}, "budget-matched logit ensemble of 2"),
])
def test_study_rejects_bad_settings_before_writing(tmp_path, change, message):
    cmd = validate(StudyCommand, {**STUDY, **change, "out": str(tmp_path / "s")})
    with pytest.raises(UserError, match=message):
        run_study(cmd, progress=False)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ random search
def test_random_search_scores_its_draws_and_returns_the_best(tmp_path):
    from robustnas.app.pipeline import search_run

    settings = {"n": 3, "layers": 3, "C": 4, "train_n": 200, "chunk": 2,
                "train": {"epochs": 1, "batch_size": 50, "adv": "fgsm-rs", "val_n": 50, "val_steps": 2,
                          "select": "last"}}
    cmd = validate(SearchCommand, {"method": "random", "device": "cpu", "seed": 3, "out": str(tmp_path / "r"),
                                   "data": {"dataset": "digits"}, "search": settings})
    result, out = search_run(cmd, progress=False)
    lines = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    # the candidates are the seed's first three draws, each scored by HRS of its validation accuracies
    rng = np.random.default_rng(3)
    assert [rec["genotype"] for rec in lines] == [random_genotype(rng).to_dict() for _ in range(3)]
    assert [rec["index"] for rec in lines] == [0, 1, 2]
    for rec in lines:
        assert rec["score"] == pytest.approx(hrs(rec["val_clean"], rec["val_robust"]))
        assert rec["C"] == 4 and rec["params"] > 0
    best = max(lines, key=lambda r: (r["score"], r["val_clean"], -r["index"]))
    saved = load_genotype(str(out / "genotype.json"))
    assert saved.normal == Genotype.from_dict(best["genotype"]).normal and result.extra["chosen"] == best["index"]
    # resume finds every candidate done and gives the same answer without training
    again, _ = search_run(cmd, resume=True, progress=False)
    assert again.history == result.history


def test_random_search_first_and_budget(digits):
    from robustnas.search import SearchContext, build_strategy

    first = build_strategy("random", {"n": 4, "select": "first", "layers": 3}).search(
        SearchContext(data=digits, eps=0.1, seed=11, progress=False))
    assert first.genotype.normal == random_genotype(11).normal and len(first.history) == 1
    sized = build_strategy("random", {"n": 2, "params": "4k", "layers": 3})
    items = sized.candidates(SearchContext(data=digits, eps=0.1, seed=0, progress=False))
    for it in items:
        net = _net(Genotype.from_dict(it["genotype"]), digits.meta, C=it["C"])
        assert it["C"] % 2 == 0 and sum(p.numel() for p in net.parameters()) <= 4000
    with pytest.raises(UserError, match="even C"):
        build_strategy("random", {"C": 5})
