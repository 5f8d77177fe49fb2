"""The Strategy protocol every search method implements, its inputs and outputs, and the registry.

A search method is one module in robustnas/search/ with one class decorated by `@register`: a `name`,
a pydantic `Config` holding every setting of the method, `__init__(cfg)` and `search(ctx, resume)`.
The package imports every module in it, so adding the file is all it takes to make the method known
to `robustnas search --method NAME` and `robustnas run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional, Protocol, Union, runtime_checkable

import torch

from robustnas.core.config import Base, validate
from robustnas.data.datasets import Dataset
from robustnas.core.errors import UserError
from robustnas.core.registry import Registry
from robustnas.nets.spaces.darts import Genotype

# The attack that gives a search's candidates their robust score (`score_attack` of random search and TAM-NAS):
# the method's own PGD, or aa-rank (AutoAttack-rank, not standard AutoAttack: robustness/attacks.py), measured
# by evaluation.evaluate.accuracy_under_attack on the BatchNorm-folded copy as an evaluation measures it.
ScoreAttack = Literal["pgd", "aa-rank"]


@dataclass
class SearchContext:
    """What a search needs besides its own settings: the data, the threat model, where and how to run.

    `eps` is in pixel units; `out_dir` (None: write nothing) receives search.jsonl, genotype.json and
    the method's checkpoints; `on_epoch_end` is called with each epoch's record after it is saved
    (the CLI and the tests use it; a raise there stops the search, which `resume=True` continues).
    """

    data: Dataset
    eps: float
    norm: Literal["Linf", "L2"] = "Linf"
    device: Union[str, torch.device] = "cpu"
    seed: int = 0
    out_dir: Optional[Path] = None
    progress: bool = True
    on_epoch_end: Optional[Callable[[dict], None]] = None

    def __post_init__(self) -> None:
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)


@dataclass
class SearchResult:
    """The searched architecture (a Genotype, or a dict for spaces that are not DARTS cells), one
    record per epoch / generation as written to search.jsonl, wall time, method-specific extras, and
    `decision`: whether the search decided anything (analysis.search_decision; {} when the method gives none).

    `seconds` is the search's wall time summed over the `sessions` that ran it (the first run and each
    --resume; training/loop.SessionClock): a resumed search carries the time recorded in its checkpoint."""

    genotype: Union[Genotype, dict]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    sessions: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Strategy(Protocol):
    """What every method has. Two optional methods let a method shape the rest of `robustnas run`:

    - `final_size() -> dict`: the final-network size the search already fixed, e.g. LRNAS selects ops
      under a parameter budget counted at {"C": final_C, "layers": final_layers}, so `run` must build
      exactly that network; {} means the genotype fixes its own size (TAM-NAS tiny blocks).
      Without it, `run` sizes the network from its `final:` settings.
    - `report_sections(result, out, meta) -> list[str]`: markdown lines (with plots written under
      out/plots) that `run`'s report.md shows after the common sections.
    - `steps_for(train_size) -> int`: steps per epoch on a training split of that size, from the settings
      alone (epoch-based searches; `benchmark --plan` extrapolates a search's cost with it).
    """

    name: ClassVar[str]
    Config: ClassVar[type[Base]]

    def __init__(self, cfg: Any) -> None: ...

    def search(self, ctx: SearchContext, resume: bool = False) -> SearchResult: ...


STRATEGIES: Registry[type] = Registry("search method")


def register(cls: type) -> type:
    """Class decorator: make a Strategy known by its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a search strategy needs a class attribute `name`")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, Base)):
        raise TypeError(f"{cls.__name__}: `Config` must be a robustnas.core.config.Base subclass")
    return STRATEGIES.add(name, cls)


def get_strategy(name: str) -> type:
    return STRATEGIES.lookup(name)


def build_strategy(name: str, settings: Optional[dict] = None) -> Strategy:
    """The strategy `name` with its Config validated from `settings` (a one-line UserError when bad)."""
    cls = get_strategy(name)
    settings = dict(settings or {})
    if "executor" in settings and "executor" not in cls.Config.model_fields:
        takes = sorted(n for n, c in STRATEGIES.items() if "executor" in c.Config.model_fields)
        raise UserError(f"method {name} evaluates no candidates through an executor, so executor settings "
                        f"(--workers, --ray) do not apply; they do to {', '.join(takes)}")
    cfg = validate(cls.Config, settings)
    return cls(cfg)

