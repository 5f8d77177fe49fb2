"""The `robustnas` command line: parse, validate, call. No training logic lives here."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from robustnas.core.config import RunCommand, SearchCommand, TrainCommand, deep_update, load_yaml, validate
from robustnas.core.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Search, adversarially train and honestly evaluate robust architectures.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _threads(
    threads: Optional[int] = typer.Option(
        None, "--threads", envvar="ROBUSTNAS_THREADS", min=1,
        help="torch intra-op threads (default: torch's, one per physical core); fewer on a busy machine"),
) -> None:
    """Search, adversarially train and honestly evaluate robust architectures."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _say_threads(progress: bool) -> None:
    """A command that trains or attacks says, with its progress display, how many threads it runs on (a run
    beside other work on a small machine may be faster with fewer: README, "On a busy machine")."""
    if progress:
        import torch

        err_console.print(f"threads: {torch.get_num_threads()} (OMP_WAIT_POLICY="
                          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; --threads N or ROBUSTNAS_THREADS=N to "
                          f"change)", highlight=False)


def _run(fn, *args, **kw):
    """Call into the library; bad input becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kw)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


@app.command()
def datasets(download: Optional[str] = typer.Option(None, help="download this dataset (needs internet)")) -> None:
    """Where each dataset was found, its size, and how to get a missing one."""
    from robustnas.data import datasets as data

    if download:
        path = _run(data.download, download)
        console.print(f"downloaded {download} to {path}")
    table = Table("dataset", "found", "where / how to get it", "train", "test")
    for row in _run(data.dataset_status):
        table.add_row(row["name"], "yes" if row["found"] else "no",
                      str(row["where"]) if row["found"] else row.get("how", ""),
                      str(row.get("train", "")), str(row.get("test", "")))
    console.print(table)


@app.command()
def train(
    arch: Optional[str] = typer.Option(None, help="hand-crafted model, published genotype name, or genotype JSON"),
    params: Optional[str] = typer.Option(None, help="parameter budget that picks the width, e.g. 100k"),
    width: Optional[float] = typer.Option(None, help="width multiplier (hand-crafted models)"),
    C: Optional[int] = typer.Option(None, "--C", help="initial channels (genotype networks)"),
    layers: Optional[int] = typer.Option(None, help="number of cells (genotype networks)"),
    dataset: Optional[str] = typer.Option(None, help="digits, fashion-mnist, mnist, cifar10, cifar100, svhn"),
    data_dir: Optional[str] = typer.Option(None, help="directory holding the dataset files"),
    subset: Optional[int] = typer.Option(None, help="train on this many images (quick runs)"),
    adv: Optional[str] = typer.Option(None, help="none | pgd | trades | fgsm-rs"),
    eps: Optional[str] = typer.Option(None, help='attack radius in pixels, e.g. 0.1 or "8/255"'),
    steps: Optional[int] = typer.Option(None, help="PGD steps during training"),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    out: Optional[str] = typer.Option(None, help="run directory (default runs/<arch>-<dataset>-<adv>-s<seed>)"),
    resume: bool = typer.Option(False, help="continue the run in --out from its last finished epoch"),
    config: Optional[str] = typer.Option(None, help="YAML file with these settings; flags override it"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Train one architecture (standard or adversarial) and write a run directory."""
    from robustnas.app.pipeline import train_run

    base = _run(load_yaml, config) if config else {}
    flags = {"seed": seed, "device": device, "out": out,
             "data": {"dataset": dataset, "data_dir": data_dir, "subset": subset},
             "model": {"arch": arch, "params": params, "width": width, "C": C, "layers": layers},
             "train": {"adv": adv, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                       "attack": {"eps": eps, "steps": steps}}}
    cmd = _run(validate, TrainCommand, deep_update(base, flags))
    _say_threads(progress)
    m = _run(train_run, cmd, resume=resume, progress=progress)
    rob = ", ".join(f"{k} {v:.4f}" for k, v in m["robust_acc"].items())
    console.print(f"{m['run_dir']}: clean {m['clean_acc']:.4f}, {rob} at eps {m['eps']} "
                  f"(n={m['n']}, params {m['params']})")


