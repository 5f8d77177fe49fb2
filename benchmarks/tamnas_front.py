"""TAM-NAS on Fashion-MNIST at a CPU budget: the final front fine-tuned from the supernet vs trained from
scratch, each against a hand-crafted CNN of no more parameters, all with one recipe and one evaluation
(clean, PGD-20, AutoAttack on the same test images).

One search (under --max-params); `final_n` front members spread over the size range are trained twice
by TamNas.train_final, once from their inherited, BN-recalibrated supernet weights ("finetune") and once
from a fresh initialisation ("scratch"). Results: printed table and <out>/results.json.

    python benchmarks/tamnas_front.py --out runs/tamnas_front [--subset 3000] [--n 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    import torch

    from robustnas.nets.arch import build_arch
    from robustnas.core.config import TrainConfig
    from robustnas.data.datasets import load_dataset
    from robustnas.evaluation.evaluate import evaluate_model
    from robustnas.search import SearchContext, build_strategy
    from robustnas.nets.size import count_params
    from robustnas.training.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--subset", type=int, default=3000)
    ap.add_argument("--eps", default="0.1")
    ap.add_argument("--max-params", default="200k")
    ap.add_argument("--epochs", type=int, default=3, help="supernet epochs")
    ap.add_argument("--batches", type=int, default=20, help="supernet batches per epoch")
    ap.add_argument("--pop", type=int, default=10)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--final-n", type=int, default=2)
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--n", type=int, default=100, help="test images for the attacks")
    ap.add_argument("--out", default="runs/tamnas_front")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    data = load_dataset(args.dataset, subset=args.subset, seed=args.seed)
    eps = float(args.eps)
    train = TrainConfig(adv="pgd", epochs=args.train_epochs, batch_size=128, lr=0.05,
                        attack={"eps": args.eps, "steps": 3}, val_n=300, val_steps=5)
    strategy = build_strategy("tamnas", {
        "epochs": args.epochs, "max_batches_per_epoch": args.batches, "batch_size": 64, "attack_steps": 3,
        "eval_n": 200, "eval_pgd_steps": 5, "pop_size": args.pop, "generations": args.generations,
        "max_params": args.max_params, "final_n": args.final_n, "final_train": train.model_dump()})
    out = Path(args.out)
    t0 = time.perf_counter()
    result = strategy.search(SearchContext(data, eps=eps, seed=args.seed, out_dir=out / "search", progress=False),
                             resume=True)
    search_s = time.perf_counter() - t0
    front = result.extra["front"]
    x, y = data.test.x[:args.n], data.test.y[:args.n]

    def score(model) -> dict:
        m = evaluate_model(model, x, y, eps, attacks=("pgd20", "autoattack"), seed=args.seed, progress=False,
                           eps_curve=())
        return {"params": count_params(model), "clean": m["clean_acc"], "pgd20": m["robust_acc"]["pgd20"],
                "autoattack": m["autoattack_acc"], "reliable": m.get("reliable", True)}

    rows = []
    for mode in ("finetune", "scratch"):
        t1 = time.perf_counter()
        entries = strategy.train_final(front, mode, resume=True)
        for entry, model in zip(entries, strategy.final_models):
            rows.append({"model": f"tamnas {mode}", **score(model), "search_pgd_err": entry["search_pgd_err"],
                         "train_s": (time.perf_counter() - t1) / len(entries)})
    for entry in strategy.final_models[:len(rows) // 2]:
        budget = count_params(entry)
        torch.manual_seed(args.seed)
        cnn, _ = build_arch("cnn", data.meta, params=budget, at_most=True)
        Trainer(cnn, data, train, eps, seed=args.seed, progress=False).fit()
        rows.append({"model": "cnn (hand-crafted)", **score(cnn)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"search_seconds": search_s, "front": front, "rows": rows},
                                                 indent=1))
    print(f"search {search_s:.0f} s, front of {len(front)} (params {min(s['params'] for s in front):,} to "
          f"{max(s['params'] for s in front):,}); eps {args.eps}, {args.n} test images")
    for r in rows:
        print(f"{r['model']:>20}  params {r['params']:>8,}  clean {r['clean']:.3f}  PGD-20 {r['pgd20']:.3f}  "
              f"AutoAttack {r['autoattack']:.3f}{'' if r['reliable'] else '  UNRELIABLE'}")


if __name__ == "__main__":
    main()
