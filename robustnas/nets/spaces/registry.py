"""The search-space registry: what the rest of the package may know of a space, found by its name.

A genotype names its space (`space` field). Code outside `spaces/` never branches on that name: it asks
`get_space(genotype.space)` for the genotype parser, the final network, the primitives, the supernet, and
two facts: whether the genotype fixes its own size (then C, layers and a parameter budget do not apply)
and whether it is made of DARTS-style cells (then the op-by-position analysis applies).

A new space is one module in `spaces/` ending in one `register(Space(...))` call, plus its import in
`spaces/__init__.py` (docs/architecture.md walks through the tiny space as the example).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import nn

from robustnas.core.errors import UserError
from robustnas.core.registry import Registry


class GenotypeJson:
    """to_json / from_json for a space's genotype class, which defines to_dict and from_dict."""

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"genotype is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class Space:
    name: str
    genotype_from_dict: Callable[[dict], Any]
    # (genotype, C, layers, num_classes, in_shape, mean, std, **cell options) -> the final network
    build_network: Callable[..., nn.Module]
    primitives: Sequence[str]
    supernet: Optional[type] = None  # the weight-sharing supernet the DARTS-style loop trains, if any
    sizes_itself: bool = False       # the genotype fixes widths and depth: C, layers, budgets do not apply
    cells: bool = True               # DARTS-style cells (normal/reduce edges): op-by-position applies


SPACES: Registry[Space] = Registry("search space", field="space")


def register(space: Space) -> Space:
    return SPACES.add(space.name, space)


def get_space(name: str) -> Space:
    return SPACES.lookup(name)


def parse_genotype(data: Any):
    """A genotype of the space its `space` field names (a cell genotype without one: darts or arnas,
    inferred from its fields by the cell parser)."""
    if not isinstance(data, dict):
        return get_space("darts").genotype_from_dict(data)  # the cell parser says what is wrong
    return get_space(data.get("space") or "darts").genotype_from_dict(data)


def network_from_spec(spec: dict) -> nn.Module:
    """Rebuild a genotype network from its model.json spec (written by arch.build_arch)."""
    genotype = parse_genotype(spec["genotype"])
    space = get_space(genotype.space)
    kw = {k: v for k, v in spec.items() if k not in ("kind", "genotype", "in_shape")}
    if space.sizes_itself:
        kw = {k: kw[k] for k in ("num_classes", "mean", "std")}
        kw.update(C=None, layers=None)
    return space.build_network(genotype, in_shape=tuple(spec["in_shape"]), **kw)
