"""Genotypes by name or file: the published architectures ship inside the package
(published_genotypes.json, a copy of the project's shared list), and any genotype JSON file loads
the same way. `build_network` turns a genotype into the final network of its space."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from robustnas.core.errors import UserError
from robustnas.core.rundir import atomic_write_text
from robustnas.nets.spaces import get_space, parse_genotype
from robustnas.nets.spaces.darts import Genotype


@lru_cache(maxsize=1)
def _published() -> dict[str, Any]:
    text = resources.files("robustnas.nets").joinpath("published_genotypes.json").read_text(encoding="utf-8")
    return json.loads(text)


def published_names() -> list[str]:
    return list(_published())


def genotype_from_dict(data: Any):
    """A genotype of whichever space its `space` field names (the registry in spaces/)."""
    return parse_genotype(data)


def load_genotype(name_or_path: str | os.PathLike):
    """A published genotype by name (see published_names()) or a genotype JSON file by path (any space)."""
    key = os.fspath(name_or_path)
    published = _published()
    if key in published:
        return Genotype.from_dict(published[key])
    path = Path(key)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read genotype file {key}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{key}: genotype is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        try:
            return genotype_from_dict(data)
        except UserError as e:
            raise UserError(f"{key}: {e}") from None
    if key.endswith(".json") or os.sep in key or "/" in key:
        raise UserError(f"genotype file not found: {key}")
    raise UserError(f"unknown genotype {key!r}: use a path to a genotype JSON file or one of the published "
                    f"names: {', '.join(published)}")


def save_genotype(genotype, path: str | os.PathLike) -> None:
    """Write a genotype as JSON atomically (a temporary file renamed into place: never half-written)."""
    atomic_write_text(Path(path), genotype.to_json() + "\n")


def build_network(genotype, C: Optional[int], layers: Optional[int], num_classes: int,
                  in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float], **kw: Any) -> nn.Module:
    """The final network for a genotype (or a published name / JSON path), chosen by its `space`.

    Extra keywords go to Network / ArnasNetwork: auxiliary, drop_path_prob, stem_multiplier,
    reduction_layers. A tiny-block genotype fixes its own widths and depth: C and layers must be None.
    """
    if isinstance(genotype, (str, os.PathLike)):
        genotype = load_genotype(genotype)
    return get_space(genotype.space).build_network(genotype, C, layers, num_classes, in_shape, mean, std, **kw)