# where candidates are evaluated (TAM-NAS, random search, the study): robustnas/executor.py
WORKERS = typer.Option(None, help="evaluate candidates on N local worker processes (with --ray: N Ray tasks "
                                  "at once)")
RAY = typer.Option(False, "--ray", help="evaluate candidates as Ray tasks (pip install robustnas[ray])")
RAY_ADDRESS = typer.Option(None, help="a Ray cluster to use, e.g. auto or ray://host:10001 (implies --ray)")


def _csv(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


@app.command()
def evaluate(
    run_dir: str = typer.Argument(..., help="a run directory written by train or run"),
    attacks: str = typer.Option("fgsm,pgd20,autoattack",
                                help="comma list: fgsm, pgd20, pgd100, pgdK, cw, autoattack (standard), aa-rank (cheaper, for ranking only), square, transfer"),
    eps: Optional[str] = typer.Option(None, help="attack radius (default: the run's)"),
    n: int = typer.Option(1000, help="number of test images"),
    batch_size: int = typer.Option(256),
    certify: str = typer.Option("", help="comma list of bound methods: ibp, crown-ibp, crown-fwd (CROWN over forward linear intermediate bounds), crown-zono (CROWN over zonotope intermediate bounds), crown (CROWN intermediate bounds; slow)"),
    transfer_from: Optional[str] = typer.Option(None, help="run directory of a surrogate model"),
    device: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    progress: bool = typer.Option(True),
    interval: str = typer.Option("wilson", help="95% interval of each accuracy: wilson | exact (Clopper-Pearson)"),
    fold_bn: bool = typer.Option(True, "--fold-bn/--no-fold-bn",
                                 help="attack a copy with BatchNorm folded into the convs (same function, faster)"),
) -> None:
    """Attack and certify a trained model; write metrics.json, per_image.csv, report.md and plots into its run
    directory."""
    from robustnas.evaluation.evaluate import evaluate_run

    _say_threads(progress)
    m = _run(evaluate_run, run_dir, attacks=_csv(attacks), eps=eps, n=n, batch_size=batch_size,
             certify=_csv(certify) or (), transfer_from=transfer_from, device=device, seed=seed, progress=progress,
             interval=interval, fold_bn=fold_bn)
    _print_metrics(run_dir, m)


def _print_metrics(title: str, m: dict) -> None:
    table = Table("metric", "value", title=f"{title} (eps {m.get('eps')}, n={m.get('n')})")
    table.add_row("clean", f"{m['clean_acc']:.4f}")
    for k, v in (m.get("robust_acc") or {}).items():
        table.add_row(k, f"{v:.4f}")
    for k, v in (m.get("certified") or {}).items():
        table.add_row(f"certified ({k})", f"{v['acc'] if isinstance(v, dict) else v:.4f}")
    if m.get("hrs") is not None:
        table.add_row("HRS", f"{m['hrs']:.4f}")
    table.add_row("params", str(m.get("params")))
    console.print(table)
    if not m.get("reliable", True):
        failed = [k for k, c in (m.get("sanity") or {}).items() if c.get("status") == "fail"]
        err_console.print(f"[bold red]UNRELIABLE: sanity checks failed: {', '.join(failed)}[/]")


@app.command()
def search(
    method: Optional[str] = typer.Option(None, help="darts | arnas | dsrna | advrush | lrnas | tamnas | ..."),
    dataset: Optional[str] = typer.Option(None),
    data_dir: Optional[str] = typer.Option(None),
    subset: Optional[int] = typer.Option(None),
    eps: Optional[str] = typer.Option(None),
    epochs: Optional[int] = typer.Option(None, help="search epochs (the method's own setting)"),
    max_params: Optional[str] = typer.Option(None, help="lrnas, tamnas: parameter ceiling of the final network, "
                                                        "e.g. 100k or 2M"),
    metric: Optional[str] = typer.Option(None, help="dsrna: jacobian | cb | combined"),
    workers: Optional[int] = WORKERS,
    ray: bool = RAY,
    ray_address: Optional[str] = RAY_ADDRESS,
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    out: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False),
    config: Optional[str] = typer.Option(None, help="YAML with these settings; the method's own under `search:`"),
    progress: bool = typer.Option(True),
) -> None:
    """Search an architecture; write search.jsonl and genotype.json."""
    from robustnas.core.executor import executor_flags
    from robustnas.app.pipeline import search_run

    base = _run(load_yaml, config) if config else {}
    base = {k: v for k, v in base.items() if k in SearchCommand.model_fields}
    flags = {"method": method, "seed": seed, "device": device, "out": out,
             "search": {"epochs": epochs, "max_params": max_params, "metric": metric,
                        **executor_flags(workers, ray, ray_address)},
             "data": {"dataset": dataset, "data_dir": data_dir, "subset": subset}, "attack": {"eps": eps}}
    cmd = _run(validate, SearchCommand, deep_update(base, flags))
    _say_threads(progress)
    result, out_dir = _run(search_run, cmd, resume=resume, progress=progress)
    over = f" over {result.sessions} sessions" if result.sessions > 1 else ""
    console.print(f"{out_dir}/genotype.json written ({result.seconds:.0f} s of search{over})")
    _warn_undecided(result.decision)


