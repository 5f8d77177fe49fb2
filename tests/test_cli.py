"""Bad input at the command line: one line on stderr, exit code 2, no traceback, no run directory left."""

import pytest
from typer.testing import CliRunner

from robustnas.app.cli import app

runner = CliRunner()


def invoke(args):
    return runner.invoke(app, args)


@pytest.mark.parametrize("args,needle", [
    (["--arch", "no_such_net"], "unknown architecture"),
    (["--dataset", "no_such_data"], "no_such_data"),
    (["--eps", "2"], "out of range"),
    (["--eps", "abc"], "epsilon"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--adv", "magic"], "adv"),
])
def test_bad_train_input_is_one_line_and_leaves_nothing(tmp_path, args, needle, monkeypatch):
    monkeypatch.setenv("ROBUSTNAS_DATA", str(tmp_path / "nodata"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    base = ["train", "--dataset", "digits", "--epochs", "1", "--out", str(out), "--no-progress"]
    result = invoke(base + args)
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    assert needle in text
    assert len([line for line in text.splitlines() if line.strip()]) == 1, text
    assert not out.exists()


def test_corrupt_idx_file_is_one_line(tmp_path):
    d = tmp_path / "fm"
    d.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (d / name).write_bytes(b"\x00\x00\x08\x03garbage")
    out = tmp_path / "run"
    result = invoke(["train", "--dataset", "fashion-mnist", "--data-dir", str(d), "--out", str(out),
                     "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_config_file_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: -3\n")
    result = invoke(["train", "--config", str(cfg), "--no-progress", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "train.epochs" in result.output
