"""The one atomic write: a write that fails leaves the old file as it was and no temporary file behind."""

import pytest
import torch
from safetensors.torch import load_file

from robustnas.core.rundir import atomic_write, atomic_write_text, save_tensors


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old\n")

    def half_then_crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_tensors_round_trip_through_the_atomic_safetensors_write(tmp_path):
    t = {"w": torch.arange(6.0).reshape(2, 3).t(), "b": torch.ones(2, requires_grad=True)}  # non-contiguous, grad
    save_tensors(tmp_path / "c.safetensors", t)
    back = load_file(str(tmp_path / "c.safetensors"))
    assert torch.equal(back["w"], t["w"]) and torch.equal(back["b"], t["b"].detach())
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
