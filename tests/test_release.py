"""Run directories made by the previous release (0.1, commit 6fa1a6e; tests/fixtures/release-0.1/README.md) load,
evaluate, compare and resume with this code: a `train` run with its checkpoint, and a `run` (search -> train
-> evaluate) run whose checkpoints were not kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from robustnas.app.cli import app
from robustnas.nets.arch import load_model
from resume import stripped

RELEASE = Path(__file__).resolve().parent / "fixtures" / "release-0.1"
RUNS = ("train-cnn", "run-darts")


@pytest.fixture
def old(tmp_path):
    """A copy of the release's run directories (the tests write into them)."""
    return Path(shutil.copytree(RELEASE, tmp_path / "release-0.1"))


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--no-progress"] if args[0] != "compare" else list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_old_runs_load_evaluate_to_their_recorded_numbers_and_compare(old, tmp_path):
    recorded = {name: _metrics(old / name) for name in RUNS}
    # compare reads them as they are (no per_image.csv then: no paired section, no error)
    _cli("compare", *(str(old / name) for name in RUNS), "--out", str(tmp_path / "before"))
    entries = json.loads((tmp_path / "before" / "compare.json").read_text())["entries"]
    assert {e["label"]: e["clean_acc"] for e in entries} == {n: recorded[n]["clean_acc"] for n in RUNS}
    for name in RUNS:
        model, spec = load_model(old / name)
        assert sum(p.numel() for p in model.parameters()) == recorded[name]["params"]
        _cli("evaluate", str(old / name), "--attacks", "fgsm,pgd20", "--n", "30", "--device", "cpu")
        now = _metrics(old / name)
        # the same weights on the same 30 test images: the clean accuracy the release recorded (well above
        # chance, so weights loaded into the wrong places would show)
        assert now["clean_acc"] == recorded[name]["clean_acc"] > 0.8
        assert now["n"] == 30 and now["reliable"] and (old / name / "per_image.csv").is_file()
        assert now["train"] == recorded[name]["train"]  # the training section is kept
    # the release's own evaluation of run-darts: today's FGSM and PGD-20 find the same robust accuracy
    assert _metrics(old / "run-darts")["robust_acc"] == recorded["run-darts"]["robust_acc"]
    _cli("compare", *(str(old / name) for name in RUNS), "--out", str(tmp_path / "after"))
    assert "## Paired" in (tmp_path / "after" / "report.md").read_text()


def test_resuming_a_finished_old_run_changes_nothing(old):
    before = {name: _files(old / name) for name in RUNS}
    out = _cli("train", "--config", str(old / "train-cnn" / "config.yaml"), "--out", str(old / "train-cnn"),
               "--resume")
    assert "nothing to resume" in out
    out = _cli("run", "--config", str(old / "run-darts" / "config.yaml"), "--out", str(old / "run-darts"),
               "--resume")
    assert "nothing to resume" in out
    assert {name: _files(old / name) for name in RUNS} == before


def test_an_old_checkpoint_resumes_to_the_old_final_model(old):
    """The train run as if killed after its last checkpoint: resumed by this code, it ends with the weights,
    history and test numbers the release wrote."""
    run = old / "train-cnn"
    recorded, history = _metrics(run), (run / "train.jsonl").read_text()
    weights = load_file(str(run / "model.safetensors"))
    for name in ("model.safetensors", "model.json", "metrics.json", "train.jsonl"):
        (run / name).unlink()
    _cli("train", "--config", str(run / "config.yaml"), "--out", str(run), "--resume")
    again = load_file(str(run / "model.safetensors"))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    lines = [stripped(json.loads(line)) for line in (run / "train.jsonl").read_text().splitlines()]
    released = [stripped(json.loads(line)) for line in history.splitlines()]
    # the one key added since (the validation size, 0 where a record did not keep it); the rest unchanged
    assert all(set(new) - set(rel) == {"val_n"} and new["val_n"] == 0 for new, rel in zip(lines, released))
    assert [{k: new[k] for k in rel} for new, rel in zip(lines, released)] == released
    assert stripped(_metrics(run)) == stripped(recorded)
