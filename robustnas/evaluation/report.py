"""The report of one evaluation: report.md and plots/robustness_curve.png (matplotlib, Agg backend, no display).
A search run's report (results/report.py) starts from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from robustnas.core.rundir import atomic_write_text, save_figure

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
