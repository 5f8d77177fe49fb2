"""The files of a run directory (DESIGN.md): the one atomic write, and through it JSON, text, tensors
(safetensors, no pickle) and figures. What a model file holds is nets/arch.py's (save_model / load_model)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import save_file
from torch import Tensor

from robustnas.core.errors import UserError
from robustnas.core.faults import tick


def atomic_write(path: Path, write: Callable[[str], Any], suffix: str = "") -> Path:
    """The one atomic write: `write(tmp)` fills a temporary file beside `path`, which is then renamed onto
    it, so a reader never sees half a file and a crash leaves none (the temporary file is removed). Each write
    is a point where the resume tests kill a command (core/faults.py)."""
    tick("write")
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


