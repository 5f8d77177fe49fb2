"""The run directory of DESIGN.md: atomic file writes, weights in safetensors, model.json to rebuild them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from robustnas.errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist")
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")


def save_model(run_dir: Path, model: nn.Module, spec: dict) -> None:
    """model.safetensors (weights, no pickle) and model.json (how to rebuild the module)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = run_dir / ".model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(run_dir / "model.safetensors")
    write_json(run_dir / "model.json", spec)


def load_model(run_dir: Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a run directory from model.json and load model.safetensors into it."""
    from robustnas.arch import model_from_spec

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise UserError(f"{run_dir} has no model.safetensors: train it first (robustnas train --out {run_dir})")
    spec = read_json(run_dir / "model.json")
    model = model_from_spec(spec)
    state = load_file(str(weights), device=device)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise UserError(f"weights in {weights} do not match the architecture in model.json ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(wrong)} of another shape, e.g. {example})")
    model.load_state_dict(state, strict=True)
    return model.to(device), spec
