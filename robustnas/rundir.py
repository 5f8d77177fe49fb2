"""The run directory of DESIGN.md: atomic file writes, weights in safetensors, model.json to rebuild them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from robustnas.errors import UserError


def atomic_write(path: Path, write: Callable[[str], Any], suffix: str = "") -> Path:
    """The one atomic write: `write(tmp)` fills a temporary file beside `path`, which is then renamed onto
    it, so a reader never sees half a file and a crash leaves none (the temporary file is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file (CPU, contiguous copies), written atomically: weights and checkpoints."""
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp), suffix=".safetensors")


def save_figure(fig, path: Path, **kw: Any) -> Path:
    """A matplotlib figure as PNG, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **kw), suffix=".png")
    finally:
        plt.close(fig)


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
    save_tensors(run_dir / "model.safetensors", model.state_dict())
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
