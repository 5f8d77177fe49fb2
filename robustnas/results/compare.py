"""Side-by-side comparison of finished run directories: one table, the Pareto plot of size against
robustness, and the op-by-position analysis of every DARTS-space genotype among them.

A run directory is what `robustnas train`, `run` or `benchmark` writes (metrics.json from `evaluate`, and
for searched networks config.yaml with the method and genotype.json). Only what the runs measured is
shown: a missing number (e.g. no AutoAttack in that run) is a dash, never a stand-in.

Runs evaluated on the same test images are compared image by image from their per_image.csv (nothing is
attacked again): run directories given the same label are seeds of one member; members are ranked by the
robust metric on the shared images and every pair gets a paired difference (robustnas.core.stats): McNemar
exact with one seed each (a verdict about the two trained networks), the two-level t test with at least
stats.MIN_SEEDS seeds each (about the methods), no test otherwise (each seed's paired result instead).
Tested pairs are decided by Holm's method (or, after a sequential evaluation, by its group-sequential
Holm), and each pair's interval is at the level its decision used, so that it excludes zero exactly when
the verdict is "differ". The members that cannot be told apart from the best are marked.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from robustnas.core import stats
from robustnas.evaluation.analysis import convergence_line, hrs, op_by_position, pareto_front, training_convergence
from robustnas.core.config import load_yaml
from robustnas.core.errors import UserError
from robustnas.core.rundir import atomic_write_text, read_json, write_json
from robustnas.nets.spaces import get_space


RANKED_BY = ("autoattack", "aa-rank")  # the attacks a comparison ranks by, first found first; then the strongest PGD


def robust_metric(metrics: dict) -> tuple[Optional[float], str]:
    """The number a run is ranked by: standard AutoAttack accuracy, else AutoAttack-rank (aa-rank), else the
    strongest PGD it ran (labelled). The lookup is the archive's (store.metric_value), so both rank alike."""
    from robustnas.results.store import metric_value

    pgds = sorted((k for k in metrics.get("robust_acc") or {} if k.startswith("pgd") and k[3:].isdigit()),
                  key=lambda k: -int(k[3:]))
    found = metric_value(metrics, f"{RANKED_BY[0]}_acc", [*RANKED_BY[1:], *pgds])
    return (found[0], found[1].removesuffix("_acc")) if found else (None, "-")


def run_convergence(run: Path) -> dict:
    """Whether the run's final training had stopped improving (analysis.training_convergence), from its
    train.jsonl; "unknown" without one or for records that did not keep their validation size."""
    path = run / "train.jsonl"
    if not path.is_file():
        return {"status": "unknown", "epochs": 0, "why": "no train.jsonl"}
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    val_n = min((h.get("val_n", 0) for h in history), default=0)
    if not val_n:
        return {"status": "unknown", "epochs": len(history), "why": "train.jsonl predates its validation size"}
    return training_convergence(history, val_n)


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
        "reliable": m.get("reliable", True), "norm": m.get("norm", "Linf"), "seed": cfg.get("seed"),
        "intervals": m.get("intervals"),
        "convergence": run_convergence(run),
    }
    if method is not None:
        entry["genotype"] = read_json(run / "genotype.json")
        if m.get("search_decision"):  # `run` keeps it in metrics.json, `search` in decision.json
            entry["decision"] = m["search_decision"]
        elif (run / "decision.json").is_file():
            entry["decision"] = read_json(run / "decision.json")
    return entry


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _robust_interval(e: dict) -> Optional[list]:
    iv = e.get("intervals") or {}
    if e["robust_by"] == "autoattack":
        return iv.get("autoattack_acc")
    return (iv.get("robust_acc") or {}).get(e["robust_by"])


