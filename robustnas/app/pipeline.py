"""The commands' work, end to end, so that the CLI only parses: `train_run` (dataset -> model -> Trainer -> run dir)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, model_validator

import torch
from rich.console import Console

from robustnas.robustness.attacks import accuracy, pgd, robust_accuracy
from robustnas.core.config import (Command, DataConfig, EvalConfig, ParamCount, RunCommand, SearchCommand, TrainCommand,
                                   TrainConfig, format_eps, parse_count, parse_eps, to_yaml)
from robustnas.data.datasets import Dataset, load_dataset
from robustnas.core.errors import UserError
from robustnas.core.executor import ExecutorSettings
from robustnas.core.rundir import atomic_write_text, read_json, write_json
from robustnas.nets.arch import build_arch, save_model
from robustnas.nets.size import count_flops, count_params
from robustnas.training.loop import epoch_steps
from robustnas.training.trainer import Trainer, resolve_device


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
    parse_eps(cmd.train.attack.eps)  # a bad eps fails here, before the run directory exists
    torch.manual_seed(cmd.seed)
    params = parse_count(cmd.model.params) if cmd.model.params else None
    model, spec = build_arch(cmd.model.arch, data.meta, params=params, width=cmd.model.width,
                             C=cmd.model.C, layers=cmd.model.layers)
    out = Path(cmd.out) if cmd.out else Path("runs") / (cmd.name or default_run_name(cmd))
    check_new_run_dir(out, resume)
    if resume and _finished(out, "train") and read_json(out / "metrics.json")["train"]["epochs"] == cmd.train.epochs:
        return _already_finished(out)  # asked for more epochs than it ran, the Trainer continues it below
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
    """Train `model` with the Trainer into run directory `out`; save weights, log and a first metrics.json
    with clean and PGD accuracy on `test_n` test images (0: none, for callers that run evaluate_run next)."""
    eps = parse_eps(train.attack.eps)
    trainer = Trainer(model, data, train, eps, seed=seed, device=device, out_dir=out, progress=progress)
    result = trainer.fit(resume=resume)
    save_model(out, model, spec)
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(asdict(h)) + "\n" for h in result.history))

    metrics: dict = {"dataset": data.meta.name, "eps": format_eps(eps), "norm": train.attack.norm}
    n = min(test_n, len(data.test.x))
    if n > 0:
        x, y = data.test.x[:n].to(device), data.test.y[:n].to(device)
        torch.manual_seed(seed)
        rob = robust_accuracy(model, x, y, lambda xb, yb: pgd(model, xb, yb, eps, steps=test_pgd_steps,
                                                              norm=train.attack.norm))
        metrics.update({"n": n, "clean_acc": accuracy(model, x, y), "robust_acc": {f"pgd{test_pgd_steps}": rob}})
    metrics.update({
        "params": count_params(model), "flops": count_flops(model, data.meta.shape),
        "train": {"adv": train.adv, "epochs": train.epochs, "best_epoch": result.best_epoch,
                  "best_val_clean": result.best_val_clean, "best_val_robust": result.best_val_robust,
                  "seconds": result.seconds, "sessions": result.sessions},  # summed over resumed sessions
    })
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
    _save_history(out, result.history)
    _save_genotype(out, result.genotype)
    write_json(out / "decision.json", result.decision)
    return result, out


def _save_history(out: Path, history: list[dict]) -> None:
    """search.jsonl, one record per epoch / generation / candidate, from the finished search's history: a
    strategy writes it as it goes, but a search killed after its last checkpoint and resumed has nothing
    left to run, so only its result holds every record."""
    atomic_write_text(out / "search.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _save_genotype(out: Path, genotype) -> Path:
    from robustnas.core.rundir import write_json

    if isinstance(genotype, dict):
        write_json(out / "genotype.json", genotype)
    else:
        from robustnas.nets.genotypes import save_genotype

        save_genotype(genotype, out / "genotype.json")
    return out / "genotype.json"


def archive_evaluation(kind: str, out: Path, metrics: dict, config: dict, method: Optional[str] = None,
                       cost_s: Optional[float] = None) -> None:
    """Record a finished, evaluated run in the workspace's results archive (store.py), keyed by its run
    directory and metrics so a re-evaluation is a new row. The run's own files stay the record: a failure
    to write the archive is a warning, not a lost run. ROBUSTNAS_ARCHIVE=off turns archiving off."""
    import os
    import sqlite3

    from robustnas.results.store import ENV, Archive, candidate_key

    if os.environ.get(ENV, "").lower() in ("off", "0", "none"):
        return
    spec = read_json(out / "model.json") if (out / "model.json").is_file() else {}
    genotype = spec.get("genotype")
    space = genotype.get("space", "darts") if genotype is not None else f"handcrafted:{spec.get('config', {}).get('name')}"
    try:
        with Archive() as db:
            rid = db.add_run(kind, method=method, config=config, run_dir=str(out), status="done")
            db.add_evaluation(metrics, run_id=rid, key=candidate_key(str(out.resolve()), metrics), name=out.name,
                              space=space, genotype=genotype,
                              recipe=config.get("train"), cost_s=cost_s)
    except (sqlite3.Error, OSError, UserError) as e:
        Console(stderr=True).print(f"[yellow]warning:[/] results archive not written: {e}", highlight=False)


def train_evaluate(out: Path, arch: str, data: Dataset, cmd, device: torch.device, resume: bool = False,
                   progress: bool = True, method: Optional[str] = None, record: Optional[dict] = None,
                   **size) -> dict:
    """Build `arch` (build_arch's `size` keywords: params / at_most, or C / layers / reduction_layers),
    train it with `cmd`'s recipe and evaluate it with `cmd`'s attacks into `out`, and archive it (with
    `record` added to its config): a run's hand-crafted baseline, or a network trained beside a search."""
    from robustnas.evaluation.evaluate import evaluate_run

    check_new_run_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cmd))
    torch.manual_seed(cmd.seed)
    model, spec = build_arch(arch, data.meta, **size)
    train_into(out, model, spec, data, cmd.train, seed=cmd.seed, device=device, resume=resume,
               progress=progress, test_n=0)  # evaluate_run measures the test set next
    ev = cmd.evaluate
    metrics = evaluate_run(out, attacks=ev.attacks, n=ev.n, batch_size=ev.batch_size, certify=ev.certify,
                           device=str(device), seed=cmd.seed, progress=progress, interval=ev.interval)
    archive_evaluation("train", out, metrics, {**cmd.model_dump(mode="json"), "arch": arch, **(record or {})},
                       method=method)
    return metrics


