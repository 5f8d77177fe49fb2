"""`robustnas benchmark` and `robustnas compare` at test size: every member at one budget, one report."""

import json
from pathlib import Path
import os

import pytest
import yaml
from typer.testing import CliRunner

from robustnas.app.cli import app
from robustnas.results.compare import load_entry, robust_metric
from robustnas.core.errors import UserError

DARTS = {"C": 4, "layers": 3, "epochs": 1, "batch_size": 16, "max_batches_per_epoch": 2, "val_n": 16, "val_steps": 1}
TAMNAS = {"epochs": 1, "max_batches_per_epoch": 2, "batch_size": 16, "attack_steps": 1, "val_n": 20, "eval_n": 20,
          "eval_pgd_steps": 1, "recal_batches": 1, "recal_batch_size": 16, "pop_size": 4, "generations": 1}


def bench_config(tmp_path, **over):
    cfg = {"name": "bench", "seed": 0, "out": str(tmp_path / "bench"), "data": {"dataset": "digits", "subset": 300},
           "budget": "60k", "layers": 3, "reduction_layers": [0, 1], "methods": {"darts": DARTS, "tamnas": TAMNAS}, "baselines": ["cnn"],
           "train": {"adv": "pgd", "epochs": 1, "batch_size": 32, "val_n": 32, "val_steps": 1,
                     "attack": {"eps": "0.1", "steps": 1}},
           "evaluate": {"attacks": ["fgsm", "pgd20"], "n": 30, "certify": []}, **over}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(app, ["benchmark", "--config", str(bench_config(tmp)), "--no-progress"])
    assert result.exit_code == 0, result.output
    return tmp / "bench"


def test_benchmark_runs_every_member_within_the_budget_and_writes_one_report(bench):
    data = json.loads((bench / "compare.json").read_text())
    labels = [e["label"] for e in data["entries"]]
    assert labels == ["darts", "tamnas", "cnn (hand-crafted)"]
    for e in data["entries"]:
        assert e["params"] <= 60_000, e["label"]
        assert e["pgd20"] <= e["clean_acc"] and e["dataset"] == "digits" and e["eps"] == "0.1"
    report = (bench / "report.md").read_text()
    assert all(f"| {label} |" in report for label in labels)
    assert (bench / "plots" / "pareto.png").exists()
    assert "Operations by cell position" in report and "**darts**" in report and "**tamnas**" not in report
    spec = json.loads((bench / "darts" / "model.json").read_text())
    assert spec["layers"] == 3 and spec["reduction_layers"] == [0, 1]
    searched = {e["label"]: e for e in data["entries"]}
    assert searched["darts"]["search_seconds"] > 0 and searched["cnn (hand-crafted)"]["search_seconds"] is None
    # every searched member says whether its search decided anything, as its metrics.json does
    section = report.split("## Did each search decide anything?")[1].split("##")[0]
    for label in ("darts", "tamnas"):
        decided = json.loads((bench / label / "metrics.json").read_text())["search_decision"]["decided"]
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
        assert row.rstrip(" |").endswith("yes" if decided else "**no**")
    assert "| cnn (hand-crafted) |" not in section
    # one convergence line per member, from its train.jsonl
    conv = report.split("**Training convergence**")[1].split("\n\n")[1].splitlines()
    assert sorted(line.split(":")[0] for line in conv) == sorted(f"- {label}" for label in labels), conv
    cnn_dir = Path(next(e["run_dir"] for e in data["entries"] if e["label"] == "cnn (hand-crafted)"))
    cnn_epochs = len((cnn_dir / "train.jsonl").read_text().splitlines())
    cnn_line = next(line for line in conv if line.startswith("- cnn (hand-crafted):"))
    assert ("robust validation accuracy" in cnn_line) == (cnn_epochs >= 2), (cnn_epochs, cnn_line)


def test_benchmark_resume_does_not_redo_finished_members(bench, tmp_path):
    before = {p: os.stat(p).st_mtime_ns for p in bench.glob("*/metrics.json")}
    cfg = bench_config(bench.parent)
    result = CliRunner().invoke(app, ["benchmark", "--config", str(cfg), "--no-progress", "--resume"])
    assert result.exit_code == 0, result.output
    assert {p: os.stat(p).st_mtime_ns for p in bench.glob("*/metrics.json")} == before


def test_compare_command_ranks_runs_by_their_robust_metric(bench, tmp_path):
    dirs = [str(bench / "darts"), str(bench / "baseline-cnn")]
    result = CliRunner().invoke(app, ["compare", *dirs, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    entries = json.loads((tmp_path / "cmp" / "compare.json").read_text())["entries"]
    table = (tmp_path / "cmp" / "report.md").read_text().split("## Did each search")[0].split("## Paired")[0]
    rows = [line for line in table.splitlines() if line.startswith("| darts") or line.startswith("| baseline-cnn")]
    order = sorted(entries, key=lambda e: -e["robust"])
    assert [r.split("|")[1].strip() for r in rows] == [e["label"] for e in order]


def test_robust_metric_prefers_autoattack_then_aa_rank_then_the_strongest_pgd():
    assert robust_metric({"autoattack_acc": 0.4, "robust_acc": {"pgd20": 0.5}}) == (0.4, "autoattack")
    assert robust_metric({"robust_acc": {"aa-rank": 0.45, "pgd20": 0.5}}) == (0.45, "aa-rank")
    assert robust_metric({"autoattack_acc": 0.4, "robust_acc": {"aa-rank": 0.45}}) == (0.4, "autoattack")
    assert robust_metric({"robust_acc": {"pgd7": 0.6, "pgd20": 0.5, "fgsm": 0.7}}) == (0.5, "pgd20")
    assert robust_metric({"robust_acc": {"fgsm": 0.7}}) == (None, "-")


def test_compare_refuses_a_directory_without_metrics(tmp_path):
    with pytest.raises(UserError, match="no metrics.json"):
        load_entry(tmp_path)


def test_benchmark_refuses_an_unknown_method_before_running(tmp_path):
    cfg = bench_config(tmp_path, methods={"nope": {}})
    result = CliRunner().invoke(app, ["benchmark", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 2 and "unknown search method" in result.output
    assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize("name", ["benchmark.yaml", "benchmark-overnight.yaml"])
def test_committed_benchmark_configs_validate_every_member(name):
    from pathlib import Path

    from robustnas.app.pipeline import BenchmarkCommand
    from robustnas.core.config import load_yaml, validate
    from robustnas.nets.models import list_models
    from robustnas.search import build_strategy

    cmd = validate(BenchmarkCommand, load_yaml(Path(__file__).resolve().parents[1] / "configs" / name))
    assert len(cmd.seed_list()) >= 2 and cmd.evaluate.n >= 500
    for method, settings in cmd.methods.items():
        build_strategy(method, dict(settings or {}))  # a typo or a value out of range raises
    assert set(cmd.baselines) <= set(list_models())


def test_benchmark_members_run_in_parallel_through_the_executor_with_the_same_results(bench, tmp_path):
    cfg = bench_config(tmp_path, out=str(tmp_path / "pool"), executor="pool", executor_options={"workers": 2})
    result = CliRunner().invoke(app, ["benchmark", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    for member in ("darts", "tamnas", "baseline-cnn"):
        assert (tmp_path / "pool" / member / "per_image.csv").read_text() == \
            (bench / member / "per_image.csv").read_text(), member
        assert (tmp_path / "pool" / member / "model.safetensors").read_bytes() == \
            (bench / member / "model.safetensors").read_bytes(), member
