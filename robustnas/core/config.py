"""Settings of every command as pydantic models, YAML loading, and epsilon parsing: one place for defaults."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from robustnas.core.errors import UserError


# ----------------------------------------------------------------------------------------------- epsilon
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_count(text: str | int | float) -> int:
    """Parse a size such as 100k, 2M, 1.5m, 250000 into an integer."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise UserError(f"cannot read size {text!r}: write a number with an optional k/M suffix, e.g. 100k or 2M")
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2).lower()]))


def format_count(n: int) -> str:
    """Human form of a count: 98.3k, 2.01M."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def parse_eps(value: str | float | int, norm: Optional[str] = None) -> float:
    """Read an epsilon written as 0.1, "0.1" or "8/255" (pixel units, inputs in [0,1]). It must be a finite
    number >= 0; under `norm` "Linf" also at most 1 (a larger box is the whole pixel range). An L2 radius
    may exceed 1 (e.g. 2.0 on MNIST), and without a norm no upper bound is checked."""
    if isinstance(value, (int, float)):
        eps = float(value)
    else:
        text = str(value).strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*/\s*([0-9]*\.?[0-9]+)", text)
        try:
            eps = float(m.group(1)) / float(m.group(2)) if m else float(text)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"cannot read epsilon {value!r}: write it as a number like 0.1 or a fraction like 8/255")
    if not math.isfinite(eps) or eps < 0:
        raise UserError(f"epsilon {value!r} is out of range: it must be a finite number >= 0")
    if norm == "Linf" and eps > 1:
        raise UserError(f"epsilon {value!r} is out of range for norm Linf: pixels are in [0,1], so eps must be "
                        "in [0, 1] (an L2 radius may be larger: set norm L2)")
    return eps


def format_eps(eps: float) -> str:
    """The conventional string of an epsilon: "8/255" when it is k/255, else the shortest decimal."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) not in (0, 255) and abs(eps * 10 - round(eps * 10)) > 1e-9:
        return f"{int(round(k))}/255"
    return f"{eps:g}"


# ----------------------------------------------------------------------------------------------- models

def _check_count(v: Any) -> Any:

    if v is None:
        return v
    try:
        n = parse_count(v)
    except UserError as e:
        raise ValueError(str(e)) from None
    if n < 1:
        raise ValueError(f"{v!r} must be a positive size such as 100k or 2M")
    return str(v)


# a parameter count as written by the user ("100k", "2M", 250000), checked and kept as text
ParamCount = Annotated[Optional[str], BeforeValidator(_check_count)]


def _check_eps_text(v: Any) -> Any:
    if v is None:
        return v
    try:
        parse_eps(v)
    except UserError as e:
        raise ValueError(str(e)) from None
    return str(v)


# an epsilon or step size as written by the user ("0.1", "8/255"), checked (finite, >= 0) and kept as text;
# the bound that depends on the norm is checked where the norm is known (AttackConfig, the attacks' users)
EpsText = Annotated[Optional[str], BeforeValidator(_check_eps_text)]

class Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


AdvKind = Literal["none", "pgd", "trades", "fgsm-rs"]


class DataConfig(Base):
    dataset: str = "digits"
    data_dir: Optional[str] = None
    fallback: Optional[str] = None  # dataset to use, with a warning, when `dataset` is not installed
    subset: Optional[int] = Field(default=None, gt=0)
    val_size: float = Field(default=0.1, gt=0)


class AttackConfig(Base):
    """The threat model shared by training, validation and evaluation."""

    eps: EpsText = None  # None: the dataset's default
    norm: Literal["Linf", "L2"] = "Linf"
    steps: int = Field(default=10, ge=1)
    step_size: EpsText = None  # None: 2.5 * eps / steps

    @model_validator(mode="after")
    def _check_radii(self) -> "AttackConfig":
        for name in ("eps", "step_size"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_eps(value, self.norm)
                except UserError as e:
                    raise ValueError(f"{name}: {e}") from None
        return self


class TrainConfig(Base):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: Literal["cosine", "piecewise", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)
    adv: AdvKind = "pgd"
    trades_beta: float = 6.0
    attack: AttackConfig = AttackConfig()
    # model selection on robust validation accuracy counters robust overfitting; None: "robust" under
    # adversarial training, "clean" under standard training (robust accuracy there is ~0 and noisy)
    select: Optional[Literal["robust", "clean", "last"]] = None
    val_steps: int = Field(default=10, ge=1)
    val_n: int = Field(default=1000, ge=1)
    grad_clip: Optional[float] = None

    @model_validator(mode="after")
    def _default_select(self) -> "TrainConfig":
        if self.select is None:
            self.select = "clean" if self.adv == "none" else "robust"
        return self


class ArchConfig(Base):
    arch: str = "cnn"
    params: Optional[str] = None  # e.g. "100k": picks the width
    width: Optional[float] = None
    C: Optional[int] = None       # genotype networks: initial channels
    layers: Optional[int] = None  # genotype networks: number of cells


class Command(Base):
    """What every command shares: run name, seed, device, run directory and data."""

    name: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None   # None: a directory under runs/ named after the run
    data: DataConfig = DataConfig()


class TrainCommand(Command):
    """`robustnas train`."""

    model: ArchConfig = ArchConfig()
    train: TrainConfig = TrainConfig()
    test_pgd_steps: int = 20
    test_n: int = Field(default=1000, ge=1)


class FinalNetConfig(Base):
    """The network built from a searched genotype for final training."""

    C: Optional[int] = None       # initial channels; None: picked from `params`, else arch.DEFAULT_C
    layers: Optional[int] = None  # cells; None: arch.DEFAULT_LAYERS
    params: Optional[str] = None  # parameter budget that picks C, e.g. "100k"
    # cells that halve the map (None: the DARTS rule, layers//3 and 2*layers//3); early reductions make a
    # network on 28x28 inputs several times cheaper to train and attack
    reduction_layers: Optional[list[int]] = None


class EvalConfig(Base):
    attacks: list[str] = ["fgsm", "pgd20", "autoattack"]
    n: int = Field(default=500, ge=1)
    batch_size: int = Field(default=256, ge=1)
    certify: list[str] = ["ibp"]
    interval: Literal["wilson", "exact"] = "wilson"  # 95% interval of every accuracy (exact: Clopper-Pearson)


class BaselineConfig(Base):
    """A hand-crafted model trained and evaluated beside the searched one, at its parameter count."""

    arch: Optional[str] = "cnn"  # None: no baseline


class SearchCommand(Command):
    """`robustnas search`: the method's own settings live in `search` (validated by the method's Config)."""

    method: str = "darts"
    search: dict[str, Any] = {}
    attack: AttackConfig = AttackConfig()  # the threat model the search optimises for


class RunCommand(Command):
    """`robustnas run`: search -> train the derived network -> evaluate -> report (+ a hand-crafted baseline)."""

    name: str = "run"
    method: str = "darts"
    search: dict[str, Any] = {}
    final: FinalNetConfig = FinalNetConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    baseline: BaselineConfig = BaselineConfig()




def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at the top level")
    return data


def deep_update(base: dict, override: dict) -> dict:
    """Nested dict merge: values in `override` win; None values in `override` are skipped."""
    out = dict(base)
    for k, v in override.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out[k] = deep_update(out.get(k) if isinstance(out.get(k), dict) else {}, v)
        else:
            out[k] = v
    return out


def validate(model_cls: type[BaseModel], data: dict) -> Any:
    """Build a settings model, turning pydantic's report into one line naming the field."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise UserError(f"bad setting {where}: {err['msg']}")


def to_yaml(settings: BaseModel) -> str:
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
