"""Generic figure helpers: a figure with panels, its one atomic save, and the plots that several layers draw
(series over epochs, annotated heatmaps, Pareto fronts per generation, ARNAS' gamma per step). Search
strategies draw their own report figures with these; the reports themselves are results/."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from robustnas.core.rundir import save_figure


def plot_gamma(history: list[dict], path: Path) -> Optional[Path]:
    """ARNAS' MGDA weight gamma at every alpha step (`gamma_steps` of each epoch), epochs marked."""
    rows = [h for h in history if h.get("gamma_steps")]
    if not rows:
        return None
    plt, fig, (ax,) = figure(width=6.0)
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
    return save(plt, fig, path)


def figure(ncols: int = 1, width: float = 5.0, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, axes[0]


def save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_series(x: list, series: dict[str, list[float]], path: Path, title: str, xlabel: str,
                ylabel: str) -> Path:
    """One line per named series over a shared x (e.g. contributions per op type over epochs)."""
    plt, fig, (ax,) = figure(width=6.0)
    for name, ys in series.items():
        ax.plot(x[:len(ys)], ys, marker="o", ms=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save(plt, fig, path)


def plot_heatmaps(panels: list[tuple[str, list[list[float]], list[str], list[str]]], path: Path) -> Path:
    """Side-by-side annotated heatmaps, each (title, matrix rows x cols, row labels, column labels)."""
    import numpy as np

    plt, fig, axes = figure(len(panels), width=5.2, height=0.32 * max(len(p[2]) for p in panels) + 1.8)
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
    return save(plt, fig, path)


def plot_fronts(fronts: list[list[dict]], path: Path, x: str = "clean_err", y: str = "pgd_err",
                size: str = "params") -> Path:
    """Pareto fronts per generation (colour: generation; marker area: `size`), objectives x vs y."""
    import numpy as np

    plt, fig, (ax,) = figure(width=6.0, height=4.2)
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
    return save(plt, fig, path)