def _warn_undecided(decision: Optional[dict]) -> None:
    """A yellow line per reason the search decided nothing (analysis.search_decision), and per term of the
    method's objective that steered nothing ("inert", e.g. DSRNA's certified bound)."""
    for w in (decision or {}).get("warnings", []):
        err_console.print(f"[bold yellow]WARNING: the search decided nothing: {w}[/]")
    for w in (decision or {}).get("inert", []):
        err_console.print(f"[bold yellow]WARNING: {w}[/]")


@app.command()
def run(
    config: str = typer.Option(..., help="YAML: data, method, search, final, train, evaluate, baseline"),
    out: Optional[str] = typer.Option(None),
    max_params: Optional[str] = typer.Option(None, help="lrnas, tamnas: parameter ceiling of the final network"),
    workers: Optional[int] = WORKERS,
    ray: bool = RAY,
    ray_address: Optional[str] = RAY_ADDRESS,
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False),
    progress: bool = typer.Option(True),
) -> None:
    """The main job: search -> train the derived network -> evaluate -> report, beside a hand-crafted baseline."""
    from robustnas.core.executor import executor_flags
    from robustnas.app.pipeline import run_pipeline

    base = _run(load_yaml, config)
    search = {"max_params": max_params, **executor_flags(workers, ray, ray_address)}
    cmd = _run(validate, RunCommand, deep_update(base, {"out": out, "seed": seed, "device": device,
                                                        "search": search}))
    _say_threads(progress)
    m = _run(run_pipeline, cmd, resume=resume, progress=progress)
    _print_metrics(f"{m['run_dir']} (searched)", m)
    _warn_undecided(m.get("search_decision"))
    if m.get("baseline"):
        _print_metrics(f"{m['run_dir']}/baseline", m["baseline"])
    console.print(f"report: {m['run_dir']}/report.md")


@app.command()
def study(
    config: Optional[str] = typer.Option(None, help="YAML with the study's settings (see configs/study.yaml)"),
    dataset: Optional[str] = typer.Option(None),
    params: Optional[str] = typer.Option(None, help="parameter budget of every architecture, e.g. 25k"),
    random: Optional[int] = typer.Option(None, help="random genotypes drawn from the DARTS space"),
    epochs: Optional[int] = typer.Option(None),
    n: Optional[int] = typer.Option(None, help="test images attacked"),
    workers: Optional[int] = WORKERS,
    ray: bool = RAY,
    ray_address: Optional[str] = RAY_ADDRESS,
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    out: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False, help="redo only the jobs of --out that did not finish"),
    progress: bool = typer.Option(True),
) -> None:
    """Architecture study without adversarial training: random, published and hand-crafted nets and ensembles."""
    from robustnas.core.executor import executor_flags
    from robustnas.app.study import StudyCommand, run_study
    from robustnas.results.study_report import summary_table

    base = _run(load_yaml, config) if config else {}
    flags = {"params": params, "random": random, "n": n, "seed": seed, "device": device, "out": out,
             "data": {"dataset": dataset}, "train": {"epochs": epochs}, **executor_flags(workers, ray, ray_address)}
    cmd = _run(validate, StudyCommand, deep_update(base, flags))
    _say_threads(progress)
    s = _run(run_study, cmd, resume=resume, progress=progress)
    console.print(summary_table(s))
    console.print(f"report: {s['run_dir']}/report.md")


