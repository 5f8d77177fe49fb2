"""The commands' work, end to end, so that the CLI only parses: `train_run` (dataset -> model -> Trainer -> run dir)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console

from robustnas.arch import build_arch
from robustnas.attacks import accuracy, pgd, robust_accuracy
from robustnas.config import DataConfig, RunCommand, SearchCommand, TrainCommand, TrainConfig, format_eps, parse_eps, to_yaml
from robustnas.data import Dataset, load_dataset
from robustnas.errors import UserError
from robustnas.rundir import atomic_write_text, save_model, write_json
from robustnas.size import count_flops, count_params, parse_count
from robustnas.training import Trainer, resolve_device


def load_data(cfg: DataConfig, seed: int) -> Dataset:
    """The configured dataset, or its fallback (with a warning) when it is not installed."""
    kw = dict(data_dir=cfg.data_dir, val_size=cfg.val_size, subset=cfg.subset, seed=seed)
    try:
        return load_dataset(cfg.dataset, **kw)
    except UserError as e:
        if not cfg.fallback:
            raise
        Console(stderr=True).print(f"[yellow]warning:[/] {e} -- using {cfg.fallback} instead", highlight=False)
        return load_dataset(cfg.fallback, **kw)


def default_run_name(cmd: TrainCommand) -> str:
    return f"{cmd.model.arch.replace('/', '_').removesuffix('.json')}-{cmd.data.dataset}-{cmd.train.adv}-s{cmd.seed}"


def train_run(cmd: TrainCommand, resume: bool = False, progress: bool = True) -> dict:
    """Train one architecture as `cmd` says; write the run directory; return its metrics."""
    # everything that can be wrong with the input is checked before the run directory exists
    device = resolve_device(cmd.device)
    data = load_data(cmd.data, cmd.seed)
    cmd = resolved(cmd, data)
    eps = parse_eps(cmd.train.attack.eps)
    torch.manual_seed(cmd.seed)
    params = parse_count(cmd.model.params) if cmd.model.params else None
    model, spec = build_arch(cmd.model.arch, data.meta, params=params, width=cmd.model.width,
                             C=cmd.model.C, layers=cmd.model.layers)
    out = Path(cmd.out) if cmd.out else Path("runs") / (cmd.name or default_run_name(cmd))
    check_new_run_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cmd))
    return train_into(out, model, spec, data, cmd.train, seed=cmd.seed, device=device, resume=resume,
                      progress=progress, test_n=cmd.test_n, test_pgd_steps=cmd.test_pgd_steps)


def resolved(cmd, data: Dataset):
    """The settings as they were really used: the dataset actually loaded (after any fallback) and its eps."""
    cmd = cmd.model_copy(deep=True)
    cmd.data.dataset, cmd.data.fallback = data.meta.name, None
    if cmd.train.attack.eps is None:
        cmd.train.attack.eps = data.meta.eps
    return cmd


def check_new_run_dir(out: Path, resume: bool) -> None:
    if out.exists() and any(out.iterdir()) and not resume:
        raise UserError(f"run directory {out} already exists: pass --resume to continue it, or another --out")


def train_into(out: Path, model: torch.nn.Module, spec: dict, data: Dataset, train: TrainConfig, seed: int,
               device: torch.device, resume: bool = False, progress: bool = True, test_n: int = 1000,
               test_pgd_steps: int = 20) -> dict:
    """Train `model` with the Trainer into run directory `out`; save weights, log and a first metrics.json."""
    eps = parse_eps(train.attack.eps)
    trainer = Trainer(model, data, train, eps, seed=seed, device=device, out_dir=out, progress=progress)
    t0 = time.perf_counter()
    result = trainer.fit(resume=resume)
    train_seconds = time.perf_counter() - t0
    save_model(out, model, spec)
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(asdict(h)) + "\n" for h in result.history))

    n = min(test_n, len(data.test.x))
    x, y = data.test.x[:n].to(device), data.test.y[:n].to(device)
    torch.manual_seed(seed)
    clean = accuracy(model, x, y)
    rob = robust_accuracy(model, x, y, lambda xb, yb: pgd(model, xb, yb, eps, steps=test_pgd_steps,
                                                          norm=train.attack.norm))
    metrics = {
        "dataset": data.meta.name, "eps": format_eps(eps), "norm": train.attack.norm, "n": n,
        "clean_acc": clean, "robust_acc": {f"pgd{test_pgd_steps}": rob},
        "params": count_params(model), "flops": count_flops(model, data.meta.shape),
        "train": {"adv": train.adv, "epochs": train.epochs, "best_epoch": result.best_epoch,
                  "best_val_clean": result.best_val_clean, "best_val_robust": result.best_val_robust,
                  "seconds": train_seconds},
    }
    write_json(out / "metrics.json", metrics)
    metrics["run_dir"] = str(out)
    return metrics


def search_run(cmd: SearchCommand, resume: bool = False, progress: bool = True):
    """Run one search method; write search.jsonl and genotype.json into the output directory."""
    from robustnas.search import SearchContext, build_strategy

    device = resolve_device(cmd.device)
    data = load_data(cmd.data, cmd.seed)
    cmd = cmd.model_copy(deep=True)
    cmd.data.dataset, cmd.data.fallback = data.meta.name, None
    eps = parse_eps(cmd.attack.eps if cmd.attack.eps is not None else data.meta.eps)
    cmd.attack.eps = format_eps(eps)
    strategy = build_strategy(cmd.method, cmd.search)
    out = Path(cmd.out) if cmd.out else Path("runs") / (cmd.name or f"search-{cmd.method}-{data.meta.name}-s{cmd.seed}")
    check_new_run_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cmd))
    torch.manual_seed(cmd.seed)
    ctx = SearchContext(data=data, eps=eps, norm=cmd.attack.norm, device=device, seed=cmd.seed, out_dir=out,
                        progress=progress)
    result = strategy.search(ctx, resume=resume)
    _save_genotype(out, result.genotype)
    return result, out


def _save_genotype(out: Path, genotype) -> Path:
    from robustnas.rundir import write_json

    if isinstance(genotype, dict):
        write_json(out / "genotype.json", genotype)
    else:
        from robustnas.genotypes import save_genotype

        save_genotype(genotype, out / "genotype.json")
    return out / "genotype.json"


def final_network_size(cmd: RunCommand, strategy) -> dict:
    """build_arch's size keywords for the searched network: the method's own when its search fixed them
    (Strategy.final_size), else the `final:` settings. A clash is an error before anything runs."""
    given = {"C": cmd.final.C, "layers": cmd.final.layers,
             "params": parse_count(cmd.final.params) if cmd.final.params else None}
    fixed = strategy.final_size() if hasattr(strategy, "final_size") else None
    if fixed is None:
        return given
    for key, value in given.items():
        if value is not None and fixed.get(key) != value:
            want = (f"the search fixes {key}={fixed[key]}" if key in fixed
                    else f"method {cmd.method} fixes the final network's size itself")
            raise UserError(f"final.{key}={value} clashes with the search: {want}; remove final.{key} "
                            f"(or change the method's own setting)")
    return {"C": fixed.get("C"), "layers": fixed.get("layers")} if fixed else {}


def run_pipeline(cmd: RunCommand, resume: bool = False, progress: bool = True) -> dict:
    """search -> train the derived network -> evaluate -> the same for a hand-crafted baseline -> report."""
    import shutil

    from robustnas.evaluate import evaluate_run, get_attack
    from robustnas.search import SearchContext, build_strategy

    device = resolve_device(cmd.device)
    data = load_data(cmd.data, cmd.seed)
    cmd = resolved(cmd, data)
    eps = parse_eps(cmd.train.attack.eps)
    strategy = build_strategy(cmd.method, cmd.search)
    for a in cmd.evaluate.attacks:
        get_attack(a)
    if cmd.baseline.arch is not None:
        from robustnas.models import list_models

        if cmd.baseline.arch not in list_models():
            raise UserError(f"baseline.arch {cmd.baseline.arch!r} is not a hand-crafted model; "
                            f"use one of {', '.join(list_models())}")
    final_kw = final_network_size(cmd, strategy)
    out = Path(cmd.out) if cmd.out else Path("runs") / cmd.name
    check_new_run_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cmd))

    # 1. search
    torch.manual_seed(cmd.seed)
    ctx = SearchContext(data=data, eps=eps, norm=cmd.train.attack.norm, device=device, seed=cmd.seed,
                        out_dir=out / "search", progress=progress)
    t0 = time.perf_counter()
    result = strategy.search(ctx, resume=resume)
    search_seconds = time.perf_counter() - t0
    genotype_path = _save_genotype(out, result.genotype)
    if (out / "search" / "search.jsonl").exists():
        shutil.copyfile(out / "search" / "search.jsonl", out / "search.jsonl")

    # 2. train and 3. evaluate the searched network
    torch.manual_seed(cmd.seed)
    model, spec = build_arch(str(genotype_path), data.meta, **final_kw)
    ev = cmd.evaluate
    train_into(out, model, spec, data, cmd.train, seed=cmd.seed, device=device, resume=resume,
               progress=progress, test_n=cmd.test_n, test_pgd_steps=cmd.test_pgd_steps)
    searched = evaluate_run(out, attacks=ev.attacks, n=ev.n, batch_size=ev.batch_size, certify=ev.certify,
                            device=str(device), seed=cmd.seed, progress=progress)
    searched["search_seconds"] = search_seconds
    write_json(out / "metrics.json", searched)

    # 4. the hand-crafted baseline at the same parameter count, same recipe and attacks
    baseline = None
    if cmd.baseline.arch is not None:
        bout = out / "baseline"
        check_new_run_dir(bout, resume)
        bout.mkdir(parents=True, exist_ok=True)
        atomic_write_text(bout / "config.yaml", to_yaml(cmd))
        torch.manual_seed(cmd.seed)
        bmodel, bspec = build_arch(cmd.baseline.arch, data.meta, params=count_params(model))
        train_into(bout, bmodel, bspec, data, cmd.train, seed=cmd.seed, device=device, resume=resume,
                   progress=progress, test_n=cmd.test_n, test_pgd_steps=cmd.test_pgd_steps)
        baseline = evaluate_run(bout, attacks=ev.attacks, n=ev.n, batch_size=ev.batch_size, certify=ev.certify,
                                device=str(device), seed=cmd.seed, progress=progress)

    from robustnas.report import write_search_run_report

    write_search_run_report(out, cmd, result, searched, baseline, strategy=strategy, meta=data.meta)
    searched["run_dir"] = str(out)
    if baseline is not None:
        searched["baseline"] = baseline
    return searched