def final_network_size(cmd: RunCommand, strategy) -> dict:
    """build_arch's size keywords for the searched network: the method's own when its search fixed them
    (Strategy.final_size), else the `final:` settings. A clash is an error before anything runs."""
    given = {"C": cmd.final.C, "layers": cmd.final.layers,
             "params": parse_count(cmd.final.params) if cmd.final.params else None,
             "reduction_layers": cmd.final.reduction_layers}
    fixed = strategy.final_size() if hasattr(strategy, "final_size") else None
    if fixed is None:
        return given
    for key, value in given.items():
        if value is not None and fixed.get(key) != value:
            want = (f"the search fixes {key}={fixed[key]}" if key in fixed
                    else f"method {cmd.method} fixes the final network's size itself")
            raise UserError(f"final.{key}={value} clashes with the search: {want}; remove final.{key} "
                            f"(or change the method's own setting)")
    return dict(fixed)


def run_pipeline(cmd: RunCommand, resume: bool = False, progress: bool = True) -> dict:
    """search -> train the derived network -> evaluate -> the same for a hand-crafted baseline -> report.
    Resumed, a finished run (metrics.json written last) is left as it is."""
    from robustnas.evaluation.evaluate import evaluate_run, get_attack
    from robustnas.search import SearchContext, build_strategy

    device = resolve_device(cmd.device)
    data = load_data(cmd.data, cmd.seed)
    cmd = resolved(cmd, data)
    eps = parse_eps(cmd.train.attack.eps)
    strategy = build_strategy(cmd.method, cmd.search)
    for a in cmd.evaluate.attacks:
        get_attack(a)
    if cmd.baseline.arch is not None:
        from robustnas.nets.models import list_models

        if cmd.baseline.arch not in list_models():
            raise UserError(f"baseline.arch {cmd.baseline.arch!r} is not a hand-crafted model; "
                            f"use one of {', '.join(list_models())}")
    final_kw = final_network_size(cmd, strategy)
    out = Path(cmd.out) if cmd.out else Path("runs") / cmd.name
    check_new_run_dir(out, resume)
    if resume and _finished(out, "search_seconds"):
        return _already_finished(out, baseline="baseline" if cmd.baseline.arch is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cmd))

    # 1. search
    torch.manual_seed(cmd.seed)
    ctx = SearchContext(data=data, eps=eps, norm=cmd.train.attack.norm, device=device, seed=cmd.seed,
                        out_dir=out / "search", progress=progress)
    result = strategy.search(ctx, resume=resume)
    search_seconds = result.seconds  # summed over the sessions (run and resumes) that ran the search
    genotype_path = _save_genotype(out, result.genotype)
    for where in (out / "search", out):
        _save_history(where, result.history)

    # 2. train and 3. evaluate the searched network
    torch.manual_seed(cmd.seed)
    model, spec = build_arch(str(genotype_path), data.meta, **final_kw)
    ev = cmd.evaluate
    train_into(out, model, spec, data, cmd.train, seed=cmd.seed, device=device, resume=resume,
               progress=progress, test_n=0)  # evaluate_run measures the test set next
    searched = evaluate_run(out, attacks=ev.attacks, n=ev.n, batch_size=ev.batch_size, certify=ev.certify,
                            device=str(device), seed=cmd.seed, progress=progress, interval=ev.interval)
    searched["search_seconds"] = search_seconds
    searched["search_sessions"] = result.sessions
    searched["search_method"] = cmd.method
    searched["search_decision"] = result.decision

    # 4. the hand-crafted baseline at the same parameter count, same recipe and attacks
    baseline = None
    if cmd.baseline.arch is not None:
        baseline = train_evaluate(out / "baseline", cmd.baseline.arch, data, cmd, device, resume=resume,
                                  progress=progress, params=count_params(model))

    from robustnas.results.report import write_search_run_report

    write_search_run_report(out, cmd, result, searched, baseline, strategy=strategy, meta=data.meta)
    write_json(out / "metrics.json", searched)  # last: its search_seconds marks the run as finished
    archive_evaluation("run", out, searched, cmd.model_dump(mode="json"), method=cmd.method, cost_s=search_seconds)
    searched["run_dir"] = str(out)
    if baseline is not None:
        searched["baseline"] = baseline
    return searched


