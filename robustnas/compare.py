"""Side-by-side comparison of finished run directories: one table, the Pareto plot of size against
robustness, and the op-by-position analysis of every DARTS-space genotype among them.

A run directory is what `robustnas train`, `run` or `benchmark` writes (metrics.json from `evaluate`, and
for searched networks config.yaml with the method and genotype.json). Only what the runs measured is
shown: a missing number (e.g. no AutoAttack in that run) is a dash, never a stand-in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from robustnas.analysis import hrs, op_by_position, pareto_front
from robustnas.config import load_yaml
from robustnas.errors import UserError
from robustnas.rundir import atomic_write_text, read_json, write_json


def robust_metric(metrics: dict) -> tuple[Optional[float], str]:
    """The number a run is ranked by: AutoAttack accuracy, else the strongest PGD it ran (labelled).
    The lookup is the archive's (store.metric_value), so both rank alike."""
    from robustnas.store import metric_value

    pgds = sorted((k for k in metrics.get("robust_acc") or {} if k.startswith("pgd") and k[3:].isdigit()),
                  key=lambda k: -int(k[3:]))
    found = metric_value(metrics, "autoattack_acc", pgds)
    return (found[0], found[1].removesuffix("_acc")) if found else (None, "-")


def load_entry(run_dir: str | Path, label: Optional[str] = None) -> dict[str, Any]:
    """One row of a comparison from a run directory's files."""
    run = Path(run_dir)
    if not (run / "metrics.json").is_file():
        raise UserError(f"{run} has no metrics.json: run `robustnas evaluate {run}` (or finish the run) first")
    m = read_json(run / "metrics.json")
    cfg = load_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    method = cfg.get("method") if (run / "genotype.json").is_file() else None
    arch = (cfg.get("model") or {}).get("arch") or (cfg.get("baseline") or {}).get("arch")
    kind = method or arch or "model"
    rob, rob_name = robust_metric(m)
    cert = m.get("certified") or {}
    entry = {
        "label": label or run.name, "run_dir": str(run), "method": method, "kind": kind,
        "dataset": m.get("dataset"), "eps": m.get("eps"), "n": m.get("n"),
        "clean_acc": m.get("clean_acc"), "pgd20": (m.get("robust_acc") or {}).get("pgd20"),
        "autoattack_acc": m.get("autoattack_acc"), "robust": rob, "robust_by": rob_name,
        "certified": {k: (v["acc"] if isinstance(v, dict) else v) for k, v in cert.items()},
        "certified_radius": m.get("certified_radius") or {},
        "hrs": hrs(m["clean_acc"], rob) if rob is not None and m.get("clean_acc") is not None else None,
        "params": m.get("params"), "flops": m.get("flops"), "search_seconds": m.get("search_seconds"),
        "reliable": m.get("reliable", True),
    }
    if method is not None:
        entry["genotype"] = read_json(run / "genotype.json")
    return entry


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def comparison_table(entries: Sequence[dict]) -> list[str]:
    lines = ["| model | clean | PGD-20 | AutoAttack | certified | HRS | params | FLOPs | search s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: -(e["robust"] if e["robust"] is not None else -1)):
        cert = ", ".join(f"{k} {v:.3f}" for k, v in e["certified"].items()) or "-"
        flag = "" if e["reliable"] else " **UNRELIABLE**"
        lines.append(f"| {e['label']}{flag} | {_fmt(e['clean_acc'])} | {_fmt(e['pgd20'])} | "
                     f"{_fmt(e['autoattack_acc'])} | {cert} | {_fmt(e['hrs'])} | {_fmt(e['params'], ',')} | "
                     f"{_fmt(e['flops'], ',')} | {_fmt(e['search_seconds'], '.0f')} |")
    return lines


def plot_pareto(entries: Sequence[dict], path: Path) -> Optional[Path]:
    """Parameters against the ranking robustness metric; the non-dominated runs joined by a line."""
    from robustnas.report import _figure, _save

    pts = [e for e in entries if e["robust"] is not None and e["params"]]
    if not pts:
        return None
    plt, fig, (ax,) = _figure(width=6.0, height=4.2)
    for e in pts:
        marker = "o" if e["method"] else "s"
        ax.scatter(e["params"], e["robust"], marker=marker)
        ax.annotate(e["label"], (e["params"], e["robust"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((pts[i] for i in pareto_front([(e["robust"], e["params"]) for e in pts], (True, False))),
                   key=lambda e: e["params"])
    ax.plot([e["params"] for e in front], [e["robust"] for e in front], "k--", lw=0.8, label="Pareto front")
    by = sorted({e["robust_by"] for e in pts})
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"robust accuracy ({', '.join(by)})")
    ax.set_title("size vs robustness (circles: searched, squares: hand-crafted)")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path, labels: Optional[Sequence[str]] = None,
                 title: str = "Comparison") -> dict[str, Any]:
    """compare.json, report.md and plots/ in `out` for the given run directories."""
    if not run_dirs:
        raise UserError("give at least one run directory to compare")
    labels = list(labels) if labels else [None] * len(run_dirs)
    entries = [load_entry(r, lab) for r, lab in zip(run_dirs, labels)]
    settings = {(e["dataset"], e["eps"]) for e in entries}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if len(settings) > 1:
        lines += [f"> **WARNING: these runs differ in dataset / eps ({sorted(map(str, settings))}); "
                  f"their numbers are not comparable.**", ""]
    if not all(e["reliable"] for e in entries):
        lines += ["> **WARNING: a sanity check failed for a run marked UNRELIABLE below.**", ""]
    ns = sorted({e["n"] for e in entries if e["n"]})
    lines += [f"dataset {', '.join(sorted({str(d) for d, _ in settings}))}, eps {', '.join(sorted({str(e) for _, e in settings}))}, "
              f"test images per run: {', '.join(map(str, ns))}. Ranked by AutoAttack accuracy "
              f"(the strongest PGD where a run has no AutoAttack).", ""]
    lines += comparison_table(entries) + [""]
    p = plot_pareto(entries, out / "plots" / "pareto.png")
    if p:
        lines += [f"![pareto](plots/{p.name})", ""]
    darts = [(e["label"], e["genotype"]) for e in entries if "genotype" in e and e["genotype"].get("space") != "tiny"]
    if darts:
        from robustnas.genotypes import genotype_from_dict

        lines += ["## Operations by cell position (DARTS-space methods)", ""]
        for label, g in darts:
            table = op_by_position(genotype_from_dict(g))
            kinds = list(table)
            ops = sorted({op for k in kinds for op in table[k]})
            lines += [f"**{label}**", "", "| op | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
            lines += [f"| {op} | " + " | ".join(str(table[k].get(op, 0)) for k in kinds) + " |" for op in ops]
            lines.append("")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    result = {"entries": entries, "report": str(out / "report.md")}
    write_json(out / "compare.json", result)
    return result
