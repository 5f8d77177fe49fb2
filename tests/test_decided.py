"""A search that decided nothing (alphas near uniform, supernet near chance) says so (issue 16)."""

import json

import torch
import yaml
from typer.testing import CliRunner

from robustnas.evaluation.analysis import NEAR_UNIFORM, accuracy_vs_chance, alpha_spread, search_decision
from robustnas.app.cli import app
from robustnas.core.config import DataConfig
from robustnas.app.pipeline import load_data
from robustnas.results.report import decision_section
from robustnas.search import SearchContext, build_strategy

TINY = {"C": 2, "layers": 3, "epochs": 1, "batch_size": 16, "max_batches_per_epoch": 1, "val_n": 64, "val_steps": 1}


def _search(tmp_path, **over):
    torch.set_num_threads(1)
    data = load_data(DataConfig(dataset="digits", subset=400), seed=0)
    strategy = build_strategy("darts", {**TINY, **over})
    return strategy.search(SearchContext(data=data, eps=0.1, out_dir=tmp_path, progress=False))


def test_one_tiny_alpha_step_is_flagged_near_uniform(tmp_path):
    result = _search(tmp_path, alpha_lr=1e-6)
    d = result.decision
    assert d["alphas"]["near_uniform"] and d["alphas"]["max_dev"] < NEAR_UNIFORM
    assert not d["decided"] and any("near uniform" in w for w in d["warnings"])
    assert d["accuracy"]["n"] == 64 and d["accuracy"]["chance"] == 0.1
    last = json.loads((tmp_path / "search.jsonl").read_text().splitlines()[-1])
    assert last["decision"]["alphas"]["near_uniform"]
    assert "it decided nothing" in "\n".join(decision_section(d))


def test_alphas_far_from_uniform_are_not_flagged():
    far = {"normal": [[0.6, 0.1, 0.1, 0.1, 0.1]] * 3, "reduce": [[0.05, 0.05, 0.8, 0.05, 0.05]] * 3}
    s = alpha_spread(far)
    assert not s["near_uniform"] and abs(s["max_dev"] - 0.6) < 1e-9 and abs(s["mean_margin"] - (0.5 + 0.75) / 2) < 1e-9
    assert s["entropy_ratio"] < 0.9
    uniform = {"normal": [[0.2] * 5] * 3}
    assert alpha_spread(uniform)["near_uniform"] and abs(alpha_spread(uniform)["entropy_ratio"] - 1) < 1e-9
    d = search_decision(far, acc=0.9, n=128, num_classes=10)
    assert d["decided"] and d["warnings"] == []
    assert search_decision(None, acc=None) == {}


def test_supernet_at_chance_is_flagged():
    at_chance = accuracy_vs_chance(0.11, 128, 10)
    assert at_chance["near_chance"] and at_chance["low"] < 0.11 < at_chance["high"]
    assert not accuracy_vs_chance(0.6, 128, 10)["near_chance"]
    far = {"normal": [[0.6, 0.1, 0.1, 0.1, 0.1]]}
    d = search_decision(far, acc=0.11, n=128, num_classes=10)
    assert not d["decided"] and len(d["warnings"]) == 1 and "supernet near chance" in d["warnings"][0]


def test_search_cli_warns_when_nothing_was_decided(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"search": {**TINY, "alpha_lr": 1e-6}}))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", "--method", "darts", "--dataset", "digits", "--subset", "400",
                                      "--config", str(cfg), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "WARNING: the search decided nothing: alphas near uniform" in result.output
    assert json.loads((out / "decision.json").read_text())["alphas"]["near_uniform"]


def test_random_search_reports_its_scorer_against_chance():
    torch.set_num_threads(1)
    data = load_data(DataConfig(dataset="digits", subset=400), seed=0)
    settings = {"n": 1, "layers": 3, "C": 4, "train_n": 100,
                "train": {"epochs": 1, "batch_size": 50, "adv": "none", "lr": 1e-9, "val_n": 50, "val_steps": 1,
                          "select": "last"}}
    result = build_strategy("random", settings).search(SearchContext(data=data, eps=0.1, progress=False))
    d = result.decision
    assert "alphas" not in d and d["accuracy"]["of"].startswith("proxy scorer") and d["accuracy"]["n"] == 50
    assert d["accuracy"]["acc"] == result.history[0]["val_clean"]
    assert not d["decided"] and "proxy scorer (chosen draw) near chance" in d["warnings"][0]


def test_tamnas_reports_its_supernet_against_chance():
    from tests.test_tamnas import TINY as TAM

    torch.set_num_threads(1)
    data = load_data(DataConfig(dataset="digits", subset=400), seed=0)
    result = build_strategy("tamnas", TAM).search(SearchContext(data=data, eps=0.1, progress=False))
    acc = result.decision["accuracy"]
    assert acc["of"] == "supernet (largest subnet)" and acc["n"] == TAM["val_n"]
    last = [r for r in result.history if r.get("phase") == "supernet"][-1]
    assert acc["acc"] == last["val_clean_largest"]