def comparison_table(entries: Sequence[dict]) -> list[str]:
    lines = ["| model | clean | PGD-20 | robust [95% interval] | by | certified | HRS | params | FLOPs | search s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    seeds = Counter(e["label"] for e in entries)
    for e in sorted(entries, key=lambda e: -(e["robust"] if e["robust"] is not None else -1)):
        cert = ", ".join(f"{k} {v:.3f}" for k, v in e["certified"].items()) or "-"
        flag = "" if e["reliable"] else " **UNRELIABLE**"
        name = f"{e['label']} (seed {e['seed']})" if seeds[e["label"]] > 1 else e["label"]
        rob = _fmt(e["robust"])
        iv = _robust_interval(e)
        if iv and e["robust"] is not None:
            rob += f" [{iv[0]:.3f}, {iv[1]:.3f}]"
        lines.append(f"| {name}{flag} | {_fmt(e['clean_acc'])} | {_fmt(e['pgd20'])} | "
                     f"{rob} | {e['robust_by']} | {cert} | {_fmt(e['hrs'])} | {_fmt(e['params'], ',')} | "
                     f"{_fmt(e['flops'], ',')} | {_fmt(e['search_seconds'], '.0f')} |")
    return lines


def decision_table(entries: Sequence[dict]) -> list[str]:
    """Per searched member: how far its alphas moved from uniform and its supernet's (or scorer's) accuracy
    against chance, as analysis.search_decision summarised it when the search ended."""
    rows = [e for e in entries if e.get("decision")]
    if not rows:
        return []
    seeds = Counter(e["label"] for e in entries)
    lines = ["## Did each search decide anything?", "",
             "| member | alphas: max distance from uniform | scored with | accuracy [95% interval] | chance | decided |",
             "|---|---|---|---|---|---|"]
    for e in rows:
        d = e["decision"]
        name = f"{e['label']} (seed {e['seed']})" if seeds[e["label"]] > 1 else e["label"]
        al = d.get("alphas") or {}
        acc = d.get("accuracy") or {}
        moved = _fmt(al.get("max_dev"), ".4f") + (" (near uniform)" if al.get("near_uniform") else "")
        got = (f"{acc['acc']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] (n={acc['n']})" if acc else "-")
        lines.append(f"| {name} | {moved if al else '-'} | {acc.get('of', '-')} | {got} | "
                     f"{_fmt(acc.get('chance'))} | {'yes' if d.get('decided') else '**no**'} |")
    return lines + [""]


def plot_pareto(entries: Sequence[dict], path: Path) -> Optional[Path]:
    """Parameters against the ranking robustness metric; the non-dominated runs joined by a line."""
    from robustnas.core.plots import figure, save

    pts = [e for e in entries if e["robust"] is not None and e["params"]]
    if not pts:
        return None
    plt, fig, (ax,) = figure(width=6.0, height=4.2)
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
    return save(plt, fig, path)


# ------------------------------------------------------------------------------------------ paired comparison
def _common_metric(tables: Sequence[dict]) -> Optional[str]:
    """The per-image column every table holds to rank by: autoattack (standard), else aa-rank, else the
    strongest common PGD."""
    common = set.intersection(*(set(t) for t in tables)) - {"index", "label", "clean"}
    for name in RANKED_BY:
        if name in common:
            return name
    pgds = sorted((c for c in common if c.startswith("pgd") and c[3:].isdigit()), key=lambda c: -int(c[3:]))
    return pgds[0] if pgds else None


def paired_analysis(entries: Sequence[dict], alpha: float = 0.05,
                    sequential: Optional[Sequence[dict]] = None) -> dict[str, Any]:
    """Members (entries sharing a label are its seeds) compared from their per_image.csv: ranked on the test
    images all of them share, each pair on the images both share. Returns the metric, the shared n, each
    member's summary in rank order, every pair with its verdict (`decide`), the group that cannot be told
    apart from the best, and the unpaired runs with why. `sequential`: the stops of a sequential evaluation
    (pipeline.sequential_evaluation); a pair in it is analysed on the images it had at its last look and
    keeps that look's verdict and level."""
    from robustnas.evaluation.evaluate import read_per_image

    unpaired: list[dict] = []
    tables: list[tuple[dict, dict]] = []
    setting = Counter((e["dataset"], e["eps"], e["norm"]) for e in entries).most_common(1)[0][0]
    for e in entries:
        table = read_per_image(Path(e["run_dir"]))
        if table is None:
            unpaired.append({"label": e["label"], "run_dir": e["run_dir"],
                             "why": "no per_image.csv (evaluated before per-image results were saved); "
                                    "re-run `robustnas evaluate` on it to pair it"})
        elif (e["dataset"], e["eps"], e["norm"]) != setting:
            unpaired.append({"label": e["label"], "run_dir": e["run_dir"],
                             "why": f"evaluated on {e['dataset']} / {e['norm']} eps {e['eps']}, the others on "
                                    f"{setting[0]} / {setting[2]} eps {setting[1]}"})
        else:
            tables.append((e, table))
    metric = _common_metric([t for _, t in tables]) if tables else None
    if metric is None:
        unpaired += [{"label": e["label"], "run_dir": e["run_dir"], "why": "no robust metric shared with the others"}
                     for e, _ in tables]
        tables = []
    label_of: dict[int, int] = {}
    kept = []
    for e, t in tables:
        idx, lab = t["index"].tolist(), t["label"].tolist()
        if any(label_of.setdefault(i, k) != k for i, k in zip(idx, lab)):
            unpaired.append({"label": e["label"], "run_dir": e["run_dir"],
                             "why": "its test images carry other labels (another test split or subset)"})
        else:
            kept.append((e, dict(zip(idx, t[metric].tolist()))))
    shared = sorted(set.intersection(*(set(c) for _, c in kept))) if kept else []
    if not shared:
        unpaired += [{"label": e["label"], "run_dir": e["run_dir"], "why": "no test image shared with the others"}
                     for e, _ in kept]
        return {"metric": metric, "n": 0, "members": [], "pairs": [], "best_group": [], "unpaired": unpaired,
                "alpha": alpha}

    def correct(runs: list[dict], images: list[int]) -> np.ndarray:  # seeds x images
        return np.array([[c[i] for i in images] for c in runs], dtype=bool)

    groups: dict[str, list] = {}
    for e, col in kept:
        groups.setdefault(e["label"], []).append((e, col))
    members = []
    for label, runs in groups.items():
        members.append({"label": label, "handcrafted": runs[0][0]["method"] is None,
                        "run_dirs": [e["run_dir"] for e, _ in runs],
                        "convergence": [e.get("convergence") or {"status": "unknown", "why": "not read"}
                                        for e, _ in runs],
                        **stats.seed_summary(correct([c for _, c in runs], shared))})
    members.sort(key=lambda m: -m["mean"])
    stops = {frozenset((q["a"], q["b"])): q for q in sequential or []}
    pairs = []  # each pair on every image both members were evaluated on (sequential evaluation adds some)
    for i in range(len(members)):
        for j in range(i + 1, len(members)):
            a, b = ([c for _, c in groups[members[k]["label"]]] for k in (i, j))
            images = sorted(set.intersection(*(set(c) for c in a + b)))
            stop = stops.get(frozenset((members[i]["label"], members[j]["label"])))
            if stop is not None:
                images = images[:stop["n"]]
            r = stats.compare_members(correct(a, images), correct(b, images))
            pairs.append({"a": members[i]["label"], "b": members[j]["label"], **r})
    decide(pairs, alpha, stops if sequential is not None else None)
    best = members[0]["label"]
    group = [best] + [pr["b"] for pr in pairs if pr["a"] == best and not pr["differ"]]
    for m in members:
        m["with_best"] = m["label"] in group
    return {"metric": metric, "n": len(shared), "alpha": alpha, "members": members, "pairs": pairs,
            "best_group": group, "unpaired": unpaired}


def decide(pairs: list[dict], alpha: float, stops: Optional[dict] = None) -> None:
    """Each tested pair's verdict ("differ"), the test level that decided it ("level") and its interval at
    1 - level ("low", "high"; it excludes zero exactly when the pair differs), in place. Without `stops`:
    Holm's step-down over the tested pairs (also "p_holm", the adjusted p: differ exactly when < alpha).
    With them: the verdict and level each pair's sequential evaluation reached. A pair without a test gets
    None for all of these."""
    tested = [pr for pr in pairs if pr["p"] is not None]
    for pr in pairs:
        if pr["p"] is None:
            pr.update({"differ": None, "level": None, "low": None, "high": None, "p_holm": None})
    if stops is None:
        rejected, levels = stats.sequential_holm({k: [(1.0, pr["p"])] for k, pr in enumerate(tested)}, alpha)
        for (k, pr), adj in zip(enumerate(tested), stats.holm([pr["p"] for pr in tested])):
            pr.update({"differ": k in rejected, "level": rejected.get(k, levels.get(k)), "p_holm": adj})
    else:
        for pr in tested:
            stop = stops[frozenset((pr["a"], pr["b"]))]
            pr.update({"differ": stop["differ"], "level": stop["level"], "p_holm": None})
    for pr in tested:
        pr["low"], pr["high"] = stats.pair_interval(pr, 1 - pr["level"])


def difference_to(paired: dict, reference: str) -> list[dict]:
    """Each member's difference to `reference` (member minus reference) with its interval, from the pairs."""
    out = []
    for pr in paired["pairs"]:
        if reference not in (pr["a"], pr["b"]) or pr["differ"] is None:
            continue
        sign = 1 if pr["b"] == reference else -1
        other = pr["a"] if sign == 1 else pr["b"]
        lo, hi = (pr["low"], pr["high"]) if sign == 1 else (-pr["high"], -pr["low"])
        out.append({"label": other, "diff": sign * pr["diff"], "low": lo, "high": hi, "p_holm": pr["p_holm"],
                    "level": pr["level"], "differ": pr["differ"], "scope": pr["scope"]})
    return out


def forest_reference(paired: dict) -> Optional[str]:
    """The best hand-crafted member (members are in rank order), else the best member."""
    hand = [m["label"] for m in paired["members"] if m["handcrafted"]]
    return hand[0] if hand else (paired["members"][0]["label"] if paired["members"] else None)


def plot_forest(paired: dict, path: Path) -> Optional[Path]:
    """Each member's difference to the reference member with its interval; zero marked."""
    from robustnas.core.plots import figure, save

    ref = forest_reference(paired)
    rows = difference_to(paired, ref) if ref else []
    if not rows:
        return None
    plt, fig, (ax,) = figure(width=6.0, height=1.2 + 0.35 * len(rows))
    for y, r in enumerate(reversed(rows)):
        ax.errorbar(r["diff"], y, xerr=[[r["diff"] - r["low"]], [r["high"] - r["diff"]]], fmt="o",
                    color="tab:red" if r["differ"] else "k", capsize=3)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), [r["label"] for r in reversed(rows)], fontsize=7)
    ax.set_xlabel(f"{paired['metric']} accuracy minus {ref}'s (interval at its verdict's level, n={paired['n']})")
    what = "the best hand-crafted baseline" if any(m["handcrafted"] for m in paired["members"]) else "the best member"
    ax.set_title(f"difference to {what}, {ref} (red: differs, Holm)", fontsize=8)
    return save(plt, fig, path)