def _finished(out: Path, key: str) -> bool:
    """A run whose metrics.json holds `key`, written by its last step: --resume (and a benchmark) never
    redoes it."""
    return (out / "metrics.json").is_file() and key in read_json(out / "metrics.json")


def _already_finished(out: Path, baseline: Optional[str] = None) -> dict:
    """What a finished run returns when resumed: its metrics.json as it is (and its baseline's); nothing is
    trained, attacked or written again, so an evaluation added later, or a run of an earlier release whose
    checkpoints are gone, stays as it was."""
    Console(stderr=True).print(f"{out} is finished: nothing to resume", highlight=False)
    metrics = {**read_json(out / "metrics.json"), "run_dir": str(out)}
    if baseline is not None and (out / baseline / "metrics.json").is_file():
        metrics["baseline"] = read_json(out / baseline / "metrics.json")
    return metrics


class BenchmarkCommand(ExecutorSettings, Command):
    """`robustnas benchmark`: every listed method and hand-crafted baseline on the same data, final-network
    parameter budget, training recipe and attacks; `methods` maps a method to its own search settings. Its
    members (one method or baseline at one seed) run through the executor: `executor: pool` with
    `executor_options: {workers: 2}` trains and attacks two members at once, each in a process of its own."""

    name: str = "benchmark"
    budget: ParamCount = "50k"      # parameters of every final network (searched and hand-crafted)
    layers: Optional[int] = None    # cells of the DARTS-space final networks; None: arch.DEFAULT_LAYERS
    reduction_layers: Optional[list[int]] = None  # their reduction cells; None: the DARTS rule
    methods: dict[str, dict[str, Any]] = {}
    baselines: list[str] = ["cnn"]
    # each member is searched and trained once per seed (None: `seed` alone); a search seed is part of the
    # method's variance, so the report's intervals span seeds and test images
    seeds: Optional[list[int]] = Field(default=None, min_length=1)
    # sequential evaluation: attack this many test images at a time and stop growing a pair once its interval
    # excludes zero or it reaches evaluate.n (the maximum); None: every member on all evaluate.n images
    sequential_chunk: Optional[int] = Field(default=None, ge=1)
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _distinct_seeds(self) -> "BenchmarkCommand":
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        return self

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]


