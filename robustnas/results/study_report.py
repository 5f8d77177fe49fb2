"""The study's report: report.md, table.csv and plots/*.png (matplotlib, Agg) from study.json's content."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from robustnas.core.config import parse_eps
from robustnas.core.rundir import atomic_write_text, save_figure
from robustnas.core.config import format_count

GROUP_TITLES = {"random": "NAS, random DARTS genotypes", "published": "NAS, published genotypes",
                "handcrafted": "hand-crafted", "nas": "NAS (random + published)"}
GROUP_COLORS = {"random": "tab:green", "published": "tab:blue", "handcrafted": "tab:red", "ensemble": "tab:purple",
                "member": "tab:olive"}
BUDGET_TITLES = {
    "unmatched": ("Unmatched: every member at the full budget",
                  "Each ensemble has about k times the parameters (more with the one_by_one layer) and the compute "
                  "of the single network(s) it is compared with (the paper's comparison)."),
    "matched": ("Budget-matched: k members within the budget together",
                "Each member has at most 1/k of the budget (a one_by_one ensemble's members are smaller still, so "
                "that its combining layer fits too); the ensemble is compared with the single network(s) at the "
                "full budget. Compute is not matched exactly: see the FLOPs column."),
}


def _f(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _save(fig, path: Path) -> Path:
    """Write a figure through a temporary file, so no half-written PNG is ever left."""
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_robust_vs_eps(study: dict, path: Path, attack: str) -> Path:
    """Accuracy under `attack` against eps, one line per architecture and ensemble, coloured by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = study["eps"]
    x = [0.0] + [parse_eps(e) for e in eps]
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = "osD^v<>p*h"
    seen: dict[str, int] = {}
    for r in study["models"] + study["ensembles"]:
        y = [r["clean_acc"]] + [r["robust_acc_by_eps"][e][attack] for e in eps]
        k = seen[r["group"]] = seen.get(r["group"], -1) + 1  # members of one group differ by marker
        style = "--" if r["group"] == "ensemble" else "-"
        ax.plot(x, y, style, marker=markers[k % len(markers)], ms=4, color=GROUP_COLORS.get(r["group"], "gray"),
                label=r["name"])
    ax.set_xlabel(f"{study['norm']} epsilon (0 = clean)")
    ax.set_ylabel(f"accuracy under {attack}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"{study['dataset']}, {study['params_target']:,} parameters, n={study['n']}", fontsize=9)
    return _save(fig, path)


def plot_groups(study: dict, path: Path) -> Path:
    """Mean accuracy per group (hand-crafted, published, random) for each attack, one panel per eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    eps, keys = study["eps"], study["attacks"] + ["worst"]
    groups = [g for g in ("handcrafted", "published", "random") if study["groups"][g][eps[0]]["count"]]
    fig, axes = plt.subplots(1, len(eps), figsize=(3.6 * len(eps), 3.4), squeeze=False, sharey=True)
    width = 0.8 / max(len(groups), 1)
    for ax, e in zip(axes[0], eps):
        for i, g in enumerate(groups):
            vals = [study["groups"][g][e][k] for k in keys]
            ax.bar(np.arange(len(keys)) + i * width, vals, width, color=GROUP_COLORS[g], label=g)
        ax.set_xticks(np.arange(len(keys)) + width * (len(groups) - 1) / 2, keys, rotation=30, fontsize=8)
        ax.set_title(f"eps {e}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mean robust accuracy")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)


def plot_ensembles(study: dict, path: Path, attack: str) -> Optional[Path]:
    """Each ensemble against the mean and the best of the full-budget single networks it is compared with;
    one row of panels per budget (unmatched, matched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [[r for r in study["ensembles"] if r["budget"] == form] for form in ("unmatched", "matched")]
    rows = [row for row in rows if row]
    if not rows:
        return None
    eps, cols = study["eps"], max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.8 * cols, 3.2 * len(rows)), squeeze=False, sharey=True)
    for i, row in enumerate(rows):
        for ax in axes[i][len(row):]:
            ax.axis("off")
        for ax, r in zip(axes[i], row):
            xs = np.arange(len(eps))
            ax.bar(xs - 0.27, [r["reference_mean"][e][attack] for e in eps], 0.27, color="0.7",
                   label="compared with, mean")
            ax.bar(xs, [r["reference_best"][e][attack] for e in eps], 0.27, color="0.45", label="compared with, best")
            ax.bar(xs + 0.27, [r["robust_acc_by_eps"][e][attack] for e in eps], 0.27, color=GROUP_COLORS["ensemble"],
                   label="ensemble")
            ax.set_xticks(xs, [f"eps {e}" for e in eps], fontsize=8)
            ax.set_title(f"{r['name']} ({r['params']:,} / {r['reference_params']:,.0f} params)", fontsize=8)
            ax.set_ylim(0, 1)
            ax.grid(axis="y", alpha=0.3)
        axes[i][0].set_ylabel(f"{row[0]['budget']}: accuracy under {attack}", fontsize=8)
    axes[0][len(rows[0]) - 1].legend(fontsize=7)
    return _save(fig, path)