@app.command()
def compare(
    run_dirs: list[str] = typer.Argument(..., help="run directories with metrics.json"),
    out: str = typer.Option("runs/compare", help="where report.md, compare.json and plots/ go"),
    labels: Optional[str] = typer.Option(None, help="comma list, one label per run directory; runs with the "
                                                    "same label are seeds of one member"),
) -> None:
    """One table and Pareto plot over finished runs, ranked by AutoAttack accuracy, and paired tests on the
    test images they share."""
    from robustnas.results.compare import compare_runs

    names = _csv(labels) if labels else None
    if names is not None and len(names) != len(run_dirs):
        err_console.print(f"[bold red]error:[/] --labels gives {len(names)} labels for {len(run_dirs)} run "
                          f"directories", highlight=False)
        raise typer.Exit(2)
    result = _run(compare_runs, run_dirs, out, names)
    _print_comparison(result)


@app.command()
def benchmark(
    config: str = typer.Option(..., help="YAML: data, budget, methods (each with its search settings), "
                                         "baselines, train, evaluate"),
    out: Optional[str] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    resume: bool = typer.Option(False, help="continue: finished members are not redone"),
    progress: bool = typer.Option(True),
    plan: bool = typer.Option(False, "--plan", help="only estimate each member's wall time (short timed "
                                                    "calibrations) and the smallest detectable difference"),
    discordance: float = typer.Option(0.2, min=0.0, max=1.0, help="--plan: assumed share of test images on "
                                                                 "which two members disagree"),
    seed_sd: Optional[float] = typer.Option(None, min=0.0, help="--plan: assumed spread (sd) of one member's "
                                                                "accuracy across seeds (required with several "
                                                                "seeds, unless --seed-sd-from)"),
    seed_sd_from: Optional[str] = typer.Option(None, help="--plan: read the seed sd from a previous run's "
                                                          "compare.json (or its directory)"),
) -> None:
    """Every search method and hand-crafted baseline on the same data, budget, recipe and attacks."""
    from robustnas.app.pipeline import BenchmarkCommand
    from robustnas.app.pipeline import benchmark_plan, benchmark_run, power_plan, seed_sd_from as read_sd

    base = _run(load_yaml, config)
    cmd = _run(validate, BenchmarkCommand, deep_update(base, {"out": out, "seed": seed, "device": device}))
    if plan:
        measured = _run(read_sd, seed_sd_from) if seed_sd_from else None
        if measured:
            console.print(f"seed sd {measured['seed_sd']:.4f}: root mean square over {measured['members']} "
                          f"members with several seeds in {measured['source']}")
        _print_power(_run(power_plan, cmd, discordance=discordance,
                          seed_sd=measured["seed_sd"] if measured else seed_sd))
        _print_plan(_run(benchmark_plan, cmd))
        return
    _say_threads(progress)
    _print_comparison(_run(benchmark_run, cmd, resume=resume, progress=progress))


def _print_plan(p: dict) -> None:
    table = Table("member", "params", "search s", "train s", "attack s", "seeds", "total s",
                  title=f"estimated wall time on this machine ({p['device']})")
    for m in p["members"]:
        table.add_row(m["label"], f"{m['params']:,}", *(f"{m[k]:.0f}" for k in ("search_s", "train_s", "attack_s")),
                      str(m["seeds"]), f"{m['total_s']:.0f}")
    console.print(table)
    console.print(f"total: {p['total_s'] / 60:.1f} min for {len(p['seeds'])} seed(s) {p['seeds']}"
                  + (f"; about {p['wall_s'] / 60:.1f} min of wall time with {p['workers']} members at once "
                     f"(each on one thread, if the cores are free)" if p["workers"] > 1 else ""))
    timed = ", ".join(f"{m['label']} {m['timed_on']['clean']:.2f}/{m['timed_on']['robust']:.2f}" for m in p["members"])
    console.print(f"attacks timed on each network after a few PGD-AT steps (clean/robust accuracy: {timed}); "
                  f"a more robust final network costs more (AutoAttack attacks only the images still robust)")