def benchmark_run(cmd: BenchmarkCommand, resume: bool = False, progress: bool = True) -> dict:
    """Every method in `cmd.methods` through `run_pipeline` and every hand-crafted baseline through
    `train_evaluate`, all at `cmd.budget` final parameters with one recipe, then one comparison report.

    A DARTS-space method's final network gets the C that meets the budget; a method whose search fixes
    the final size (LRNAS, TAM-NAS) gets the budget as its own `max_params` instead. Finished members
    (metrics.json written by their last step) are skipped, so an interrupted benchmark continues with
    --resume, and a member added to the config later is paired with the stored per-image results of the
    others without attacking them again. With several `seeds` every member is searched and trained once
    per seed (`<member>-s<seed>/`) and the comparison treats the seeds as one member."""
    from robustnas.results.compare import compare_runs
    from robustnas.evaluation.evaluate import get_attack
    from robustnas.nets.models import list_models
    from robustnas.search import build_strategy

    if not cmd.methods and not cmd.baselines:
        raise UserError("the benchmark config lists no methods and no baselines")
    for a in cmd.evaluate.attacks:
        get_attack(a)
    for arch in cmd.baselines:
        if arch not in list_models():
            raise UserError(f"baseline {arch!r} is not a hand-crafted model; use one of {', '.join(list_models())}")
    seeds = cmd.seed_list()
    out = Path(cmd.out) if cmd.out else Path("runs") / cmd.name
    chunk = cmd.sequential_chunk
    first_eval = member_eval(cmd)

    def member_dir(name: str, seed: int) -> Path:  # one seed keeps the layout of single-seed benchmarks
        return out / (name if len(seeds) == 1 else f"{name}-s{seed}")

    runs: list[tuple[str, RunCommand]] = []
    for method, settings in cmd.methods.items():
        settings = dict(settings or {})
        strategy = build_strategy(method, settings)
        fixes_size = hasattr(strategy, "final_size")
        if fixes_size and "max_params" in type(strategy.cfg).model_fields:
            settings.setdefault("max_params", cmd.budget)
            strategy = build_strategy(method, settings)
        final = {} if fixes_size else {"params": cmd.budget, "layers": cmd.layers,
                                       "reduction_layers": cmd.reduction_layers}
        for seed in seeds:
            rc = RunCommand(name=method, seed=seed, device=cmd.device, out=str(member_dir(method, seed)),
                            data=cmd.data, method=method, search=settings, final=final, train=cmd.train,
                            evaluate=first_eval, baseline={"arch": None})
            final_network_size(rc, strategy)  # a clash is reported before anything runs
            runs.append((method, rc))
    if out.exists() and any(out.iterdir()) and not resume:
        raise UserError(f"benchmark directory {out} already exists: pass --resume to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cmd))

    members: list[dict] = [{"run": rc, "label": method} for method, rc in runs]
    for seed in seeds if cmd.baselines else []:
        for arch in cmd.baselines:
            members.append({"baseline": arch, "seed": seed, "out": str(member_dir(f"baseline-{arch}", seed)),
                            "label": f"{arch} (hand-crafted)"})
    todo = [m for m in members if not _finished(Path(m["run"].out if "run" in m else m["out"]),
                                                 "search_seconds" if "run" in m else "reliable")]
    with cmd.make_executor() as executor:
        inprocess = cmd.executor == "inprocess"
        executor.map(BenchmarkMember(cmd, resume, progress and inprocess), todo)
    dirs = [Path(m["run"].out if "run" in m else m["out"]) for m in members]
    labels = [m["label"] for m in members]
    stops = None
    if chunk:
        stops = sequential_evaluation(dirs, labels, chunk, cmd.evaluate.n, batch_size=cmd.evaluate.batch_size,
                                      device=cmd.device, seed=cmd.seed)
    return compare_runs(dirs, out, labels, title=f"{cmd.name}: every method at {cmd.budget} parameters",
                        sequential=stops)


class BenchmarkMember:
    """One member of a benchmark, picklable for the executor: a method's `run` at one seed, or a hand-crafted
    baseline at one seed trained and evaluated with the benchmark's recipe; it writes its own run directory."""

    def __init__(self, cmd: BenchmarkCommand, resume: bool, progress: bool):
        self.cmd, self.resume, self.progress = cmd, resume, progress

    def __call__(self, member: dict) -> str:
        if "run" in member:
            rc = member["run"]
            run_pipeline(rc, resume=self.resume or Path(rc.out).exists(), progress=self.progress)
            return rc.out
        cmd, seed, out = self.cmd, member["seed"], Path(member["out"])
        data = load_data(cmd.data, seed)
        rc = resolved(RunCommand(name="baseline", seed=seed, device=cmd.device, data=cmd.data, train=cmd.train,
                                 evaluate=member_eval(cmd)), data)
        train_evaluate(out, member["baseline"], data, rc, resolve_device(cmd.device),
                       resume=self.resume or out.exists(), progress=self.progress,
                       params=parse_count(cmd.budget), at_most=True)
        return str(out)


def member_eval(cmd: BenchmarkCommand) -> EvalConfig:
    """The evaluation every member gets first: all `evaluate.n` images, or the first chunk when sequential."""
    chunk = cmd.sequential_chunk
    return cmd.evaluate.model_copy(update={"n": min(chunk, cmd.evaluate.n)}) if chunk else cmd.evaluate


def sequential_evaluation(dirs: list[Path], labels: list[str], chunk: int, max_n: int, batch_size: int = 256,
                          device: str = "auto", seed: int = 0, alpha: float = 0.05) -> list[dict]:
    """Grow the members' per-image results `chunk` test images at a time (evaluate.extend_per_image) while
    some tested pair is undecided and has fewer than `max_n` images. After every chunk each tested pair (the
    test compare's report uses, compare.paired_analysis) gets a look: its p-value against a Lan-DeMets
    O'Brien-Fleming boundary at information fraction n / max_n, inside Holm's method over the tested pairs
    (stats.sequential_holm). A rejected pair stops (early when below max_n), as does one at max_n or out of
    test images; a pair without a test (a member with too few seeds) does not grow anything. Returns each
    pair's stop: {"a", "b", "n", "early", "differ", "level", "p", "looks", "why"}; compare_runs(...,
    sequential=) reports these verdicts."""
    from robustnas.core.stats import sequential_holm
    from robustnas.results.compare import load_entry, paired_analysis
    from robustnas.evaluation.evaluate import extend_per_image, read_per_image

    looks: dict[tuple[str, str], list[tuple[float, float]]] = {}
    ns: dict[tuple[str, str], list[int]] = {}
    untested: dict[tuple[str, str], dict] = {}
    rejected: dict = {}
    levels: dict = {}
    rows = {d: len(read_per_image(d)["index"]) for d in dirs}
    while True:
        paired = paired_analysis([load_entry(d, lab) for d, lab in zip(dirs, labels)], alpha=alpha)
        for pr in paired["pairs"]:
            key = tuple(sorted((pr["a"], pr["b"])))
            if pr["p"] is None:
                untested[key] = pr
            elif key not in rejected and (key not in ns or pr["n"] > ns[key][-1]):  # a new look
                looks.setdefault(key, []).append((pr["n"] / max_n, pr["p"]))
                ns.setdefault(key, []).append(pr["n"])
        rejected, levels = sequential_holm(looks, alpha, rejected)
        grow = {lab for key in looks if key not in rejected and ns[key][-1] < max_n for lab in key}
        grown = False
        for d, lab in zip(dirs, labels):
            if lab in grow and rows[d] < max_n:
                before = rows[d]
                rows[d] = extend_per_image(d, min(chunk, max_n - rows[d]), batch_size=batch_size, device=device,
                                           seed=seed)
                grown |= rows[d] > before
        if not grown:
            break
    stops = []
    for key, seen in looks.items():
        n, p = ns[key][-1], seen[-1][1]
        differ = key in rejected
        level = rejected[key] if differ else levels[key]
        why = (f"differs: p {p:.3g} below its look's level {level:.3g}" if differ else
               f"reached the maximum n={max_n}: p {p:.3g} not below its level {level:.3g}" if n >= max_n else
               f"the test set has no more images: p {p:.3g} not below its level {level:.3g}")
        stops.append({"a": key[0], "b": key[1], "n": n, "early": differ and n < max_n, "differ": differ,
                      "level": level, "p": p, "looks": [[k, q] for k, (_, q) in zip(ns[key], seen)], "why": why})
    for key, pr in untested.items():
        stops.append({"a": key[0], "b": key[1], "n": pr["n"], "early": False, "differ": None, "level": None,
                      "p": None, "looks": [], "why": f"not grown: no seed-level test ({pr['why']})"})
    return stops


# ------------------------------------------------------------------------------------------ benchmark --plan
CAL_BATCHES = 4   # batches per epoch of a calibration search (the per-batch cost comes from them)
CAL_EPOCHS = 2    # epochs of a calibration training: the second, warm one is timed
CAL_IMAGES = 50   # test images of a calibration evaluation


def _timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def _warmup_knobs(cfg) -> dict[str, int]:
    """A method's warm-up stages (integer epoch counts: weights only, no alpha or regulariser step)."""
    return {k: getattr(cfg, k) for k in type(cfg).model_fields
            if (k.endswith("warmup_epochs") or k == "adv_only_epochs") and isinstance(getattr(cfg, k), int)}


@dataclass
class SearchCost:
    """A search's cost model, from one short calibration search's own records (seconds and images/s of each
    epoch, seconds of each NSGA-II generation and of each scored candidate): set-up and finish (`fixed`), per
    batch and per-epoch overhead (validation, LRNAS's contribution round) of a warm-up epoch and of a full
    one, per generation, per candidate. `seconds(strategy, train_size)` extrapolates it to a strategy's real
    settings."""

    fixed: float = 0.0
    warm: Optional[tuple[float, float]] = None   # (per batch, per-epoch overhead) of a warm-up epoch
    full: Optional[tuple[float, float]] = None   # the same of a full epoch
    generation: float = 0.0
    candidate: float = 0.0

    def seconds(self, strategy, train_size: int) -> float:
        cfg = strategy.cfg
        epochs = getattr(cfg, "epochs", 0)
        warm = min(max(_warmup_knobs(cfg).values(), default=0), epochs)
        batches = batches_per_epoch(strategy, train_size)
        total = self.fixed + getattr(cfg, "generations", 0) * self.generation + getattr(cfg, "n", 0) * self.candidate
        for count, kind in ((warm, self.warm or self.full), (epochs - warm, self.full or self.warm)):
            if count and kind is not None:
                total += count * (batches * kind[0] + kind[1])
        return total

    @classmethod
    def from_records(cls, history: list[dict], seconds: float, cal_cfg, batches: int) -> "SearchCost":
        warm_epochs = max(_warmup_knobs(cal_cfg).values(), default=0)
        cost, recorded = cls(), 0.0
        gens, cands = [], []
        for r in history:
            recorded += r.get("seconds", 0.0)
            if "images_per_s" in r and "epoch" in r:  # an epoch: its batches, then validation (and the like)
                per_batch = cal_cfg.batch_size / r["images_per_s"]
                kind = (per_batch, max(r["seconds"] - batches * per_batch, 0.0))
                if r["epoch"] < warm_epochs:
                    cost.warm = kind      # the last of each kind: the later, the fewer first-call costs
                else:
                    cost.full = kind
            elif "generation" in r:
                gens.append(r["seconds"])
            elif "index" in r and "seconds" in r:
                cands.append(r["seconds"])
        cost.generation = sum(gens) / len(gens) if gens else 0.0
        cost.candidate = sum(cands) / len(cands) if cands else 0.0
        cost.fixed = max(seconds - recorded, 0.0)
        return cost


def batches_per_epoch(strategy, train_size: int) -> int:
    """Steps per epoch of `strategy`'s search on `train_size` training images (its own `steps_for`; 0 for a
    search without epochs)."""
    steps_for = getattr(strategy, "steps_for", None)
    return steps_for(train_size) if steps_for is not None else 0


def calibrate_search(method: str, settings: dict, data: Dataset, eps: float, norm: str, device, seed: int,
                     tmp: Path) -> tuple[SearchCost, object, object]:
    """A method's search cost model from one short search: its real settings but at most 2 epochs of
    CAL_BATCHES batches (a warm-up stage cut to its first epoch), one NSGA-II generation, one candidate.
    Returns the cost model, the calibration search's genotype and the real strategy."""
    from robustnas.search import SearchContext, build_strategy

    strategy = build_strategy(method, settings)
    cfg, fields = strategy.cfg, type(strategy.cfg).model_fields
    cal = {"epochs": min(getattr(cfg, "epochs", 1), 2),
           "max_batches_per_epoch": min(batches_per_epoch(strategy, len(data.train)), CAL_BATCHES),
           "generations": 1, "n": 1}
    cal = {k: v for k, v in cal.items() if k in fields}
    cal.update({k: min(v, 1) for k, v in _warmup_knobs(cfg).items()})
    small = build_strategy(method, {**settings, **cal})
    ctx = SearchContext(data=data, eps=eps, norm=norm, device=device, seed=seed, out_dir=tmp / method, progress=False)
    torch.manual_seed(seed)
    t, result = _timed(small.search, ctx)
    cost = SearchCost.from_records(result.history, t, small.cfg, batches_per_epoch(small, len(data.train)))
    return cost, result.genotype, strategy


def calibrate_train(model: torch.nn.Module, data: Dataset, train: TrainConfig, eps: float, device,
                    seed: int) -> float:
    """Estimated seconds of training `model` with `train`, from CAL_EPOCHS short epochs of CAL_BATCHES
    batches each, the last (warm) one timed: its cost per batch and of its validation. The model is left
    so trained (a few PGD-AT steps: the attacks are timed on it)."""
    from robustnas.data.datasets import Dataset as DS

    cfg = train.model_copy(update={"epochs": CAL_EPOCHS})
    part = DS(meta=data.meta, train=data.train.head(CAL_BATCHES * cfg.batch_size), val=data.val, test=data.test)
    last = Trainer(model, part, cfg, eps, seed=seed, device=device, progress=False).fit().history[-1]
    seen = min(len(part.train), CAL_BATCHES * cfg.batch_size)
    per_batch = seen / last.images_per_s / epoch_steps(seen, cfg.batch_size)
    per_val = max(last.seconds - seen / last.images_per_s, 0.0)
    return train.epochs * (epoch_steps(len(data.train), train.batch_size) * per_batch + per_val)


def calibrate_attack(model: torch.nn.Module, data: Dataset, cmd: BenchmarkCommand, eps: float, device, seed: int,
                     m: int = CAL_IMAGES) -> tuple[float, dict]:
    """Estimated seconds of `evaluate` on cmd.evaluate.n images: the whole evaluation (attacks, sanity checks,
    certification) timed on m images and scaled by n / m; the sanity checks' extra attacks, which see at most
    200 images, are timed on the same share of the m. Returns it with the timed model's clean and robust
    accuracy: pyautoattack attacks only the images still robust, so a more robust model costs more."""
    from robustnas.evaluation.evaluate import SANITY_N, evaluate_model

    ev = cmd.evaluate
    m = min(m, ev.n, len(data.test))
    sanity = max(1, round(m * min(SANITY_N, ev.n) / ev.n))  # the checks of evaluate_run see SANITY_N images
    t, metrics = _timed(evaluate_model, model, data.test.x[:m], data.test.y[:m], eps, attacks=ev.attacks,
                        norm=cmd.train.attack.norm, certify=ev.certify, batch_size=ev.batch_size, device=device,
                        seed=seed, progress=False, sanity_n=sanity)
    return t * ev.n / m, {"clean": metrics["clean_acc"], "robust": min(metrics["robust_acc"].values())}


def _wall(seconds: list[float], workers: int) -> float:
    """Wall time of jobs handed in this order to `workers` workers, each taking the next when it is free."""
    free = [0.0] * max(workers, 1)
    for s in seconds:
        i = free.index(min(free))
        free[i] += s
    return max(free)


def seed_sd_from(path: str | Path) -> dict:
    """The seed sd a previous comparison measured: compare.json (or a directory holding it) -> the root mean
    square of the sd over seeds of its members with several seeds ({"seed_sd", "members", "source"}). Each
    member's sd is of its per-seed accuracies on that run's test images, so it also holds their image noise:
    a little above the sd of the networks' accuracies, which makes the plan a little conservative."""
    path = Path(path)
    path = path / "compare.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path} not found: give a compare.json (or the directory of a benchmark or compare)")
    members = [m for m in read_json(path).get("paired", {}).get("members", []) if m.get("sd") is not None]
    if not members:
        raise UserError(f"{path} has no member with several seeds: its seed sd cannot be read")
    sd = (sum(m["sd"] ** 2 for m in members) / len(members)) ** 0.5
    return {"seed_sd": sd, "members": len(members), "source": str(path)}


