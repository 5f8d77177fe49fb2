"""Architecture study without adversarial training (METHODS.md section 3; Devaguptapu et al. 2021, "On
Adversarial Robustness: a Neural Architecture Search perspective").

Random genotypes of the DARTS space, published NAS genotypes and hand-crafted networks, all at one
parameter budget, are trained normally by the one Trainer and attacked at several epsilons; ensembles of
them (ensemble.py), with every member at the full budget and budget-matched (k members within it together),
are attacked white-box as single modules. Each architecture is one job for an executor
(`make_executor(..).map`), deterministic in the job (its seed comes from its name), and leaves its weights
and result.json in models/<name>/, so `resume` redoes only unfinished jobs. study.json, table.csv,
report.md and plots/ summarise; docs/study.md explains the choices.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from robustnas.evaluation.analysis import hrs
from robustnas.core.config import (ArchConfig, Base, Command, DataConfig, ParamCount, TrainCommand, TrainConfig, format_eps,
                              parse_eps, to_yaml)
from robustnas.data.datasets import Dataset
from robustnas.evaluation.ensemble import INITS, LogitEnsemble, feature_ensemble, feature_ensemble_params
from robustnas.core.errors import UserError
from robustnas.core.executor import ExecutorSettings
from robustnas.core.rundir import atomic_write_text, read_json, write_json
from robustnas.nets.arch import save_model
from robustnas.nets.size import count_flops, count_params
from robustnas.core.config import parse_count

GROUPS = ("random", "published", "handcrafted")  # the single architectures; NAS = random + published
# group "member": random genotypes at 1/k of the budget, members of budget-matched logit ensembles only


class EnsembleConfig(Base):
    """Which ensembles the study builds (see ensemble.py and docs/study.md)."""

    feature: list[str] = ["random-0"]    # architectures trained as feature ensembles
    inits: list[str] = list(INITS)       # one member per initialisation scheme
    init_mode: Literal["fan_out", "fan_in"] = "fan_out"   # Kaiming fan; fan_in: robustnas before issue 14
    init_layers: Literal["conv", "conv_linear"] = "conv"  # re-initialised layers; conv_linear: before issue 14
    combine: list[Literal["mean", "one_by_one"]] = ["mean", "one_by_one"]  # one ensemble per way of combining
    random: list[int] = [3]              # averaged-logit ensembles of the first k random genotypes
    # unmatched: k members at the full budget each (k times the parameters) against one of them;
    # matched: k members within the budget together against single networks at the full budget
    budget: list[Literal["unmatched", "matched"]] = ["unmatched", "matched"]


class StudyCommand(ExecutorSettings, Command):
    """`robustnas study`. Defaults are the CPU-sized Fashion-MNIST study of configs/study.yaml."""

    name: str = "study"
    seed: int = Field(default=0, ge=0)
    data: DataConfig = DataConfig(dataset="fashion-mnist", fallback="digits", subset=3000)
    params: ParamCount = "25k"           # parameter budget of every single architecture
    layers: int = Field(default=3, ge=1)  # cells of the genotype networks
    reduction_layers: Optional[list[int]] = None  # their reduction cells; None: DARTS's L//3 and 2L//3
    random: int = Field(default=3, ge=0)  # random genotypes drawn (named random-0, random-1, ...)
    published: list[str] = ["darts_v2", "pdarts"]     # published genotype names or genotype JSON paths
    handcrafted: list[str] = ["preact_resnet", "densenet", "vgg", "cnn"]
    train: TrainConfig = TrainConfig(adv="none", epochs=3, batch_size=64, val_n=500, val_steps=5)
    attacks: list[str] = ["fgsm", "pgd20", "apgd-ce", "square"]
    eps: list[str] = ["0.01", "0.03", "0.1"]
    n: int = Field(default=200, ge=1)     # test images attacked
    batch_size: int = Field(default=256, ge=1)
    attack_options: dict[str, dict[str, Any]] = {"apgd-ce": {"n_iter": 50}, "square": {"n_queries": 500}}
    ensembles: EnsembleConfig = EnsembleConfig()
    # executor, executor_options: where the jobs run (ExecutorSettings, robustnas/executor.py)

    @field_validator("eps", mode="before")
    @classmethod
    def _check_eps(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError("give at least one epsilon, e.g. [0.01, 0.03, 0.1]")
        for e in v:
            parse_eps(e)
        return [str(e) for e in v]


# ------------------------------------------------------------------------------------------------ planning
def job_seed(seed: int, name: str) -> int:
    """A job's seed from the study seed and its name: adding an architecture changes no other result."""
    return (zlib.crc32(name.encode()) + 1_000_003 * seed) % (2**31 - 1)