def main_attack(study: dict) -> str:
    """The attack the plots show: PGD-20 when run, else the first gradient attack, else the first."""
    attacks = study["attacks"]
    return next((a for a in ("pgd20", "apgd-ce", "fgsm") if a in attacks), attacks[0])


def table_csv(study: dict) -> str:
    """One row per (architecture or ensemble, eps, attack): long format for any later analysis."""
    lines = ["name,group,kind,params,flops,eps,attack,accuracy"]
    for r in study["models"] + study["ensembles"]:
        head = f"{r['name']},{r['group']},{r['kind']},{r['params']},{r['flops']}"
        lines.append(f"{head},0,clean,{r['clean_acc']:.6f}")
        for e in study["eps"]:
            for a, v in r["robust_acc_by_eps"][e].items():
                lines.append(f"{head},{e},{a},{v:.6f}")
            lines.append(f"{head},{e},worst,{r['worst_acc'][e]:.6f}")
    return "\n".join(lines) + "\n"


def render_markdown(study: dict, plots: dict[str, str]) -> str:
    eps, attacks = study["eps"], study["attacks"]
    t = study["train"]
    cells = f"{study['layers']} cells" + (f", reductions at cells {study['reduction_layers']}"
                                           if study.get("reduction_layers") is not None else "")
    lines = [f"# Architecture study on {study['dataset']}", "",
             f"Every architecture has at most **{study['params_target']:,}** parameters, the largest of its "
             f"kind within that budget (genotype networks: {cells}; see the params column) and was trained "
             f"**without adversarial training** (adv {t['adv']}, "
             f"{t['epochs']} epochs, batch {t['batch_size']}, lr {t['lr']} {t['schedule']}). Attacks "
             f"({', '.join(attacks)}; {study['norm']}) on the first **{study['n']}** test images, seed "
             f"{study['seed']}. A robust image is classified correctly both clean and attacked; *worst* counts "
             f"the images robust to every attack; HRS = 2CR/(C+R) with R the worst case.", ""]
    if study.get("rejected_draws"):
        lines += [f"{study['rejected_draws']} random draws were redrawn because they could not meet the budget.", ""]
    bad = [r["name"] for r in study["models"] + study["ensembles"] if not r.get("in_ball", True)]
    if bad:
        lines += [f"> **WARNING**: adversarial images outside their eps-ball or [0,1] for {', '.join(bad)}.", ""]
    rows = study["models"] + study["ensembles"]
    for e in eps:
        lines += [f"## eps {e}", "",
                  "| model | group | params | FLOPs | clean | " + " | ".join(attacks) + " | worst | HRS |",
                  "|---" * (len(attacks) + 7) + "|"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['group']} | {r['params']:,} | {format_count(r['flops'])} | "
                         f"{_f(r['clean_acc'])} | "
                         + " | ".join(_f(r["robust_acc_by_eps"][e][a]) for a in attacks)
                         + f" | {_f(r['worst_acc'][e])} | {_f(r['hrs'][e])} |")
        lines.append("")
    lines += ["## Hand-crafted vs NAS", "", "Means over the architectures of each group.", "",
              "| eps | group | count | clean | " + " | ".join(attacks) + " | worst | HRS |",
              "|---" * (len(attacks) + 6) + "|"]
    keys = ["clean", *attacks, "worst", "hrs"]
    for e in eps:
        for g in ("handcrafted", "published", "random", "nas"):
            m = study["groups"][g][e]
            if m["count"]:
                lines.append(f"| {e} | {GROUP_TITLES[g]} | {m['count']} | "
                             + " | ".join(_f(m[k]) for k in keys) + " |")
        d = study["nas_minus_handcrafted"][e]
        lines.append(f"| {e} | **NAS - hand-crafted** | | " + " | ".join(_f(d[k], True) for k in keys) + " |")
    lines.append("")
    if study["ensembles"]:
        lines += ["## Ensembles", "",
                  "`logit-*`: random genotypes trained independently, logits averaged. `feature-*` / `onebyone-*`: "
                  "one architecture from several initialisations, trained end to end as one network; their pooled "
                  "final features are averaged (`feature`) or concatenated and mapped back to one member's width "
                  "by a learned 1x1 layer (`onebyone`), and one classifier reads the result. Attacks run white-box "
                  "through the whole ensemble. Each cell: the ensemble's accuracy (its gain over the mean of the "
                  "full-budget single networks it is compared with); study.json also holds the best of them.", ""]
        for form in ("unmatched", "matched"):
            rows = [r for r in study["ensembles"] if r["budget"] == form]
            if rows:
                title, text = BUDGET_TITLES[form]
                lines += [f"### {title}", "", text, ""] + _ensemble_table(rows, eps, attacks)
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    lines += ["Per-architecture weights, training logs and results: `models/<name>/`; the random genotypes: "
              "`genotypes/`; everything above in `study.json` and `table.csv`.", ""]
    return "\n".join(lines)