def power_plan(cmd: BenchmarkCommand, discordance: float = 0.2, seed_sd: Optional[float] = None,
               alpha: float = 0.05, power: float = 0.8) -> dict:
    """The statistical part of `benchmark --plan`, without any training: the smallest AutoAttack difference
    between two members that the report's test declares with `power` at Holm's first step over the config's
    pairs (stats.detectable_difference), at n, 2n and 4n test images. `discordance` and `seed_sd` are the
    user's assumptions (or measurements, seed_sd_from); with several seeds a seed sd is required."""
    from robustnas.core.stats import MIN_SEEDS, detectable_difference

    seeds = len(cmd.seed_list())
    members = len(cmd.methods) + len(cmd.baselines)
    pairs = max(members * (members - 1) // 2, 1)
    if seeds > 1 and seed_sd is None:
        raise UserError(f"the config has {seeds} seeds per member: give the spread of a member's accuracy across "
                        "seeds (--seed-sd, an assumption, or --seed-sd-from a previous run's compare.json)")
    n = cmd.evaluate.n
    at = max(seeds, MIN_SEEDS)  # two seeds give no seed-level test: what three would detect instead
    detect = {k: detectable_difference(k, at, discordance, seed_sd, alpha, power, pairs) for k in (n, 2 * n, 4 * n)}
    return {"n": n, "seeds": seeds, "seeds_used": at, "members": members, "pairs": pairs, "detectable": detect,
            "assumed": {"discordance": discordance, "seed_sd": seed_sd}, "alpha": alpha, "power": power,
            "test": "McNemar (the two trained networks)" if at == 1 else "two-level t (the methods)"}


def benchmark_plan(cmd: BenchmarkCommand) -> dict:
    """Before any work: each member's estimated wall time on this machine (search, training, attack, times the
    seeds) from short timed calibrations (the statistical part is power_plan). Writes nothing under the
    benchmark's directory."""
    import tempfile

    from robustnas.evaluation.evaluate import get_attack
    from robustnas.nets.models import list_models

    for a in cmd.evaluate.attacks:
        get_attack(a)
    for arch in cmd.baselines:
        if arch not in list_models():
            raise UserError(f"baseline {arch!r} is not a hand-crafted model; use one of {', '.join(list_models())}")
    device = resolve_device(cmd.device)
    data = load_data(cmd.data, cmd.seed)  # one load: every calibration uses it
    eps = parse_eps(cmd.train.attack.eps if cmd.train.attack.eps is not None else data.meta.eps)
    budget = parse_count(cmd.budget)
    seeds = cmd.seed_list()
    # members run in the executor's workers, one torch thread each (core/executor.py): timed so
    workers = 1 if cmd.executor == "inprocess" else cmd.executor_options.get("workers") or os.cpu_count() or 1
    threads = torch.get_num_threads()
    if cmd.executor != "inprocess":
        torch.set_num_threads(1)
    members = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for method, settings in cmd.methods.items():  # each method calibrated once, for all its seeds
                from robustnas.search import build_strategy

                settings = dict(settings or {})
                strategy = build_strategy(method, settings)
                if hasattr(strategy, "final_size") and "max_params" in type(strategy.cfg).model_fields:
                    settings.setdefault("max_params", cmd.budget)
                cost, genotype, strategy = calibrate_search(method, settings, data, eps, cmd.train.attack.norm,
                                                            device, cmd.seed, tmp)
                final = {} if hasattr(strategy, "final_size") else {"params": cmd.budget, "layers": cmd.layers,
                                                                     "reduction_layers": cmd.reduction_layers}
                rc = RunCommand(name=method, method=method, search=settings, final=final)
                torch.manual_seed(cmd.seed)
                model, _ = build_arch(str(_save_genotype(tmp / method, genotype)), data.meta,
                                      **final_network_size(rc, strategy))
                members.append({"label": method, "search_s": cost.seconds(strategy, len(data.train)),
                                "model": model})
            for arch in cmd.baselines:
                torch.manual_seed(cmd.seed)
                model, _ = build_arch(arch, data.meta, params=budget, at_most=True)
                members.append({"label": f"{arch} (hand-crafted)", "search_s": 0.0, "model": model})
            for mem in members:
                model = mem.pop("model")
                mem["params"] = count_params(model)
                mem["train_s"] = calibrate_train(model, data, cmd.train, eps, device, cmd.seed)
                mem["attack_s"], mem["timed_on"] = calibrate_attack(model, data, cmd, eps, device, cmd.seed)
                mem["seeds"] = len(seeds)
                mem["total_s"] = len(seeds) * (mem["search_s"] + mem["train_s"] + mem["attack_s"])
    finally:
        torch.set_num_threads(threads)
    # the executor's order: every method's seeds, then every baseline's (benchmark_run's member list)
    jobs = [(m["total_s"] / len(seeds)) for m in members for _ in seeds]
    return {"members": members, "total_s": sum(m["total_s"] for m in members), "seeds": seeds,
            "workers": workers, "wall_s": _wall(jobs, workers), "device": str(device)}
