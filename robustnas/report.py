"""Human-readable output of an evaluation: report.md and plots/*.png (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from robustnas.rundir import atomic_write_text, save_figure

ATTACK_TITLES = {"fgsm": "FGSM", "cw": "CW (PGD-20 on the margin)", "autoattack": "AutoAttack (standard)",
                 "aa-rank": "AutoAttack-rank (APGD-CE + APGD-T, 3 targets; not standard AA)",
                 "square": "Square (black-box, 5000 queries)", "transfer": "Transfer (PGD-20 on a surrogate)"}


def _title(name: str) -> str:
    if name in ATTACK_TITLES:
        return ATTACK_TITLES[name]
    if name.startswith("pgd") and name[3:].isdigit():
        return f"PGD-{name[3:]}"
    return name


def _eps_number(text: str) -> float:
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    return float(text)


def plot_robustness_curve(metrics: dict, path: Path) -> Path:
    """PGD-20 accuracy against eps, with AutoAttack and certified accuracy at the evaluated eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = metrics["robustness_curve"]
    pts = sorted((_eps_number(k), v, k) for k, v in curve.items())
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="PGD-20")
    eps = _eps_number(metrics["eps"])
    if "autoattack_acc" in metrics:
        ax.plot([eps], [metrics["autoattack_acc"]], "s", color="tab:red", label="AutoAttack")
    for method, acc in (metrics.get("certified") or {}).items():
        ax.plot([eps], [acc], "^", label=f"certified ({method})")
    ax.axvline(eps, color="gray", lw=0.8, ls=":")
    ax.set_xticks([p[0] for p in pts], [p[2] for p in pts])
    ax.set_xlabel(f"{metrics.get('norm', 'Linf')} epsilon (pixels)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = f"{metrics.get('dataset', '')}, n={metrics.get('n')}"
    if not metrics.get("reliable", True):
        title += "  (UNRELIABLE)"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def render_markdown(metrics: dict, title: str = "Evaluation", plot: str | None = None) -> str:
    """report.md for one evaluation; a failed sanity check puts a banner at the top."""
    m: dict[str, Any] = metrics
    lines = [f"# {title}", ""]
    failed = [k for k, c in (m.get("sanity") or {}).items() if c["status"] == "fail"]
    if failed:
        lines += ["> **WARNING: UNRELIABLE EVALUATION.** Sanity checks failed: " + ", ".join(failed) + ".",
                  "> The robust accuracies below are probably overestimates (e.g. masked gradients); "
                  "do not report them.", ""]
    lines += [f"Dataset **{m.get('dataset', '?')}**, {m.get('norm', 'Linf')} eps **{m['eps']}**, "
              f"first **{m['n']}** test images, seed {m.get('seed', 0)}.", ""]
    iv = m.get("intervals") or {}

    def ci(value) -> str:  # an accuracy's interval column ("-" for a run evaluated before intervals)
        return f"[{value[0]:.4f}, {value[1]:.4f}]" if value else "-"

    level = f"{iv.get('level', 0.95):.0%} interval ({iv.get('method', 'wilson')}, n={m['n']})"
    lines += [f"| measure | value | {level} |", "|---|---|---|",
              f"| clean accuracy | {m['clean_acc']:.4f} | {ci(iv.get('clean_acc'))} |"]
    for k, v in m["robust_acc"].items():
        lines.append(f"| {_title(k)} | {v:.4f} | {ci((iv.get('robust_acc') or {}).get(k))} |")
    if "worst_case_acc" in m:
        lines.append(f"| worst case over these attacks | {m['worst_case_acc']:.4f} | {ci(iv.get('worst_case_acc'))} |")
    for k, v in (m.get("certified") or {}).items():
        lines.append(f"| certified ({k}) | {v:.4f} | {ci((iv.get('certified') or {}).get(k))} |")
    for k, v in (m.get("certified_radius") or {}).items():
        lines.append(f"| mean certified radius ({k}, capped at {m.get('certified_radius_max')}) | {v:.4f} | |")
    lines.append(f"| HRS (clean vs {_title(m['hrs_robust_from'])}) | {m['hrs']:.4f} | |")
    lines.append(f"| parameters | {m['params']:,} | |")
    lines.append(f"| FLOPs per image | {m['flops']:,} | |")
    lines.append(f"| CPU latency per image (batch 1, median) | {m['latency_ms_per_image']:.3f} ms | |")
    lines.append("")
    comps = (m.get("autoattack") or {}).get("components")
    if comps:
        lines += ["AutoAttack, robust accuracy after each component: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in comps.items()), ""]
    lines += ["A robust image is one classified correctly both clean and attacked.", ""]
    lines += ["## Robustness vs epsilon (PGD-20)", "", "| eps | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in m["robustness_curve"].items()]
    lines.append("")
    if plot:
        lines += [f"![robustness vs eps]({plot})", ""]
    lines += ["## Sanity checks", "", "| check | result | detail |", "|---|---|---|"]
    for k, c in (m.get("sanity") or {}).items():
        mark = {"pass": "pass", "fail": "**FAIL**", "skip": "skipped"}[c["status"]]
        lines.append(f"| {k} | {mark} | {c['detail'].replace('|', '/')} |")
    lines.append("")
    if "train" in m:
        t = m["train"]
        lines += ["## Training", "", ", ".join(f"{k}: {v}" for k, v in t.items()), ""]
    return "\n".join(lines)


def write_run_report(run_dir: str | Path, metrics: dict) -> Path:
    """report.md and plots/robustness_vs_eps.png in the run directory."""
    run_dir = Path(run_dir)
    plot_robustness_curve(metrics, run_dir / "plots" / "robustness_vs_eps.png")
    text = render_markdown(metrics, title=f"Evaluation of {run_dir.name}", plot="plots/robustness_vs_eps.png")
    atomic_write_text(run_dir / "report.md", text)
    return run_dir / "report.md"


# ----------------------------------------------------------------------------------------- search runs
def plot_cell(cell: list, concat: list, path: Path, title: str) -> Path:
    """A DARTS cell as a picture: inputs c_{k-2}, c_{k-1}, nodes 0..n-1, output c_{k}, edges labelled by op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = len(cell) // 2
    pos = {0: (0.0, 1.0), 1: (0.0, -1.0)}
    for i in range(steps):
        pos[i + 2] = (1.5 + 1.4 * i, 1.6 - 3.2 * i / max(steps - 1, 1))
    pos["out"] = (1.5 + 1.4 * steps, 0.0)
    names = {0: "c_{k-2}", 1: "c_{k-1}", "out": "c_{k}", **{i + 2: str(i) for i in range(steps)}}
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * steps, 3.6))
    for node, (op, src) in enumerate(cell):
        dst = node // 2 + 2
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", color="0.3", shrinkA=14, shrinkB=14))
        ax.text(x0 + 0.4 * (x1 - x0), y0 + 0.4 * (y1 - y0), op, fontsize=7, ha="center", va="center",
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    for n in concat:
        (x0, y0), (x1, y1) = pos[n], pos["out"]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", color="0.75", shrinkA=14, shrinkB=14))
    for key, (x, y) in pos.items():
        color = "#cfe3f7" if key in (0, 1) else ("#f7d9c4" if key == "out" else "#e3f2d5")
        ax.text(x, y, names[key], ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="circle,pad=0.3" if key not in (0, 1, "out") else "round,pad=0.3",
                          fc=color, ec="0.4"))
    ax.set_xlim(-0.6, pos["out"][0] + 0.6)
    ax.set_ylim(-2.0, 2.0)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_alphas(history: list[dict], path: Path, primitives: Optional[list[str]] = None) -> Optional[Path]:
    """softmax(alpha) per op over epochs, averaged over the edges of each alpha set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [h for h in history if isinstance(h.get("alphas"), dict)]
    if not rows:
        return None
    kinds = list(rows[0]["alphas"])
    ops = primitives
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        series = np.array([np.asarray(h["alphas"][kind], dtype=float).mean(0) for h in rows])
        epochs = [h.get("epoch", i) for i, h in enumerate(rows)]
        for j in range(series.shape[1]):
            label = ops[j] if ops and j < len(ops) else f"op{j}"
            ax.plot(epochs, series[:, j], label=label)
        ax.set_title(f"{kind} cells")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean softmax(alpha)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_gamma(history: list[dict], path: Path) -> Optional[Path]:
    """ARNAS' MGDA weight gamma at every alpha step (`gamma_steps` of each epoch), epochs marked."""
    rows = [h for h in history if h.get("gamma_steps")]
    if not rows:
        return None
    plt, fig, (ax,) = _figure(width=6.0)
    start = 0
    for h in rows:
        steps = range(start, start + len(h["gamma_steps"]))
        ax.plot(steps, h["gamma_steps"], ".", ms=3, color="tab:blue")
        ax.axvline(start - 0.5, color="gray", lw=0.6, ls=":")
        start += len(h["gamma_steps"])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("alpha step (dotted lines: epochs)")
    ax.set_ylabel("gamma")
    ax.set_title("gamma: weight of the natural gradient (0: adversarial only)", fontsize=9)
    return _save(plt, fig, path)


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_series(x: list, series: dict[str, list[float]], path: Path, title: str, xlabel: str,
                ylabel: str) -> Path:
    """One line per named series over a shared x (e.g. contributions per op type over epochs)."""
    plt, fig, (ax,) = _figure(width=6.0)
    for name, ys in series.items():
        ax.plot(x[:len(ys)], ys, marker="o", ms=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(plt, fig, path)


def plot_heatmaps(panels: list[tuple[str, list[list[float]], list[str], list[str]]], path: Path) -> Path:
    """Side-by-side annotated heatmaps, each (title, matrix rows x cols, row labels, column labels)."""
    import numpy as np

    plt, fig, axes = _figure(len(panels), width=5.2, height=0.32 * max(len(p[2]) for p in panels) + 1.8)
    for ax, (title, matrix, rows, cols) in zip(axes, panels):
        m = np.asarray(matrix, dtype=float)
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                    color="black" if v > 0.6 * m.max() else "white")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(plt, fig, path)


def plot_fronts(fronts: list[list[dict]], path: Path, x: str = "clean_err", y: str = "pgd_err",
                size: str = "params") -> Path:
    """Pareto fronts per generation (colour: generation; marker area: `size`), objectives x vs y."""
    import numpy as np

    plt, fig, (ax,) = _figure(width=6.0, height=4.2)
    cmap = plt.get_cmap("viridis")
    biggest = max((s[size] for f in fronts for s in f), default=1)
    for g, front in enumerate(fronts):
        if not front:
            continue
        pts = np.array([[s[x], s[y], s[size]] for s in front], dtype=float)
        ax.scatter(pts[:, 0], pts[:, 1], s=10 + 120 * pts[:, 2] / biggest,
                   color=cmap(g / max(len(fronts) - 1, 1)), alpha=0.7, label=f"gen {g}")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"front per generation (marker area: {size})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(plt, fig, path)


def decision_section(decision: dict) -> list[str]:
    """'Did the search decide anything?': the alphas' distance from uniform and the supernet (or scorer)
    accuracy against chance, from analysis.search_decision."""
    from robustnas.analysis import CHANCE_MARGIN, NEAR_UNIFORM

    lines = ["## Did the search decide anything?", ""]
    if not decision:
        return lines + ["Not summarised: this method reports no alphas or scorer accuracy.", ""]
    a, c = decision.get("alphas"), decision.get("accuracy")
    if a:
        lines.append(f"- alphas: softmax(alpha) at most {a['max_dev']:.4f} from uniform (mean {a['mean_dev']:.4f}) "
                     f"over {a['edges']} edges; mean top-1 minus top-2 weight {a['mean_margin']:.4f}; entropy "
                     f"{a['entropy_ratio']:.3f} of uniform's; near uniform below {NEAR_UNIFORM}: "
                     f"**{'yes' if a['near_uniform'] else 'no'}**")
    if c:
        lines.append(f"- {c['of']}: validation clean accuracy {c['acc']:.3f} (95% CI {c['low']:.3f}-{c['high']:.3f}, "
                     f"n = {c['n']}) vs chance {c['chance']:.3f}; near chance (CI reaches chance + {CHANCE_MARGIN}): "
                     f"**{'yes' if c['near_chance'] else 'no'}**")
    lines.append("- verdict: " + ("it decided something." if decision.get("decided") else
                                  "**it decided nothing; the searched architecture is effectively random.**"))
    return lines + [""]


def write_search_run_report(out: str | Path, cmd, result, searched: dict, baseline: Optional[dict],
                            strategy=None, meta=None) -> Path:
    """report.md of `robustnas run`: searched vs hand-crafted, the cells, alphas over epochs, op table, and
    the method's own sections (Strategy.report_sections)."""
    from robustnas.analysis import op_by_position
    from robustnas.spaces.darts import CELL_KINDS, Genotype

    out = Path(out)
    g = result.genotype
    lines = [f"# {cmd.name}: {cmd.method} search on {searched.get('dataset')}", ""]
    if not searched.get("reliable", True) or (baseline and not baseline.get("reliable", True)):
        lines += ["> **WARNING: a sanity check failed; the robustness numbers below are UNRELIABLE.**", ""]
    decision = getattr(result, "decision", None) or {}
    for w in decision.get("warnings", []):
        lines += [f"> **WARNING: the search decided nothing: {w}.**", ""]
    lines += [f"eps {searched.get('eps')} ({searched.get('norm', 'Linf')}), n = {searched.get('n')} test images, "
              f"search {searched.get('search_seconds', 0):.0f} s.", ""]
    lines += decision_section(decision)
    rows = [("searched (" + cmd.method + ")", searched)] + ([(f"hand-crafted ({cmd.baseline.arch})", baseline)]
                                                           if baseline else [])
    lines += ["| model | clean | PGD-20 | AutoAttack | certified | HRS | params | FLOPs |",
              "|---|---|---|---|---|---|---|---|"]
    for label, m in rows:
        ra = m.get("robust_acc", {})
        cert = m.get("certified", {})
        cert_text = ", ".join(f"{k} {v['acc'] if isinstance(v, dict) else v:.3f}" for k, v in cert.items()) or "-"
        aa = m.get("autoattack_acc")
        lines.append(f"| {label} | {m.get('clean_acc', 0):.3f} | {ra.get('pgd20', float('nan')):.3f} | "
                     f"{'-' if aa is None else f'{aa:.3f}'} | {cert_text} | {m.get('hrs', float('nan')):.3f} | "
                     f"{m.get('params')} | {m.get('flops')} |")
    lines.append("")
    if isinstance(g, Genotype):
        lines += ["## Searched cells", ""]
        for kind in CELL_KINDS[g.space]:
            cell, concat = g.cell(kind)
            p = plot_cell(cell, concat, out / "plots" / f"cell_{kind}.png", f"{kind} cell")
            lines += [f"![{kind} cell](plots/{p.name})", ""]
        table = op_by_position(g)
        kinds = list(table)
        ops = sorted({op for k in kinds for op in table[k]})
        lines += ["## Operations by cell position", "",
                  "| op | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        lines += [f"| {op} | " + " | ".join(str(table[k].get(op, 0)) for k in kinds) + " |" for op in ops]
        lines.append("")
    primitives = None
    if isinstance(g, Genotype):
        from robustnas.spaces import get_space

        primitives = list(get_space(g.space).primitives)
    p = plot_alphas(result.history, out / "plots" / "alphas.png", primitives)
    if p:
        lines += ["## Architecture weights over the search", "", f"![alphas](plots/{p.name})", ""]
    if strategy is not None and hasattr(strategy, "report_sections"):
        lines += strategy.report_sections(result, out, meta)
    lines += ["## Evaluation of the searched network", "",
              render_markdown(searched, title="details", plot="plots/robustness_vs_eps.png").split("\n", 1)[1]]
    if baseline:
        lines += ["", "The baseline's own report: [baseline/report.md](baseline/report.md)."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
