"""The report of a search run (`robustnas run`): the evaluation's report.md (evaluation/report.py) with the
search's cells, alphas, its "did it decide anything?" section and the method's own sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from robustnas.core import stats
from robustnas.core.rundir import atomic_write_text, save_figure
from robustnas.evaluation.report import render_markdown


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


def decision_section(decision: dict) -> list[str]:
    """'Did the search decide anything?': the alphas' distance from uniform and the supernet (or scorer)
    accuracy against chance, from analysis.search_decision."""
    from robustnas.evaluation.analysis import CHANCE_MARGIN, NEAR_UNIFORM

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
    lines += [f"- inert: {w}" for w in decision.get("inert", [])]
    lines.append("- verdict: " + ("it decided something." if decision.get("decided") else
                                  "**it decided nothing; the searched architecture is effectively random.**"))
    return lines + [""]


def _with_interval(m: dict, key: str, value: Optional[float]) -> str:
    """An accuracy with its 95% interval from metrics["intervals"] ("-" when absent)."""
    if value is None or value != value:
        return "-"
    iv = m.get("intervals", {})
    iv = iv.get("robust_acc", {}).get(key) if key not in ("clean_acc", "autoattack_acc") else iv.get(key)
    return f"{value:.3f} [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else f"{value:.3f}"


def paired_section(out: Path, searched: dict, baseline: dict, level: float = 0.95) -> list[str]:
    """The searched network against the baseline on the test images both were evaluated on (their
    per_image.csv): McNemar's exact test on the ranking metric (AutoAttack where both have it) and the interval
    that is its dual, so the interval excludes 0 exactly when the verdict says they differ. One seed each: the
    verdict is about these two trained networks, not about the method against the architecture."""
    from robustnas.evaluation.evaluate import read_per_image
    from robustnas.results.compare import _common_metric

    a, b = read_per_image(out), read_per_image(out / "baseline")
    if a is None or b is None:
        return ["No paired comparison: a per_image.csv is missing.", ""]
    metric = _common_metric([a, b])
    if metric is None:
        return ["No paired comparison: the two were not evaluated with a common attack.", ""]
    col = {int(i): bool(c) for i, c in zip(a["index"], a[metric])}
    shared = [(col[int(i)], bool(c)) for i, c in zip(b["index"], b[metric]) if int(i) in col]
    if not shared:
        return ["No paired comparison: no test image is shared.", ""]
    sa, sb = np.array([[x for x, _ in shared]]), np.array([[y for _, y in shared]])
    r = stats.compare_members(sa, sb)
    lo, hi = stats.pair_interval(r, level)
    differ = r["p"] < 1 - level
    verdict = ("the searched network is more robust" if r["diff"] > 0 else "the baseline is more robust") \
        if differ else "they cannot be told apart"
    return ["## Searched against hand-crafted, paired", "",
            f"{metric} on the {r['n']} test images both were attacked on: difference (searched - baseline) "
            f"{r['diff']:+.3f}, {level:.0%} interval [{lo:+.3f}, {hi:+.3f}]; broken only for the baseline "
            f"{r['a_only']}, only for the searched network {r['b_only']}; McNemar exact p = {r['p']:.3g}: "
            f"**{verdict}**. One seed each: this compares these two trained networks on these images, not the "
            f"search method against the architecture (that needs 3 or more seeds each: `robustnas benchmark`).", ""]


def write_search_run_report(out: str | Path, cmd, result, searched: dict, baseline: Optional[dict],
                            strategy=None, meta=None) -> Path:
    """report.md of `robustnas run`: searched vs hand-crafted, the cells, alphas over epochs, op table, and
    the method's own sections (Strategy.report_sections)."""
    from robustnas.evaluation.analysis import op_by_position
    from robustnas.nets.spaces.darts import CELL_KINDS, Genotype

    out = Path(out)
    g = result.genotype
    lines = [f"# {cmd.name}: {cmd.method} search on {searched.get('dataset')}", ""]
    if not searched.get("reliable", True) or (baseline and not baseline.get("reliable", True)):
        lines += ["> **WARNING: a sanity check failed; the robustness numbers below are UNRELIABLE.**", ""]
    decision = getattr(result, "decision", None) or {}
    for w in decision.get("warnings", []):
        lines += [f"> **WARNING: the search decided nothing: {w}.**", ""]
    for w in decision.get("inert", []):
        lines += [f"> **WARNING: {w}.**", ""]
    lines += [f"eps {searched.get('eps')} ({searched.get('norm', 'Linf')}), n = {searched.get('n')} test images, "
              f"search {searched.get('search_seconds', 0):.0f} s.", ""]
    lines += decision_section(decision)
    rows = [("searched (" + cmd.method + ")", searched)] + ([(f"hand-crafted ({cmd.baseline.arch})", baseline)]
                                                           if baseline else [])
    lines += ["Accuracies with their 95% interval [low, high].", "",
              "| model | clean | PGD-20 | AutoAttack | certified | HRS | params | FLOPs |",
              "|---|---|---|---|---|---|---|---|"]
    for label, m in rows:
        ra = m.get("robust_acc", {})
        cert = m.get("certified", {})
        cert_text = ", ".join(f"{k} {v['acc'] if isinstance(v, dict) else v:.3f}" for k, v in cert.items()) or "-"
        lines.append(f"| {label} | {_with_interval(m, 'clean_acc', m.get('clean_acc'))} | "
                     f"{_with_interval(m, 'pgd20', ra.get('pgd20'))} | "
                     f"{_with_interval(m, 'autoattack_acc', m.get('autoattack_acc'))} | {cert_text} | "
                     f"{m.get('hrs', float('nan')):.3f} | {m.get('params')} | {m.get('flops')} |")
    lines.append("")
    if baseline:
        lines += paired_section(out, searched, baseline)
    from robustnas.evaluation.analysis import convergence_line
    from robustnas.results.compare import run_convergence

    lines += ["Training convergence (robust validation accuracy at the last epoch against the middle one):", ""]
    lines += [convergence_line(label, run_convergence(d)) for label, d in
              [("searched", out)] + ([("baseline", out / "baseline")] if baseline else [])] + [""]
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
        from robustnas.nets.spaces import get_space

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
