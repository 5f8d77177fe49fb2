"""`robustnas run` end to end at test size: search -> train -> evaluate -> baseline -> report."""

import json

import yaml
from typer.testing import CliRunner

from robustnas.cli import app
from robustnas.genotypes import load_genotype


def tiny_run_config(tmp_path, method="arnas"):
    cfg = {
        "name": "tiny", "seed": 0, "out": str(tmp_path / "run"),
        "data": {"dataset": "digits", "subset": 200},
        "method": method,
        "search": {"C": 4, "layers": 5, "epochs": 1, "batch_size": 16, "max_batches_per_epoch": 2,
                   "attack_steps": 1, "val_n": 16, "val_steps": 1},
        "final": {"C": 4, "layers": 5},
        "train": {"adv": "pgd", "epochs": 1, "batch_size": 32, "val_n": 32, "val_steps": 1,
                  "attack": {"eps": "0.1", "steps": 1}},
        "evaluate": {"attacks": ["fgsm", "pgd20"], "n": 30, "certify": ["ibp"]},
        "baseline": {"arch": "cnn"},
        "test_n": 30,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_writes_the_run_directory_and_a_side_by_side_report(tmp_path):
    result = CliRunner().invoke(app, ["run", "--config", str(tiny_run_config(tmp_path)), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for name in ("config.yaml", "genotype.json", "search.jsonl", "model.safetensors", "model.json",
                 "metrics.json", "report.md", "plots/alphas.png", "baseline/metrics.json"):
        assert (run / name).exists(), name
    genotype = load_genotype(str(run / "genotype.json"))
    assert genotype.space == "arnas"
    searched = json.loads((run / "metrics.json").read_text())
    baseline = json.loads((run / "baseline" / "metrics.json").read_text())
    # the baseline is built at the searched network's parameter count (within the 10% budget tolerance)
    assert abs(baseline["params"] - searched["params"]) <= 0.1 * searched["params"]
    assert searched["robust_acc"]["pgd20"] <= searched["robust_acc"]["fgsm"] <= searched["clean_acc"]
    report = (run / "report.md").read_text()
    assert "hand-crafted (cnn)" in report and "Operations by cell position" in report
    for kind in ("accurate", "robust", "reduce"):
        assert f"plots/cell_{kind}.png" in report and (run / "plots" / f"cell_{kind}.png").exists()
    history = [json.loads(line) for line in (run / "search.jsonl").read_text().splitlines()]
    assert len(history) == 1 and "gamma" in history[0]


def test_run_refuses_an_unknown_method_before_writing_anything(tmp_path):
    cfg = tiny_run_config(tmp_path, method="no_such_method")
    result = CliRunner().invoke(app, ["run", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 2 and "unknown search method" in result.output
    assert not (tmp_path / "run").exists()
