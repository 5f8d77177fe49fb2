"""Cost of one TAM-NAS supernet training step vs one training step of the extracted subnet, same batch.

The subnet is the median-size one of a uniform sample of the space. Three figures, all PGD-k adversarial
training steps on the same batches, interleaved in rounds so that machine noise hits them alike (each is
the median over rounds):
  subnet     the extracted standalone network, stepped by the one Trainer (`Trainer.train_step`)
  supernet   the supernet with that same subnet active (`SupernetTrainer.train_step`): the price of weight sharing
  sampled    the supernet drawing a fresh uniform subnet every step, as the search trains it
The ratio supernet / subnet of the time per step is the overhead of slicing the shared weights (1.0: none).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from robustnas.core.config import TrainConfig, parse_eps
from robustnas.data.datasets import load_dataset
from robustnas.search import SearchContext, build_strategy
from robustnas.nets.size import count_params
from robustnas.training.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="PGD steps of the training examples")
    ap.add_argument("--iters", type=int, default=2, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width-mult", type=int, default=1)
    ap.add_argument("--sample", type=int, default=41, help="subnets drawn to find the median size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    n = args.batch_size * args.iters
    try:
        data = load_dataset(args.dataset, subset=n)
    except Exception:
        data = load_dataset("digits")
    eps = parse_eps(data.meta.eps)
    dev = torch.device(args.device)
    strategy = build_strategy("tamnas", {"width_mult": args.width_mult, "batch_size": args.batch_size,
                                         "adv": "pgd", "attack_steps": args.steps})
    strategy.setup(SearchContext(data, eps=eps, device=dev, progress=False))
    space, supernet = strategy.space, strategy.net

    rng = np.random.default_rng(0)
    encodings = [space.sample(rng) for _ in range(args.sample)]
    sizes = [count_params(supernet.extract(e)) for e in encodings]
    median = encodings[int(np.argsort(sizes)[len(sizes) // 2])]
    torch.manual_seed(0)
    subnet = supernet.extract(median)
    cfg = TrainConfig.model_validate({"adv": "pgd", "batch_size": args.batch_size, "lr": 0.01,
                                      "attack": {"steps": args.steps}})
    trainer = Trainer(subnet, data, cfg, eps, device=dev, progress=False)

    xs, ys = data.train.x[:n].to(dev), data.train.y[:n].to(dev)
    batches = [(xs[i:i + args.batch_size], ys[i:i + args.batch_size]) for i in range(0, n, args.batch_size)]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(step) -> float:
        sync()
        t = time.perf_counter()
        for x, y in batches:
            step(x, y)
        sync()
        return (time.perf_counter() - t) / len(batches)

    def subnet_step(x, y):
        trainer.train_step(x, y, 0.01)

    def supernet_step(x, y):
        strategy.trainer.train_step(x, y, [median], 0.01)

    def sampled_step(x, y):
        strategy.trainer.train_step(x, y, [space.sample(rng)], 0.01)

    runs = {"subnet": subnet_step, "supernet": supernet_step, "sampled": sampled_step}
    for step in runs.values():  # warm-up
        timed(step)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, step in runs.items():
            times[k].append(timed(step))
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"bench_tamnas: {data.meta.name}, batch {args.batch_size}, PGD-{args.steps} AT, width x{args.width_mult}, "
          f"device {dev.type}, torch threads {torch.get_num_threads()}")
    print(f"  median subnet of {args.sample}: {count_params(subnet)} params (sampled range "
          f"{min(sizes)}..{max(sizes)}); supernet {count_params(supernet)} params")
    for k in runs:
        print(f"  {k:9s}: {t[k] * 1000:8.1f} ms/step  {args.batch_size / t[k]:8.1f} images/s")
    print(f"  ratio supernet / subnet (same subnet): {t['supernet'] / t['subnet']:.2f}x the time per step")
    print(f"  ratio sampled / subnet               : {t['sampled'] / t['subnet']:.2f}x")


if __name__ == "__main__":
    main()
