"""Cost of one LRNAS contribution round (naive and batched) against one supernet training epoch, same run.

One LRNAS strategy is set up on the data (Fashion-MNIST, digits when it is not installed); then, in this
order and in this process: one epoch of clean weight steps (the search's own step, steps_per_epoch
batches), and the contribution round of the next epoch with impl="naive" (one masked supernet forward
per subset) and impl="batched" (eval_chunk subsets per forward, each op run only on the subsets that
keep it), for each FGSM mode asked for. Both implementations draw the same orderings and batches (the
round is seeded by seed and epoch), so their values must be equal; the script says whether they are,
bit for bit.

Example (CPU): python benchmarks/bench_lrnas.py --orderings 2 --subset 4000

With --compare-updates the script instead runs one short search per alpha update (kind-zscore, joint-l2)
with the same seed and settings, and prints the greedy selection of each under both budget rules at
each of --budgets (final network --final-C, --final-layers): whether the two updates select the same
cells. Example: python benchmarks/bench_lrnas.py --compare-updates --dataset digits --subset 1797 --C 4
--layers 5 --k 1 --batch-size 32 --contrib-batch-size 32 --orderings 4 --max-batches 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _load(name: str, subset: int):
    from robustnas.data.datasets import load_dataset
    from robustnas.core.errors import UserError

    try:
        return load_dataset(name, subset=subset, seed=0)
    except UserError:
        return load_dataset("digits", subset=min(subset, 1797), seed=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist", help="falls back to digits when not installed")
    ap.add_argument("--subset", type=int, default=4000, help="images loaded; the weight half sets the epoch length")
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--k", type=int, default=4, help="partial channels")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--contrib-batch-size", type=int, default=64)
    ap.add_argument("--orderings", type=int, default=2, help="orderings timed (the search default is 10)")
    ap.add_argument("--eval-chunk", type=int, default=0, help="subsets per batched forward (0: auto_chunk)")
    ap.add_argument("--fgsm", default="full-network", help="comma-separated: full-network, per-subset")
    ap.add_argument("--impls", default="naive,batched")
    ap.add_argument("--max-batches", type=int, default=0, help="cap the training epoch (0: the whole weight half)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare-updates", action="store_true", help="search once per alpha update, compare selections")
    ap.add_argument("--epochs", type=int, default=6, help="--compare-updates: search epochs")
    ap.add_argument("--warmup", type=int, default=2, help="--compare-updates: warm-up epochs")
    ap.add_argument("--final-C", type=int, default=10, help="--compare-updates: final network the budget counts")
    ap.add_argument("--final-layers", type=int, default=5)
    ap.add_argument("--budgets", default="40k,60k,80k", help="--compare-updates: budgets of the selection")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from robustnas.core.config import parse_eps
    from robustnas.search import SearchContext, build_strategy

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = _load(args.dataset, args.subset)
    settings = {"C": args.C, "layers": args.layers, "partial_channels_k": args.k, "batch_size": args.batch_size,
                "contrib_batch_size": args.contrib_batch_size, "orderings": args.orderings,
                "eval_chunk": args.eval_chunk or None, "epochs": 2, "warmup_epochs": 1}
    if args.max_batches:
        settings["max_batches_per_epoch"] = args.max_batches
    if args.compare_updates:
        return compare_updates(args, data, settings, device)
    strat = build_strategy("lrnas", settings)
    strat.setup(SearchContext(data=data, eps=parse_eps(data.meta.eps), device=device, seed=0, progress=False))
    out = {"dataset": data.meta.name, "device": str(device), "threads": torch.get_num_threads(),
           "supernet": {"C": args.C, "layers": args.layers, "k": args.k,
                        "params": sum(p.numel() for p in strat.weights)},
           "players": sum(a.numel() for a in strat.alphas), "orderings": args.orderings,
           "contrib_batch_size": args.contrib_batch_size, "eval_chunk": args.eval_chunk}

    # one training epoch: the loop's own step on steps_per_epoch weight batches
    x_tr, y_tr = data.train.x, data.train.y
    bs = args.batch_size
    g = torch.Generator().manual_seed(0)
    w_order = strat.w_idx[torch.randperm(len(strat.w_idx), generator=g)]
    a_order = strat.a_idx[torch.randperm(len(strat.a_idx), generator=g)]
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in range(strat.steps_per_epoch):
        sl = slice(b * bs, (b + 1) * bs)
        strat.search_step(x_tr[w_order[sl]].to(device), y_tr[w_order[sl]].to(device),
                          x_tr[a_order[sl]].to(device), y_tr[a_order[sl]].to(device), strat.lr_at(0), 0, b, False)
    _sync(device)
    epoch_s, epoch_cpu = time.perf_counter() - t0, time.process_time() - c0
    out["train_epoch"] = {"seconds": epoch_s, "cpu_seconds": epoch_cpu, "batches": strat.steps_per_epoch,
                          "batch_size": bs}

    rows = []
    for mode in [m.strip() for m in args.fgsm.split(",") if m.strip()]:
        values = {}
        for impl in [i.strip() for i in args.impls.split(",") if i.strip()]:
            strat.cfg.fgsm, strat.cfg.impl = mode, impl
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            r = strat.contribution_round(1)
            _sync(device)
            s, cpu = time.perf_counter() - t0, time.process_time() - c0
            values[impl] = r
            rows.append({"fgsm": mode, "impl": impl, "seconds": s, "cpu_seconds": cpu,
                         "per_ordering_s": s / args.orderings, "x_train_epoch": s / epoch_s,
                         "cpu_x_train_epoch": cpu / epoch_cpu,
                         "round_of_10_cpu_x_train_epoch": cpu / args.orderings * 10 / epoch_cpu,
                         "full_clean": r.full_clean, "full_fgsm": r.full_fgsm})
        if "naive" in values and "batched" in values:
            a, b = values["naive"], values["batched"]
            same = (torch.equal(a.values, b.values) and torch.equal(a.clean_drop, b.clean_drop)
                    and torch.equal(a.fgsm_drop, b.fgsm_drop))
            timed = {r["impl"]: r for r in rows if r["fgsm"] == mode and "impl" in r}
            rows.append({"fgsm": mode,
                         "speedup_batched_over_naive": timed["naive"]["seconds"] / timed["batched"]["seconds"],
                         "cpu_speedup": timed["naive"]["cpu_seconds"] / timed["batched"]["cpu_seconds"],
                         "values_equal": same,
                         "max_abs_value_diff": float((a.values - b.values).abs().max())})
    out["rounds"] = rows
    print(json.dumps(out, indent=1))


def compare_updates(args, data, settings: dict, device: torch.device) -> None:
    """One search per alpha update, same seed; the selections of each under both budget rules."""
    from robustnas.core.config import parse_eps
    from robustnas.search import SearchContext, build_strategy
    from robustnas.search.greedy import select_under_budget

    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    settings = {**settings, "epochs": args.epochs, "warmup_epochs": args.warmup, "final_C": args.final_C,
                "final_layers": args.final_layers, "max_params": budgets[0]}
    out = {"dataset": data.meta.name, "train_images": len(data.train), "seed": args.seed,
           "threads": torch.get_num_threads(), "settings": settings, "searches": {}}
    alphas = {}
    for update in ("kind-zscore", "joint-l2"):
        strat = build_strategy("lrnas", {**settings, "alpha_update": update})
        t0 = time.perf_counter()
        result = strat.search(SearchContext(data=data, eps=parse_eps(data.meta.eps), device=device, seed=args.seed,
                                            progress=False))
        alphas[update] = result.extra["alpha_raw"]
        ranking = [e["kind"][0] + str(e["edge"]) for e in result.extra["selection"]]
        out["searches"][update] = {"seconds": time.perf_counter() - t0, "edge_ranking": ranking, "selections": {}}
        for rule in ("official", "strict"):
            for b in budgets:
                sel = select_under_budget(alphas[update], data.meta, b, args.final_C, args.final_layers,
                                          budget_rule=rule)
                g = sel.genotype.to_dict()
                out["searches"][update]["selections"][f"{rule} {b}"] = {
                    "params": sel.params, "normal": g["normal"], "reduce": g["reduce"]}
    sa, sb = (out["searches"][u]["selections"] for u in ("kind-zscore", "joint-l2"))
    out["same_selection"] = {k: (sa[k]["normal"], sa[k]["reduce"]) == (sb[k]["normal"], sb[k]["reduce"])
                             for k in sa}
    out["same_edge_ranking"] = (out["searches"]["kind-zscore"]["edge_ranking"]
                                == out["searches"]["joint-l2"]["edge_ranking"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
