"""The `robustnas` command line: parse, validate, call. No training logic lives here."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from robustnas.config import TrainCommand, deep_update, load_yaml, validate
from robustnas.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Search, adversarially train and honestly evaluate robust architectures.")
console = Console()
err_console = Console(stderr=True)


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
    from robustnas import data

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
    from robustnas.pipeline import train_run

    base = _run(load_yaml, config) if config else {}
    flags = {"seed": seed, "device": device, "out": out,
             "data": {"dataset": dataset, "data_dir": data_dir, "subset": subset},
             "model": {"arch": arch, "params": params, "width": width, "C": C, "layers": layers},
             "train": {"adv": adv, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                       "attack": {"eps": eps, "steps": steps}}}
    cmd = _run(validate, TrainCommand, deep_update(base, flags))
    m = _run(train_run, cmd, resume=resume, progress=progress)
    rob = ", ".join(f"{k} {v:.4f}" for k, v in m["robust_acc"].items())
    console.print(f"{m['run_dir']}: clean {m['clean_acc']:.4f}, {rob} at eps {m['eps']} "
                  f"(n={m['n']}, params {m['params']})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
