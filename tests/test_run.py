"""`robustnas run` end to end at test size: search -> train -> evaluate -> baseline -> report."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from robustnas.app.cli import app
from robustnas.evaluation.evaluate import read_per_image
from robustnas.nets.genotypes import load_genotype


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
    # what holds per image by construction (evaluate.py): an image counts as robust to an attack only when it
    # is also right clean, and worst_case counts the images robust to every attack. Not asserted: PGD-20 <=
    # FGSM. PGD-20 returns its last iterate from a random start, so it can miss an image FGSM breaks, and on
    # 30 images that decides the order.
    robust = searched["robust_acc"]
    assert set(robust) == {"fgsm", "pgd20"} and searched["n"] == 30
    assert 0 <= searched["worst_case_acc"] <= min(robust.values()) <= max(robust.values()) <= searched["clean_acc"]
    report = (run / "report.md").read_text()
    assert "hand-crafted (cnn)" in report and "Operations by cell position" in report
    # the paired comparison counts the images each network alone survives, from the two per_image.csv files
    a, b = read_per_image(run), read_per_image(run / "baseline")
    assert (a["index"] == b["index"]).all()
    only_searched, only_baseline = int((a["pgd20"] & ~b["pgd20"]).sum()), int((~a["pgd20"] & b["pgd20"]).sum())
    assert (f"broken only for the baseline {only_searched}, only for the searched network {only_baseline}"
            in report), report
    assert "not the search method" in report
    # one epoch each here: nothing to compare the last epoch with
    assert "- searched: convergence unknown (fewer than 2 validated epochs)" in report
    assert "- baseline: convergence unknown (fewer than 2 validated epochs)" in report
    for kind in ("accurate", "robust", "reduce"):
        assert f"plots/cell_{kind}.png" in report and (run / "plots" / f"cell_{kind}.png").exists()
    history = [json.loads(line) for line in (run / "search.jsonl").read_text().splitlines()]
    assert len(history) == 1 and "gamma" in history[0]


def test_run_refuses_an_unknown_method_before_writing_anything(tmp_path):
    cfg = tiny_run_config(tmp_path, method="no_such_method")
    result = CliRunner().invoke(app, ["run", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 2 and "unknown search method" in result.output
    assert not (tmp_path / "run").exists()


def _write(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _base(tmp_path, method, search, final):
    return {"name": method, "seed": 0, "out": str(tmp_path / "run"), "data": {"dataset": "digits", "subset": 300},
            "method": method, "search": search, "final": final,
            "train": {"adv": "pgd", "epochs": 1, "batch_size": 32, "val_n": 32, "val_steps": 1,
                      "attack": {"eps": "0.1", "steps": 1}},
            "evaluate": {"attacks": ["fgsm", "pgd20"], "n": 30}, "baseline": {"arch": None}}


LRNAS = {"C": 4, "layers": 3, "partial_channels_k": 1, "batch_size": 32, "epochs": 1, "warmup_epochs": 0,
         "max_batches_per_epoch": 2, "val_n": 16, "val_steps": 1, "orderings": 1, "contrib_batch_size": 8,
         "final_C": 4, "final_layers": 3, "max_params": "5k", "report_budgets": ["4k", "20k"], "budget_rule": "strict"}


def test_lrnas_run_trains_the_network_its_budget_counted_and_reports_contributions(tmp_path):
    from robustnas.core.config import parse_count

    cfg = _write(tmp_path, _base(tmp_path, "lrnas", LRNAS, {}))
    result = CliRunner().invoke(app, ["run", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    spec = json.loads((run / "model.json").read_text())
    assert (spec["C"], spec["layers"]) == (4, 3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["params"] <= parse_count("5k")
    report = (run / "report.md").read_text()
    assert "Component contributions (LRNAS)" in report and (run / "plots" / "contributions_by_op.png").exists()
    rows = [line for line in report.splitlines() if line.startswith(("| 4k |", "| 20k |", "| 5k |"))]
    assert len(rows) == 3
    params = {r.split("|")[1].strip(): int(r.split("|")[2].strip().replace(",", "")) for r in rows}
    assert params["4k"] <= 4000 and params["5k"] <= 5000 and params["20k"] <= 20000
    assert params["4k"] <= params["5k"] <= params["20k"]


def test_lrnas_run_refuses_a_final_size_that_clashes_with_the_budgeted_one(tmp_path):
    cfg = _write(tmp_path, _base(tmp_path, "lrnas", LRNAS, {"params": "50k"}))
    result = CliRunner().invoke(app, ["run", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 2 and "final.params" in result.output
    assert not (tmp_path / "run").exists()


TAMNAS = {"epochs": 1, "max_batches_per_epoch": 2, "batch_size": 16, "attack_steps": 1, "val_n": 20, "eval_n": 20,
          "eval_pgd_steps": 1, "recal_batches": 1, "recal_batch_size": 16, "pop_size": 4, "generations": 2}


def test_tamnas_run_trains_the_picked_tiny_network_and_reports_fronts(tmp_path):
    cfg = _write(tmp_path, _base(tmp_path, "tamnas", TAMNAS, {}))
    result = CliRunner().invoke(app, ["run", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    genotype = load_genotype(str(run / "genotype.json"))
    assert genotype.space == "tiny"
    spec = json.loads((run / "model.json").read_text())
    assert spec["genotype"]["layers"] == [list(p) for p in genotype.layers]
    report = (run / "report.md").read_text()
    for name in ("fronts.png", "hypervolume.png", "layer_frequencies.png"):
        assert f"plots/{name}" in report and (run / "plots" / name).exists()
    assert "First front" in report


def test_tamnas_run_refuses_final_cell_settings(tmp_path):
    cfg = _write(tmp_path, _base(tmp_path, "tamnas", TAMNAS, {"C": 8}))
    result = CliRunner().invoke(app, ["run", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 2 and "final.C" in result.output


# ----------------------------------------------------------------------------------------- epsilon and norm
def test_an_l2_radius_above_one_trains_and_a_linf_one_is_refused(tmp_path):
    """An L2 radius may exceed 1 (2.0 on MNIST-sized images); a Linf one may not; nonsense never passes."""
    from robustnas.core.config import AttackConfig, RunCommand, parse_eps, validate
    from robustnas.core.errors import UserError

    cfg = tmp_path / "l2.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"attack": {"norm": "L2", "steps": 1}, "val_n": 32, "val_steps": 1},
                                   "test_n": 20, "test_pgd_steps": 1}))
    base = ["train", "--dataset", "digits", "--subset", "100", "--epochs", "1", "--eps", "2.0", "--no-progress"]
    result = CliRunner().invoke(app, base + ["--config", str(cfg), "--out", str(tmp_path / "l2")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "l2" / "metrics.json").read_text())
    assert (metrics["eps"], metrics["norm"]) == ("2", "L2")
    result = CliRunner().invoke(app, base + ["--out", str(tmp_path / "linf")])  # the default norm, Linf
    assert result.exit_code == 2 and "out of range for norm Linf" in result.output
    assert not (tmp_path / "linf").exists()

    assert parse_eps("2.0", "L2") == 2.0 and parse_eps("8/255", "Linf") == 8 / 255
    assert validate(RunCommand, {"train": {"attack": {"norm": "L2", "eps": "2.0", "step_size": "1.5"}}})
    for norm in ("Linf", "L2"):
        for bad in ("-0.1", "abc", "inf", "1/0"):
            with pytest.raises(UserError, match="epsilon"):
                validate(AttackConfig, {"norm": norm, "eps": bad})
    with pytest.raises(UserError, match="step_size"):
        validate(AttackConfig, {"norm": "Linf", "eps": "0.1", "step_size": "1.5"})
