"""Wall time of one generation of candidate evaluations on each executor, against in-process.

The job is the real one: TAM-NAS's SubnetScorer (extract a subnet with inherited weights, recalibrate
BN, clean and PGD accuracy on held-out images) on `--candidates` subnets drawn from the tiny space, each
a few seconds on one thread. Every backend gets the same scorer and encodings and must return the same
scores. Figures, all in this run:
  inprocess        one thread, one candidate after the other (the reference)
  pool cold/warm   2 spawned workers x 1 thread; cold includes starting them, warm reuses them
  ray  cold/warm   a local Ray with 2 CPUs; cold includes starting Ray and its workers
The ratio is the reference's time over the backend's (2.0: perfect use of two cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from robustnas.data.datasets import load_dataset
from robustnas.core.executor import make_executor
from robustnas.search import SearchContext, build_strategy


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=144, help="held-out images per candidate")
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the workers' thread count, so the reference is the same job

    data = load_dataset("digits", seed=0)
    strategy = build_strategy("tamnas", {"eval_n": args.eval_n, "eval_pgd_steps": args.pgd_steps})
    strategy.setup(SearchContext(data, eps=0.1, seed=0, progress=False))
    scorer = strategy.scorer()
    rng = np.random.default_rng(0)
    encodings = [strategy.space.sample(rng) for _ in range(args.candidates)]
    print(f"{args.candidates} TAM-NAS subnet scorings (digits, eval_n {len(scorer.eval_x)}, PGD-{args.pgd_steps}), "
          f"{args.workers} workers x 1 thread")

    reference, t_ref = timed(make_executor("inprocess").map, scorer, encodings)
    print(f"inprocess        {t_ref:7.2f} s  ({t_ref / len(encodings):.2f} s per candidate)  ratio 1.00")

    backends = [("pool", {"workers": args.workers})]
    if not args.no_ray:
        backends.append(("ray", {"workers": args.workers}))
    for name, options in backends:
        try:
            ex, t_start = timed(make_executor, name, **options)
        except Exception as e:  # Ray not installed: say so and go on
            print(f"{name:<16} skipped: {e}")
            continue
        try:
            cold, t_cold = timed(ex.map, scorer, encodings)
            warm, t_warm = timed(ex.map, scorer, encodings)
        finally:
            ex.close()
        same = cold == reference and warm == reference
        print(f"{name + ' cold':<16} {t_start + t_cold:7.2f} s  ratio {t_ref / (t_start + t_cold):.2f}  "
              f"(starting it: {t_start:.2f} s here, the rest on the first map)")
        print(f"{name + ' warm':<16} {t_warm:7.2f} s  ratio {t_ref / t_warm:.2f}  results equal to inprocess: {same}")
        if not same:
            raise SystemExit(f"{name} returned other scores than in-process")


if __name__ == "__main__":
    main()