def _print_power(p: dict) -> None:
    a = p["assumed"]
    sd = "" if a["seed_sd"] is None else f", seed sd {a['seed_sd']:.4g}"
    if p["seeds"] == 2:
        console.print(f"{p['seeds']} seeds per member: the report makes no seed-level verdict (seed variance is "
                      f"not estimated from two); with {p['seeds_used']} seeds:")
    elif p["seeds"] == 1:
        console.print("one seed per member: a verdict is about the two trained networks, not the methods")
    console.print(f"smallest AutoAttack difference between two members detected with {p['power']:.0%} power "
                  f"({p['test']} at Holm's first step over {p['pairs']} pairs, level {p['alpha']}/{p['pairs']}; "
                  f"assumed discordance {a['discordance']}{sd}): "
                  + ", ".join(f"{d:.3f} at n={n}" for n, d in p["detectable"].items()))


def _print_comparison(result: dict) -> None:
    table = Table("model", "clean", "PGD-20", "AutoAttack", "HRS", "params")
    labels = [e["label"] for e in result["entries"]]
    for e in result["entries"]:
        table.add_row(e["label"] + (f" (seed {e['seed']})" if labels.count(e["label"]) > 1 else ""), *("-" if e[k] is None else f"{e[k]:.3f}" for k in ("clean_acc", "pgd20",
                                                                                       "autoattack_acc", "hrs")),
                      "-" if e["params"] is None else f"{e['params']:,}")
    console.print(table)
    console.print(f"report: {result['report']}")


@app.command()
def archive(
    pareto: bool = typer.Option(False, "--pareto", help="only the Pareto front: most robust for fewest parameters"),
    dataset: Optional[str] = typer.Option(None),
    eps: Optional[str] = typer.Option(None, help='e.g. 0.1 or "8/255"'),
    space: Optional[str] = typer.Option(None, help="search space, e.g. darts, tiny"),
    method: Optional[str] = typer.Option(None, help="the method of the run that evaluated it"),
    metric: str = typer.Option("autoattack_acc", help="robust figure shown and maximised; pgd20 where absent"),
    db: Optional[str] = typer.Option(None, help="archive file (default $ROBUSTNAS_ARCHIVE, else "
                                                "./robustnas-archive.sqlite)"),
) -> None:
    """Every evaluated architecture in the results archive, or the Pareto front of a dataset and eps."""
    from robustnas.results.store import table

    title, headers, rows = _run(table, db, pareto=pareto, metric=metric, dataset=dataset, eps=eps, space=space,
                                method=method)
    out = Table(*headers, title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    for row in rows:
        out.add_row(*row)
    console.print(out)


@app.command()
def predictors(
    table: list[str] = typer.Option(..., "--table", help="ground truth in Tiny-RobustBench format (JSON list); "
                                                       "may repeat"),
    fit_on: list[str] = typer.Option([], "--fit-on", help="table(s) the surrogate is fitted on, never scored; "
                                                         "may repeat"),
    init: bool = typer.Option(False, "--init", help="also the network-at-init predictors (synflow, snip, grad_norm, "
                                                    "jacobian_norm, input_grad_norm; about 4 CPU s per network)"),
    boot: int = typer.Option(1000, help="bootstrap resamples per interval"),
    seed: int = typer.Option(0),
) -> None:
    """Kendall tau and Spearman rho of each robustness predictor against a table's robust and clean accuracy,
    with 95% bootstrap intervals; prints last one `tau <name> <value>` line per predictor (robust accuracy)."""
    from robustnas.evaluation.predictors import run_predictors

    r = _run(run_predictors, table, fit_on, init=init, n_boot=boot, seed=seed)
    out = Table("predictor", "kind", "tau robust", "rho robust", "tau clean", "rho clean", "CPU s / net",
                box=box.SIMPLE_HEAD,
                title=f"{r['n']} networks, 95% bootstrap intervals ({boot} resamples)")
    for e in r["results"] + [r["reference"]]:
        out.add_row(e["name"], e["kind"], *(str(e[k]) if k in e else "-"
                                            for k in ("tau_robust", "rho_robust", "tau_clean", "rho_clean")),
                    "-" if e.get("seconds") is None else f"{e['seconds']:.3g}")
    console.print(out)
    for note in r["notes"]:
        console.print(note)
    for e in r["results"]:
        print(f"tau {e['name']} {e['tau_robust'].value:.3f}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
