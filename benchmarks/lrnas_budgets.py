"""LRNAS at several final-network budgets from ONE search, against hand-crafted CNNs of no more
parameters, with the benchmark's recipe and attacks.

The contributions (and so the alphas) do not depend on the budget: the greedy selection under another
budget is `select_under_budget` on the alphas the search ended with. This script reads them from the
LRNAS member of a finished `robustnas benchmark` run (its search.jsonl), trains and evaluates the
selection at each budget (the benchmark's own budget is its LRNAS run, not redone), trains a CNN within
each budget, and writes one comparison (report.md, compare.json) to --out. Finished members are reused.
The selection follows the benchmark's budget_rule; under "official" it may pass the budget by one op,
and the CNN then gets the selection's count as its ceiling (the benchmark's own budget keeps its CNN).

    python benchmarks/lrnas_budgets.py --config configs/benchmark.yaml --budgets 50k,100k,200k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from robustnas.results.compare import compare_runs
    from robustnas.app.pipeline import BenchmarkCommand
    from robustnas.core.config import RunCommand, load_yaml, validate
    from robustnas.nets.genotypes import save_genotype
    from robustnas.app.pipeline import load_data, resolved, train_evaluate
    from robustnas.core.rundir import read_json
    from robustnas.search.greedy import select_under_budget
    from robustnas.search.lrnas import LrnasConfig
    from robustnas.core.config import parse_count
    from robustnas.training.trainer import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/benchmark.yaml")
    ap.add_argument("--budgets", default="50k,100k,200k")
    ap.add_argument("--baseline", default="cnn")
    ap.add_argument("--out", default=None, help="default: <benchmark out>/lrnas-budgets")
    args = ap.parse_args()

    cmd = validate(BenchmarkCommand, load_yaml(args.config))
    bench = Path(cmd.out) if cmd.out else Path("runs") / cmd.name
    lr = bench / "lrnas"
    if not (lr / "metrics.json").is_file() or "search_seconds" not in read_json(lr / "metrics.json"):
        raise SystemExit(f"{lr} is not a finished LRNAS run: run `robustnas benchmark --config {args.config}` first")
    history = [json.loads(line) for line in (lr / "search.jsonl").read_text().splitlines()]
    alphas = [h for h in history if "alpha_raw" in h][-1]["alpha_raw"]
    settings = LrnasConfig(**cmd.methods["lrnas"])
    C, layers = settings.final_C, settings.final_layers
    reductions = settings.final_reduction_layers
    net_kw = {} if reductions is None else {"reduction_layers": reductions}

    out = Path(args.out) if args.out else bench / "lrnas-budgets"
    data = load_data(cmd.data, cmd.seed)
    device = resolve_device(cmd.device)
    rc = resolved(RunCommand(name="lrnas-budgets", seed=cmd.seed, device=cmd.device, data=cmd.data, train=cmd.train,
                             evaluate=cmd.evaluate), data)
    dirs, labels = [], []
    for budget in args.budgets.split(","):
        same = parse_count(budget) == parse_count(cmd.budget)
        d = lr if same else out / f"lrnas-{budget}"
        sel = select_under_budget(alphas, data.meta, budget, C, layers, settings.after_budget, reductions,
                                  settings.budget_rule)
        if not (d / "metrics.json").is_file() or "reliable" not in read_json(d / "metrics.json"):
            save_genotype(sel.genotype, d / "genotype.json")
            train_evaluate(d, str(d / "genotype.json"), data, rc, device, resume=True, method="lrnas",
                           record={"lrnas_budget": budget}, C=C, layers=layers, **net_kw)
        dirs.append(d)
        labels.append(f"lrnas {budget}")
        b = bench / f"baseline-{args.baseline}" if same else out / f"{args.baseline}-{budget}"
        if not (b / "metrics.json").is_file() or "reliable" not in read_json(b / "metrics.json"):
            train_evaluate(b, args.baseline, data, rc, device, resume=b.exists(),
                           params=max(parse_count(budget), sel.params), at_most=True)
        dirs.append(b)
        labels.append(f"{args.baseline} {budget}")
    result = compare_runs(dirs, out, labels, title=f"LRNAS at {args.budgets} final parameters vs {args.baseline}")
    for e in result["entries"]:
        print(f"{e['label']:>14}  params {e['params']:>8,}  clean {e['clean_acc']:.3f}  PGD-20 {e['pgd20']:.3f}  "
              f"AutoAttack {'-' if e['autoattack_acc'] is None else format(e['autoattack_acc'], '.3f')}")
    print(f"report: {result['report']}")


if __name__ == "__main__":
    main()
