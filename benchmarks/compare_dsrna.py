"""DARTS vs DSRNA-CB vs DSRNA-Jacobian at one tiny CPU budget: search each, train each derived network
with the same recipe at the same parameter budget, and compare the mean certified radius (IBP and
CROWN-IBP) and PGD-20 accuracy on the same test images.

The claims under test (METHODS.md section 4): the DSRNA-CB architecture has a higher certified radius
than a DARTS one, and DSRNA-Jacobian a higher PGD accuracy. One seed, a small budget: read the output
as one sample, not a verdict. Results go to --out (results-<recipe>.json, one folder per method, resumable:
finished methods are read back, not re-run).

    python benchmarks/compare_dsrna.py [--dataset fashion-mnist] [--subset 3000] [--out runs/compare_dsrna]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = {
    "darts": ("darts", {}),
    "dsrna-cb": ("dsrna", {"metric": "cb", "cb_method": "ibp", "cb_form": "margin", "cb_n": None}),  # the documented
    #                                                                                    (IBP margin) run
    "dsrna-jacobian": ("dsrna", {"metric": "jacobian"}),
}


def op_counts(genotype) -> dict:
    """How many parameter-free ops (pools, skips) each cell kind keeps: what a bound-driven search favours."""
    free = {"max_pool_3x3", "avg_pool_3x3", "skip_connect"}
    return {kind: sum(op in free for op, _ in genotype.cell(kind)[0]) for kind in ("normal", "reduce")}


def run_method(name: str, method: str, settings: dict, data, args, out: Path) -> dict:
    from robustnas.nets.arch import channels_for_params
    from robustnas.robustness.attacks import accuracy, pgd, robust_accuracy
    from robustnas.robustness.certify import certified_radius
    from robustnas.core.config import TrainConfig
    from robustnas.nets.genotypes import build_network
    from robustnas.search import SearchContext, build_strategy
    from robustnas.nets.size import count_params
    from robustnas.training.trainer import Trainer

    eps = float(args.eps)
    search_settings = {"C": args.search_C, "layers": args.search_layers, "epochs": args.search_epochs,
                       "warmup_epochs": args.search_warmup, "batch_size": args.search_batch,
                       "max_batches_per_epoch": args.search_batches, "alpha_lr": args.alpha_lr,
                       "val_n": 64, "val_steps": 3, **settings}
    strat = build_strategy(method, search_settings)
    t_cpu = time.process_time()
    result = strat.search(SearchContext(data=data, eps=eps, seed=args.seed, out_dir=out / "search",
                                        progress=args.progress), resume=True)
    search_cpu = time.process_time() - t_cpu
    genotype = result.genotype

    m = data.meta
    C = channels_for_params(genotype, m, args.layers, args.params)
    torch.manual_seed(args.seed)
    net = build_network(genotype, C=C, layers=args.layers, num_classes=m.num_classes, in_shape=m.shape,
                        mean=m.mean, std=m.std)
    train = TrainConfig(epochs=args.train_epochs, batch_size=args.train_batch, lr=args.lr, adv=args.adv,
                        attack={"eps": str(args.eps), "steps": args.attack_steps}, val_n=200, val_steps=5,
                        # model selection on robust accuracy would pick a constant predictor of an early
                        # epoch when the network is trained normally (every PGD accuracy near chance)
                        select="robust" if args.adv != "none" else "clean")
    t_cpu = time.process_time()
    train_dir = out / f"train-{args.adv}-{args.train_epochs}ep-{args.layers}cells-{args.params}-{train.select}"
    Trainer(net, data, train, eps, seed=args.seed, out_dir=train_dir, progress=args.progress).fit(resume=True)
    train_cpu = time.process_time() - t_cpu

    net.eval()
    x, y = data.test.x[:args.n], data.test.y[:args.n]
    torch.manual_seed(args.seed)
    row = {
        "genotype": genotype.to_dict(), "parameter_free_ops": op_counts(genotype), "C": C,
        "params": count_params(net), "search_cpu_s": search_cpu, "train_cpu_s": train_cpu,
        # a resumed search re-runs nothing: its epochs' own wall-clock seconds are the search's time
        "search_wall_s": sum(h["seconds"] for h in result.history),
        "clean_acc": accuracy(net, x, y),
        "pgd20_acc": robust_accuracy(net, x, y, lambda xb, yb: pgd(net, xb, yb, eps, steps=20)),
        f"pgd20_acc_eps{args.small_eps}": robust_accuracy(
            net, x, y, lambda xb, yb: pgd(net, xb, yb, float(args.small_eps), steps=20)),
    }
    for bound in ("ibp", "crown-ibp"):
        r = certified_radius(net, x, y, bound, max_eps=args.max_eps, tol=args.tol, batch_size=50)
        row[f"radius_{bound}"] = r.mean().item()
        row[f"certified_frac_{bound}"] = (r > 0).float().mean().item()
    last = result.history[-1]
    row["search_last_epoch"] = {k: last[k] for k in last if k.startswith(("val_", "metric", "ce_val"))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--fallback", default="digits")
    ap.add_argument("--subset", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", default="0.1")
    ap.add_argument("--search-C", type=int, default=4)
    ap.add_argument("--search-layers", type=int, default=3)
    ap.add_argument("--search-epochs", type=int, default=6)
    ap.add_argument("--search-warmup", type=int, default=2)
    ap.add_argument("--search-batch", type=int, default=32)
    ap.add_argument("--search-batches", type=int, default=15)
    ap.add_argument("--alpha-lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--params", type=int, default=25_000)
    # the DSRNA paper trains the found networks normally; pgd gives adversarial training
    ap.add_argument("--adv", default="none", choices=["none", "pgd", "trades", "fgsm-rs"])
    ap.add_argument("--train-epochs", type=int, default=15)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--attack-steps", type=int, default=3)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--small-eps", default="0.03", help="a second PGD-20 radius, informative for normal training")
    ap.add_argument("--max-eps", type=float, default=0.05)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="runs/compare_dsrna")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from robustnas.data.datasets import load_dataset
    from robustnas.core.errors import UserError

    try:
        data = load_dataset(args.dataset, subset=args.subset, seed=args.seed)
    except UserError:
        data = load_dataset(args.fallback, subset=args.subset, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    select = "robust" if args.adv != "none" else "clean"
    results_path = out / (f"results-{args.adv}-{args.train_epochs}ep-{args.layers}cells-{args.params}-{select}"
                          f"-tol{args.tol:g}.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["settings"] = {**vars(args), "dataset_used": data.meta.name, "train_images": len(data.train)}
    for name in args.methods.split(","):
        if name in results:
            continue
        method, settings = METHODS[name]
        results[name] = run_method(name, method, settings, data, args, out / name)
        results_path.write_text(json.dumps(results, indent=1))
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "genotype"}), flush=True)

    print(f"\n# {data.meta.name}, {len(data.train)} training images, eps {args.eps}, seed {args.seed}; "
          f"final nets: {args.layers} cells, ~{args.params} params, {args.adv} training, {args.train_epochs} epochs; "
          f"{args.n} test images")
    print(f"| method | params | free ops (n/r) | clean | PGD-20 @{args.eps} | PGD-20 @{args.small_eps} | "
          f"radius IBP | radius CROWN-IBP | search wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.methods.split(","):
        r = results[name]
        free = r["parameter_free_ops"]
        small = r[f"pgd20_acc_eps{args.small_eps}"]
        print(f"| {name} | {r['params']} | {free['normal']}/{free['reduce']} | {r['clean_acc']:.3f} | "
              f"{r['pgd20_acc']:.3f} | {small:.3f} | {r['radius_ibp']:.2e} | {r['radius_crown-ibp']:.2e} | "
              f"{r['search_wall_s']:.0f} |")


if __name__ == "__main__":
    main()