def _arch_name(arch: str) -> str:
    return Path(arch).stem if arch.endswith(".json") else arch


def check_study(cmd: StudyCommand) -> None:
    """Every setting the jobs rely on, checked before anything is written or trained."""
    from robustnas.nets.arch import is_genotype_arch
    from robustnas.robustness.attacks import get_attack
    from robustnas.nets.models import list_models

    for a in cmd.attacks:
        get_attack(a)
        if a.strip().lower() == "transfer":
            raise UserError("the study has no surrogate for the transfer attack; drop it from attacks")
    for name in cmd.handcrafted:
        if name not in list_models():
            raise UserError(f"handcrafted: {name!r} is not a hand-crafted model; use {', '.join(list_models())}")
    for arch in cmd.published:
        if not is_genotype_arch(arch):
            raise UserError(f"published: {arch!r} is neither a published genotype name nor a genotype JSON file")
    names = [f"random-{k}" for k in range(cmd.random)] + [_arch_name(a) for a in cmd.published] + cmd.handcrafted
    if len(set(names)) != len(names):
        raise UserError(f"two architectures of the study have the same name: {names}")
    if not names:
        raise UserError("the study has no architecture: set random, published or handcrafted")
    for name in cmd.ensembles.feature:
        if name not in names:
            raise UserError(f"ensembles.feature: {name!r} is not an architecture of the study ({', '.join(names)})")
    for scheme in cmd.ensembles.inits:
        if scheme not in INITS:
            raise UserError(f"ensembles.inits: unknown initialisation {scheme!r}; known: {', '.join(INITS)}")
    if cmd.ensembles.feature and not cmd.ensembles.inits:
        raise UserError("ensembles.inits is empty: a feature ensemble needs one member per initialisation")
    if cmd.ensembles.feature and not cmd.ensembles.combine:
        raise UserError("ensembles.combine is empty: give mean, one_by_one or both")
    if (cmd.ensembles.feature or cmd.ensembles.random) and not cmd.ensembles.budget:
        raise UserError("ensembles.budget is empty: give unmatched, matched or both")
    for k in cmd.ensembles.random:
        if not 2 <= k <= cmd.random:
            raise UserError(f"ensembles.random: an ensemble of {k} random genotypes needs 2 <= k <= random "
                            f"({cmd.random})")