def _verdict(pr: dict) -> str:
    if pr["differ"] is None:
        return "no seed-level test"
    said = "differ" if pr["differ"] else "cannot be told apart"
    return said + (" (these two networks)" if pr["scope"] == "networks" else "")


def paired_report(paired: dict, forest: Optional[Path]) -> list[str]:
    """The paired section of report.md."""
    lines = ["## Paired comparison on the same test images", ""]
    for u in paired["unpaired"]:
        lines.append(f"- unpaired: **{u['label']}** ({u['run_dir']}): {u['why']}")
    if paired["unpaired"]:
        lines.append("")
    if not paired["members"]:
        return lines + ["No two runs share per-image results; nothing is paired.", ""]
    pairs = paired["pairs"]
    tested = [pr for pr in pairs if pr["differ"] is not None]
    lines += [f"{paired['metric']} accuracy on the {paired['n']} test images every paired run was evaluated on. "
              f"A member's interval is 95%: binomial (Wilson, Clopper-Pearson near 0 or n) for one seed, the "
              f"two-level t interval (seeds, and images within each seed) for {stats.MIN_SEEDS} or more, none "
              f"for two. Pairs: McNemar's exact test when both members have one seed, the two-level t test when "
              f"both have {stats.MIN_SEEDS} or more; {len(tested)} of {len(pairs)} pairs tested, decided by "
              f"Holm's method at {paired['alpha']}, each interval at the level its verdict used (*level*), so "
              "it excludes zero exactly when the pair differs.", ""]
    if any(pr["scope"] == "networks" for pr in pairs):
        lines += ["**One seed per member:** a verdict marked *(these two networks)* is about the two trained "
                  "networks evaluated here, not about the methods: their seed-to-seed spread is not measured, "
                  "and other seeds may reverse the order.", ""]
    if len(tested) < len(pairs):
        lines += [f"**Seed variance cannot be estimated** for a member with fewer than {stats.MIN_SEEDS} seeds: "
                  "pairs with such a member (other than one seed against one seed) get no seed-level verdict; "
                  "each seed's paired image-level result is listed below for information (McNemar, unadjusted "
                  "95%, about those two networks).", ""]
    if any(m["seeds"] > 1 for m in paired["members"]):
        lines += ["Several seeds: each seed searched and trained its member anew, so the spread across seeds "
                  "includes the search's own variance.", ""]
    best = paired["members"][0]["label"]
    lines += [f"| rank | member | seeds | {paired['metric']} | sd over seeds | 95% interval | vs {best} |",
              "|---|---|---|---|---|---|---|"]
    by_pair = {frozenset((pr["a"], pr["b"])): pr for pr in pairs}
    vs_best = {r["label"]: r for r in difference_to(paired, best)}
    for rank, m in enumerate(paired["members"], 1):
        r = vs_best.get(m["label"])
        if m["label"] == best:
            cmp_ = "best"
        elif r is None:
            pr = by_pair[frozenset((best, m["label"]))]
            cmp_ = f"{-pr['diff']:+.3f} (no seed-level test)"
        else:
            p = f"Holm p={r['p_holm']:.3g}" if r["p_holm"] is not None else f"level {r['level']:.3g}"
            cmp_ = (f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] ({p})"
                    f"{'' if r['differ'] else ', cannot be told apart'}"
                    f"{' (these two networks)' if r['scope'] == 'networks' else ''}")
        sd = "-" if m["sd"] is None else f"{m['sd']:.3f}"
        iv = "-" if m["low"] is None else f"[{m['low']:.3f}, {m['high']:.3f}]"
        mark = " *" if m["with_best"] else ""
        lines.append(f"| {rank} | {m['label']}{mark} | {m['seeds']} | {m['mean']:.3f} | {sd} | {iv} | {cmp_} |")
    group = paired["best_group"]
    conv = [(f"{m['label']}{f' (seed {k + 1})' if len(m['convergence']) > 1 else ''}", c)
            for m in paired["members"] for k, c in enumerate(m["convergence"])]
    still = [lab for lab, c in conv if c["status"] == "still improving"]
    lines += ["", "**Training convergence** (each member's final training: robust validation accuracy at the last "
              "epoch against the middle one): " + (f"{len(still)} of {len(conv)} still improving: a ranking may "
              "measure how fast each learns rather than how robust it ends up." if still else
              f"none of {len(conv)} shown to be still improving."), ""]
    lines += [convergence_line(lab, c) for lab, c in conv]
    lines += ["", f"\\* not shown to differ from the best ({best}): {', '.join(group)}." if len(group) > 1 else
              f"\\* {best} differs from every other member (Holm).", ""]
    if len(pairs) > 1 or len(tested) < len(pairs):
        lines += ["| pair | n | difference | interval | level | test | p | Holm p | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for pr in pairs:
            if pr["differ"] is None:
                lines.append(f"| {pr['a']} - {pr['b']} | {pr['n']} | {pr['diff']:+.3f} | - | - | - | - | - | "
                             f"no seed-level test: {pr['why']} |")
                continue
            holm_p = "-" if pr["p_holm"] is None else f"{pr['p_holm']:.3g}"
            lines.append(f"| {pr['a']} - {pr['b']} | {pr['n']} | {pr['diff']:+.3f} | [{pr['low']:+.3f}, "
                         f"{pr['high']:+.3f}] | {pr['level']:.3g} | {pr['test']} | {pr['p']:.3g} | {holm_p} | "
                         f"{_verdict(pr)} |")
        lines.append("")
    for pr in pairs:
        for k, r in enumerate(pr.get("per_seed") or []):
            lines.append(f"- {pr['a']} - {pr['b']}, seed {k + 1} of each: {r['diff']:+.3f} [{r['low']:+.3f}, "
                         f"{r['high']:+.3f}] (McNemar p={r['p']:.3g}, unadjusted; these two networks)")
    if any(pr.get("per_seed") for pr in pairs):
        lines.append("")
    if paired.get("sequential"):
        lines += ["Sequential evaluation: images were attacked in chunks, and after every chunk each pair still "
                  "undecided was tested at a group-sequential boundary: Lan-DeMets O'Brien-Fleming-type alpha "
                  "spending over the information fraction n / maximum n, inside Holm's method over the tested "
                  "pairs (Maurer & Bretz 2013: a rejected pair's share of alpha passes to the others). A pair "
                  "stopped once rejected, at the maximum n, or when the test set ran out; its row above is its "
                  "last look (the interval at that look's level is a repeated confidence interval).", ""]
        lines += [f"- {q['a']} vs {q['b']}: stopped at n={q['n']}"
                  f"{' (early)' if q.get('early') else ''}: {q['why']}" for q in paired["sequential"]]
        lines.append("")
    if forest:
        lines += [f"![difference to the best hand-crafted baseline](plots/{forest.name})", ""]
    return lines


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path, labels: Optional[Sequence[str]] = None,
                 title: str = "Comparison", alpha: float = 0.05,
                 sequential: Optional[Sequence[dict]] = None) -> dict[str, Any]:
    """compare.json, report.md and plots/ in `out` for the given run directories (the same label twice:
    two seeds of one member); `sequential` is where and why each pair of a sequential evaluation stopped."""
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
              f"test images per run: {', '.join(map(str, ns))}. Ranked by standard AutoAttack accuracy "
              f"(AutoAttack-rank where a run has no standard AutoAttack, else the strongest PGD; column *by*).", ""]
    lines += comparison_table(entries) + [""]
    lines += decision_table(entries)
    p = plot_pareto(entries, out / "plots" / "pareto.png")
    if p:
        lines += [f"![pareto](plots/{p.name})", ""]
    paired = paired_analysis(entries, alpha=alpha, sequential=sequential)
    if sequential is not None:
        paired["sequential"] = list(sequential)
    lines += paired_report(paired, plot_forest(paired, out / "plots" / "forest.png"))
    darts = [(e["label"], e["genotype"]) for e in entries
             if "genotype" in e and get_space(e["genotype"].get("space") or "darts").cells]
    if darts:
        from robustnas.nets.genotypes import genotype_from_dict

        lines += ["## Operations by cell position (DARTS-space methods)", ""]
        for label, g in darts:
            table = op_by_position(genotype_from_dict(g))
            kinds = list(table)
            ops = sorted({op for k in kinds for op in table[k]})
            lines += [f"**{label}**", "", "| op | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
            lines += [f"| {op} | " + " | ".join(str(table[k].get(op, 0)) for k in kinds) + " |" for op in ops]
            lines.append("")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    result = {"entries": entries, "paired": paired, "report": str(out / "report.md")}
    write_json(out / "compare.json", result)
    return result