def _ensemble_table(rows: list[dict], eps: list[str], attacks: list[str]) -> list[str]:
    lines = ["| ensemble | members | compared with | params (theirs) | FLOPs (theirs) | eps | clean | "
             + " | ".join(attacks) + " |", "|---" * (len(attacks) + 7) + "|"]
    for r in rows:
        job = r["job"]
        members = (", ".join(job["members"]) if r["kind"] == "logit"
                   else f"{len(job['inits'])} x {job['base']} (<= {job['params']:,})")
        ref_clean = r["reference_mean"][eps[0]]["clean"]
        for e in eps:
            cells = [f"{_f(r['robust_acc_by_eps'][e][a])} ({_f(r['gain_vs_mean'][e][a], True)})" for a in attacks]
            lines.append(f"| {r['name']} | {members} | {', '.join(r['reference'])} | "
                         f"{r['params']:,} ({r['reference_params']:,.0f}) | "
                         f"{format_count(r['flops'])} ({format_count(int(r['reference_flops']))}) | {e} | "
                         f"{_f(r['clean_acc'])} ({_f(r['clean_acc'] - ref_clean, True)}) | " + " | ".join(cells) + " |")
    return lines + [""]


def write_study_report(out: str | Path, study: dict) -> Path:
    """report.md, table.csv and plots/ in the study directory."""
    out = Path(out)
    attack = main_attack(study)
    plots = {f"accuracy under {attack} vs eps": plot_robust_vs_eps(study, out / "plots" / "robust_vs_eps.png", attack),
             "hand-crafted vs NAS": plot_groups(study, out / "plots" / "groups.png"),
             f"ensembles ({attack})": plot_ensembles(study, out / "plots" / "ensembles.png", attack)}
    rel = {k: f"plots/{p.name}" for k, p in plots.items() if p is not None}
    atomic_write_text(out / "table.csv", table_csv(study))
    atomic_write_text(out / "report.md", render_markdown(study, rel))
    return out / "report.md"


def summary_table(study: dict):
    """A rich table for the terminal: clean and worst-case accuracy per eps, per architecture and ensemble."""
    from rich.table import Table

    table = Table("model", "group", "params", "clean", *[f"worst@{e}" for e in study["eps"]],
                  title=f"study on {study['dataset']} (n={study['n']})")
    for r in study["models"] + study["ensembles"]:
        table.add_row(r["name"], r["group"], f"{r['params']:,}", _f(r["clean_acc"]),
                      *[_f(r["worst_acc"][e]) for e in study["eps"]])
    return table