def plan_jobs(cmd: StudyCommand, genotype_paths: list[Path], matched: dict[tuple[str, str], int]) -> list[dict]:
    """The study's jobs as plain data: single architectures, members of budget-matched logit ensembles,
    feature ensembles, then logit ensembles. `matched[(arch, combine)]` is the member budget of a
    budget-matched feature ensemble (matched_member_params). Each ensemble names the full-budget single
    networks it is compared with (`reference`)."""
    budget, ens = parse_count(cmd.params), cmd.ensembles
    jobs = [{"name": p.stem, "group": "random", "kind": "single", "arch": str(p)} for p in genotype_paths]
    jobs += [{"name": _arch_name(a), "group": "published", "kind": "single", "arch": a} for a in cmd.published]
    jobs += [{"name": a, "group": "handcrafted", "kind": "single", "arch": a} for a in cmd.handcrafted]
    for j in jobs:
        j["params"] = budget
    arch_of = {j["name"]: j["arch"] for j in jobs}
    if "matched" in ens.budget:
        jobs += [{"name": f"random-{i}-1of{k}", "group": "member", "kind": "single", "arch": arch_of[f"random-{i}"],
                  "params": budget // k} for k in ens.random for i in range(k)]
    for b in ens.feature:
        for combine in ens.combine:
            for form in ens.budget:
                prefix = "feature-" if combine == "mean" else "onebyone-"
                name = prefix + b + ("-matched" if form == "matched" else "")
                jobs.append({"name": name, "group": "ensemble", "kind": "feature", "arch": arch_of[b], "base": b,
                             "inits": list(ens.inits), "init_mode": ens.init_mode, "init_layers": ens.init_layers,
                             "combine": combine, "budget": form, "reference": [b],
                             "params": budget if form == "unmatched" else matched[(b, combine)]})
    for k in ens.random:
        full = [f"random-{i}" for i in range(k)]
        for form in ens.budget:
            members = full if form == "unmatched" else [f"{m}-1of{k}" for m in full]
            name = f"logit-random-{k}" + ("-matched" if form == "matched" else "")
            jobs.append({"name": name, "group": "ensemble", "kind": "logit", "budget": form, "members": members,
                         "reference": full})
    for j in jobs:
        j["seed"] = job_seed(cmd.seed, j["name"])
    return jobs


def sized_model(cmd: StudyCommand, meta, arch: Any, params: int) -> nn.Module:
    """A study architecture within `params`: an --arch string through build_arch, or a drawn Genotype not yet
    saved, sized the same way (the largest even C within the budget)."""
    from robustnas.nets.arch import build_arch, channels_for_params
    from robustnas.nets.genotypes import build_network

    if isinstance(arch, str):
        return build_arch(arch, meta, params=params, **arch_options(cmd, arch))[0]
    kw = {k: v for k, v in arch_options(cmd, "").items() if k != "layers"}
    C = channels_for_params(arch, meta, cmd.layers, params, **kw)
    return build_network(arch, C=C, layers=cmd.layers, num_classes=meta.num_classes, in_shape=meta.shape,
                         mean=meta.mean, std=meta.std, **kw)


def matched_member_params(member: Callable[[int], nn.Module], budget: int, k: int, combine: str, name: str) -> int:
    """The largest member budget p <= budget // k at which a feature ensemble of k members built by
    `member(p)` has at most `budget` parameters in all (one_by_one: with its k*F*F + F combine layer).
    The ensemble's size grows with p, so bisection finds the edge; below it, a budget `member` refuses
    (a hand-crafted width must come within 10% of its budget) is stepped down by 10% until one builds."""

    def over(p: int) -> bool:
        try:
            return feature_ensemble_params(member(p), k, combine) > budget
        except UserError:  # refused: not over the budget
            return False

    lo, hi = 0, budget // k  # not over(lo) (0: none), over(hi) unless hi itself fits
    if not over(hi):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if over(mid) else (mid, hi)
    p = lo
    while p >= 1:
        try:
            if feature_ensemble_params(member(p), k, combine) <= budget:
                return p
        except UserError:
            pass
        p = int(p / 1.1)
    raise UserError(f"a budget-matched {combine} feature ensemble of {k} {name} does not fit in {budget} "
                    f"parameters; raise params, or drop matched from ensembles.budget")


# ------------------------------------------------------------------------------------------------ one job
def arch_options(cmd: StudyCommand, arch: str) -> dict:
    """build_arch's sizing options for `arch`: cells and reductions for genotypes; for hand-crafted nets the
    widest within the budget, as genotypes get the largest even C within it (no more parameters than)."""
    from robustnas.nets.models import MODELS

    if arch in MODELS:
        return {"at_most": True}
    kw: dict[str, Any] = {"layers": cmd.layers}
    if cmd.reduction_layers is not None:
        kw["reduction_layers"] = list(cmd.reduction_layers)
    return kw


def attack_table(model: nn.Module, x: Tensor, y: Tensor, attacks: list[str], eps: list[float], norm: str = "Linf",
                 batch_size: int = 256, seed: int = 0, options: Optional[dict] = None,
                 progress: bool = False) -> dict:
    """Clean accuracy and, per eps and attack, robust accuracy (right on the clean and the attacked image),
    the per-image worst case over the attacks, and HRS against it; evaluate.py's runner does the attacking."""
    from robustnas.evaluation.evaluate import AttackRunner

    bar = Progress(TextColumn("[bold]{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not progress, transient=True)
    robust: dict[str, dict[str, float]] = {}
    worst: dict[str, float] = {}
    with bar:
        runner = AttackRunner(model, x, y, max(eps), norm, batch_size, seed, bar, None, [],
                              {k.lower(): dict(v) for k, v in (options or {}).items()})
        for e in eps:
            masks = {a: runner.run(a, eps=e) for a in attacks}  # label = name: the options apply at every eps
            robust[format_eps(e)] = {a: m.float().mean().item() for a, m in masks.items()}
            worst[format_eps(e)] = torch.stack(list(masks.values())).all(0).float().mean().item()
    clean = runner.clean.float().mean().item()
    return {"clean_acc": clean, "robust_acc_by_eps": robust, "worst_acc": worst,
            "hrs": {k: hrs(clean, w) for k, w in worst.items()},
            "in_ball": all(r <= 1 + 1e-4 for r in runner.max_perturbation.values())
            and all(o <= 1e-6 for o in runner.outside_box.values())}


@dataclass
class StudyWorker:
    """Builds, trains (the one Trainer) and attacks one job; picklable, and deterministic in its job."""

    cmd: StudyCommand
    data: Dataset  # only the images the study uses
    out: Path
    device: str
    resume: bool = False
    progress: bool = False

    def __call__(self, job: dict) -> dict:
        d = self.out / "models" / job["name"]
        if self.resume and (d / "result.json").exists():
            done = read_json(d / "result.json")
            if "robust_acc" in done:  # written before 0.2, where the per-eps table was called robust_acc
                done["robust_acc_by_eps"] = done.pop("robust_acc")
            if done.get("job") != job:
                raise UserError(f"{d}/result.json was written for other settings; use another --out")
            return done
        console = Console(stderr=True)
        if self.progress:
            console.print(f"[bold]{job['name']}[/] ({job['kind']}, {job['group']})", highlight=False)
        t0 = time.perf_counter()
        model, spec = self.build(job)
        train = None
        if job["kind"] != "logit":
            train = self.train(model, job, d)
            save_model(d, model, spec)
        if job["kind"] == "single":  # an ordinary run directory: `robustnas evaluate models/<name>` works
            atomic_write_text(d / "config.yaml", to_yaml(TrainCommand(
                seed=self.cmd.seed, data=self.cmd.data, train=self.cmd.train,
                model=ArchConfig(arch=job["arch"], params=str(job["params"]),
                                 layers=arch_options(self.cmd, job["arch"]).get("layers")))))
        cmd, test = self.cmd, self.data.test
        metrics = attack_table(model, test.x.to(self.device), test.y.to(self.device), cmd.attacks,
                               [parse_eps(e) for e in cmd.eps], cmd.train.attack.norm, cmd.batch_size, cmd.seed,
                               cmd.attack_options, self.progress)
        result = {"name": job["name"], "group": job["group"], "kind": job["kind"], "params": count_params(model),
                  "flops": count_flops(model, tuple(self.data.meta.shape)),
                  **metrics, "train": train, "seconds": time.perf_counter() - t0, "job": job}
        write_json(d / "result.json", result)
        if self.progress:
            last = format_eps(parse_eps(cmd.eps[-1]))
            console.print(f"  {job['name']}: params {result['params']:,}, clean {result['clean_acc']:.3f}, "
                          f"worst@{last} {result['worst_acc'][last]:.3f} ({result['seconds']:.0f} s)",
                          highlight=False)
        return result

    def build(self, job: dict) -> tuple[nn.Module, dict]:
        from robustnas.nets.arch import build_arch

        meta, cmd = self.data.meta, self.cmd
        torch.manual_seed(job["seed"])
        if job["kind"] == "single":
            return build_arch(job["arch"], meta, params=job["params"], **arch_options(cmd, job["arch"]))
        if job["kind"] == "feature":
            kw = arch_options(cmd, job["arch"])
            _, member = build_arch(job["arch"], meta, params=job["params"], **kw)
            model = feature_ensemble(lambda: build_arch(job["arch"], meta, params=job["params"], **kw)[0],
                                     job["inits"], job["seed"], job["combine"], job["init_mode"], job["init_layers"])
            return model, {"kind": "feature_ensemble", "member": member, "inits": job["inits"],
                           "init_mode": job["init_mode"], "init_layers": job["init_layers"],
                           "combine": job["combine"]}
        from robustnas.nets.arch import load_model

        members = [load_model(self.out / "models" / m, device=self.device)[0] for m in job["members"]]
        return LogitEnsemble(members), {"kind": "logit_ensemble", "members": job["members"]}

    def train(self, model: nn.Module, job: dict, d: Path) -> dict:
        from robustnas.training.trainer import Trainer

        cfg = self.cmd.train
        eps = parse_eps(cfg.attack.eps if cfg.attack.eps is not None else self.data.meta.eps)
        trainer = Trainer(model, self.data, cfg, eps, seed=job["seed"], device=self.device, out_dir=d,
                          progress=self.progress)
        t0 = time.perf_counter()
        r = trainer.fit(resume=self.resume)
        return {"adv": cfg.adv, "epochs": cfg.epochs, "best_epoch": r.best_epoch, "val_clean": r.best_val_clean,
                "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ the study
def run_study(cmd: StudyCommand, resume: bool = False, progress: bool = True) -> dict:
    """Draw, train and attack every architecture and ensemble of `cmd`; write the study directory
    (config.yaml, genotypes/, models/<name>/, study.json, table.csv, report.md, plots/); return study.json."""
    from robustnas.nets.arch import build_arch
    from robustnas.nets.genotypes import save_genotype
    from robustnas.app.pipeline import check_new_run_dir, load_data
    from robustnas.search.random import sample_genotypes
    from robustnas.results.study_report import write_study_report
    from robustnas.training.trainer import resolve_device

    check_study(cmd)
    device = resolve_device(cmd.device)
    data = load_data(cmd.data, cmd.seed)
    cmd = cmd.model_copy(deep=True)
    cmd.data.dataset, cmd.data.fallback = data.meta.name, None
    params = parse_count(cmd.params)
    net_kw = {k: v for k, v in arch_options(cmd, "").items() if k != "layers"}
    drawn, rejected = sample_genotypes(cmd.random, np.random.default_rng(cmd.seed), data.meta, cmd.layers,
                                       params=params, **net_kw)
    for arch in cmd.published + cmd.handcrafted:  # a budget out of reach fails here, before anything is written
        build_arch(arch, data.meta, params=params, **arch_options(cmd, arch))
    archs = {f"random-{k}": g for k, (g, _) in enumerate(drawn)}
    archs.update({_arch_name(a): a for a in cmd.published + cmd.handcrafted})
    matched: dict[tuple[str, str], int] = {}
    if "matched" in cmd.ensembles.budget:
        for b in cmd.ensembles.feature:
            for combine in cmd.ensembles.combine:
                matched[(b, combine)] = matched_member_params(lambda p: sized_model(cmd, data.meta, archs[b], p),
                                                              params, len(cmd.ensembles.inits), combine, b)
        for k in cmd.ensembles.random:
            for i in range(k):
                try:
                    sized_model(cmd, data.meta, archs[f"random-{i}"], params // k)
                except UserError as e:
                    raise UserError(f"budget-matched logit ensemble of {k}: random-{i} at 1/{k} of the budget: {e}; "
                                    f"raise params, or drop matched from ensembles.budget") from None
    out = Path(cmd.out) if cmd.out else Path("runs") / cmd.name
    check_new_run_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cmd))
    paths = [(out / "genotypes" / f"random-{k}.json").resolve() for k in range(len(drawn))]
    for k, ((g, _), path) in enumerate(zip(drawn, paths)):
        g.source = f"random_genotype (study seed {cmd.seed}, draw {k})"
        save_genotype(g, path)
    jobs = plan_jobs(cmd, paths, matched)

    used = Dataset(meta=data.meta, train=data.train, val=data.val.head(cmd.train.val_n), test=data.test.head(cmd.n))
    executor = cmd.make_executor()
    worker = StudyWorker(cmd, used, out, str(device), resume, progress and executor.name == "inprocess")
    try:
        results = executor.map(worker, [j for j in jobs if j["kind"] != "logit"])
        results += executor.map(worker, [j for j in jobs if j["kind"] == "logit"])  # their members are trained
    finally:
        executor.close()
    study = summarize(cmd, results, rejected, len(used.test))
    write_json(out / "study.json", study)
    write_study_report(out, study)
    study["run_dir"] = str(out)
    return study


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def group_means(rows: list[dict], eps: list[str], attacks: list[str]) -> dict:
    """Per eps: the mean clean accuracy, robust accuracy per attack, worst case and HRS over `rows`."""
    out = {}
    for e in eps:
        out[e] = {"count": len(rows), "clean": _mean([r["clean_acc"] for r in rows]),
                  **{a: _mean([r["robust_acc_by_eps"][e][a] for r in rows]) for a in attacks},
                  "worst": _mean([r["worst_acc"][e] for r in rows]), "hrs": _mean([r["hrs"][e] for r in rows])}
    return out


def summarize(cmd: StudyCommand, results: list[dict], rejected: int, n: int) -> dict:
    """study.json: settings, every result, group means, NAS minus hand-crafted, ensembles against the
    full-budget single networks they are compared with (unmatched and budget-matched)."""
    eps = [format_eps(parse_eps(e)) for e in cmd.eps]
    attacks = [a.strip().lower() for a in cmd.attacks]
    singles = [r for r in results if r["kind"] == "single"]
    by_name = {r["name"]: r for r in results}
    groups = {g: group_means([r for r in singles if r["group"] == g], eps, attacks) for g in GROUPS}
    groups["nas"] = group_means([r for r in singles if r["group"] in ("random", "published")], eps, attacks)
    keys = ["clean", *attacks, "worst", "hrs"]
    diff = {e: {k: (groups["nas"][e][k] - groups["handcrafted"][e][k]
                    if groups["nas"][e]["count"] and groups["handcrafted"][e]["count"] else None) for k in keys}
            for e in eps}
    ensembles = []
    for r in results:
        if r["kind"] == "single":
            continue
        refs = r["job"]["reference"]
        ref = group_means([by_name[m] for m in refs], eps, attacks)
        best = {e: {k: max(by_name[m]["robust_acc_by_eps"][e][k] for m in refs) for k in attacks} for e in eps}
        gain = {e: {k: r["robust_acc_by_eps"][e][k] - ref[e][k] for k in attacks} for e in eps}
        ensembles.append({**r, "budget": r["job"]["budget"], "reference": refs, "reference_mean": ref,
                          "reference_best": best, "gain_vs_mean": gain,
                          "reference_params": _mean([by_name[m]["params"] for m in refs]),
                          "reference_flops": _mean([by_name[m]["flops"] for m in refs])})
    return {"dataset": cmd.data.dataset, "params_target": parse_count(cmd.params), "layers": cmd.layers,
            "reduction_layers": cmd.reduction_layers,
            "eps": eps, "attacks": attacks, "norm": cmd.train.attack.norm, "n": n, "seed": cmd.seed,
            "train": cmd.train.model_dump(mode="json"), "attack_options": cmd.attack_options,
            "rejected_draws": rejected, "models": singles, "ensembles": ensembles, "groups": groups,
            "nas_minus_handcrafted": diff}
