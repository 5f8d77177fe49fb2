"""Turn an `--arch` string into a model: a hand-crafted name, a published genotype name, or a genotype JSON.

A model's spec (model.json) is the dict that rebuilds it; `model_from_spec` is the inverse of `build_arch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from safetensors.torch import load_file
from torch import nn

from robustnas.data.datasets import DatasetMeta
from robustnas.core.errors import UserError
from robustnas.nets.size import count_params
from robustnas.nets.spaces import get_space, network_from_spec
from robustnas.core.rundir import read_json, save_tensors, write_json

# sizes a genotype network gets when neither C nor a parameter budget is given (CPU-sized)
DEFAULT_C = 16
DEFAULT_LAYERS = 8


def is_genotype_arch(arch: str) -> bool:
    from robustnas.nets.genotypes import published_names

    return arch in published_names() or arch.endswith(".json") or Path(arch).is_file()


def known_archs() -> list[str]:
    from robustnas.nets.genotypes import published_names
    from robustnas.nets.models import list_models

    return list_models() + published_names()


def build_arch(arch: str, meta: DatasetMeta, params: Optional[int] = None, width: Optional[float] = None,
               C: Optional[int] = None, layers: Optional[int] = None, at_most: bool = False,
               **net_kw) -> tuple[nn.Module, dict]:
    """Build the network named by `arch` for a dataset; `params` picks the width (or C) to meet a budget:
    the nearest width of a hand-crafted model (`at_most`: the widest within it), and for a genotype the
    largest even C within it (C moves in steps too coarse for "nearest")."""
    from robustnas.nets.models import MODELS, build_model

    if arch in MODELS:
        model = build_model(arch, meta.num_classes, meta.shape, meta.mean, meta.std, width=width, params=params,
                            at_most=at_most)
        return model, {"kind": "handcrafted", "config": model.config}
    if is_genotype_arch(arch):
        from robustnas.nets.genotypes import load_genotype

        genotype = load_genotype(arch)
        if get_space(genotype.space).sizes_itself:
            return _build_fixed(genotype, meta, params=params, width=width, C=C, layers=layers, **net_kw)
        layers = layers or DEFAULT_LAYERS
        if C is None:
            C = channels_for_params(genotype, meta, layers, params, **net_kw) if params else DEFAULT_C
        spec = {"kind": "genotype", "genotype": genotype.to_dict(), "C": C, "layers": layers,
                "num_classes": meta.num_classes, "in_shape": list(meta.shape), "mean": list(meta.mean),
                "std": list(meta.std), **net_kw}
        return model_from_spec(spec), spec
    raise UserError(f"unknown architecture {arch!r}: use one of {', '.join(known_archs())}, "
                    f"or a path to a genotype JSON")


def _build_fixed(genotype, meta: DatasetMeta, params=None, width=None, C=None, layers=None, **net_kw):
    """A genotype that fixes every width and the depth (the tiny space): any sizing option is an error."""
    given = [k for k, v in dict(params=params, width=width, C=C, layers=layers, **net_kw).items() if v is not None]
    if given:
        raise UserError(f"a tiny-block genotype fixes its own widths and depth; drop {', '.join(given)} "
                        f"(pick a smaller or larger member of the TAM-NAS front instead)")
    spec = {"kind": "genotype", "genotype": genotype.to_dict(), "num_classes": int(meta.num_classes),
            "in_shape": [int(s) for s in meta.shape], "mean": [float(m) for m in meta.mean],
            "std": [float(s) for s in meta.std]}
    return network_from_spec(spec), spec


def channels_for_params(genotype, meta: DatasetMeta, layers: int, params: int, **net_kw) -> int:
    """The largest even initial channel count C whose network has at most `params` parameters.

    At most, not nearest: budgets are ceilings in matched comparisons ("no more parameters than"). C is
    even because FactorizedReduce halves it; parameters grow monotonically with C."""
    from robustnas.nets.genotypes import build_network

    def size(c: int) -> int:
        return count_params(build_network(genotype, C=c, layers=layers, num_classes=meta.num_classes,
                                          in_shape=meta.shape, mean=meta.mean, std=meta.std, **net_kw))

    if size(2) > params:
        raise UserError(f"{layers} cells need {size(2)} parameters even at C=2, over the budget of {params}; "
                        f"lower --layers or raise the budget")
    lo, hi = 1, 2  # in units of 2 channels: size(2 * lo) <= params < size(2 * hi)
    while size(2 * hi) <= params:
        lo, hi = hi, hi * 2
        if hi > 2048:
            raise UserError(f"a budget of {params} parameters is beyond reach for {layers} cells")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(2 * mid) <= params else (lo, mid)
    return 2 * lo


def model_from_spec(spec: dict) -> nn.Module:
    kind = spec.get("kind")
    if kind == "handcrafted":
        from robustnas.nets.models import model_from_config

        return model_from_config(spec["config"])
    if kind == "genotype":
        return network_from_spec(spec)
    raise UserError(f"model.json has unknown kind {kind!r}; expected 'handcrafted' or 'genotype'")


def save_model(run_dir: Path, model: nn.Module, spec: dict) -> None:
    """model.safetensors (weights, no pickle) and model.json (how to rebuild the module)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(run_dir / "model.safetensors", model.state_dict())
    write_json(run_dir / "model.json", spec)


def load_model(run_dir: Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a run directory from model.json and load model.safetensors into it."""
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
