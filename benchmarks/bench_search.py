"""Cost of one supernet search step relative to one training step of the derived network, and peak memory.

Rows: DARTS first / second order with natural or PGD weight steps, ARNAS first / second order (PGD
weights + PGD alpha batch + two alpha gradients), and the derived network's natural and PGD-AT training
steps (the Trainer's own step) on the same batch. Each search row is divided by the derived step of
the same kind (natural / adversarial), so the ratio says how much dearer searching is than training
the found network.

Each row runs in its own child process, so that its peak memory is its own: on CPU the growth of the
resident set (ru_maxrss) from just before the first step to the end, on CUDA max_memory_allocated
above what the model and data already hold. Seconds are the median of --iters timed steps after one
untimed warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROWS = {  # name: (kind, settings, the derived row it is compared with)
    "derived natural": ("derived", {"adv": "none", "space": "darts"}, None),
    "derived PGD-AT": ("derived", {"adv": "pgd", "space": "darts"}, None),
    "darts 1st natural": ("darts", {"order": "first", "weight_adv": "none"}, "derived natural"),
    "darts 2nd natural": ("darts", {"order": "second", "weight_adv": "none"}, "derived natural"),
    "darts 1st PGD": ("darts", {"order": "first", "weight_adv": "pgd"}, "derived PGD-AT"),
    "darts 2nd PGD": ("darts", {"order": "second", "weight_adv": "pgd"}, "derived PGD-AT"),
    "arnas derived PGD-AT": ("derived", {"adv": "pgd", "space": "arnas"}, None),
    "arnas 1st": ("arnas", {"order": "first"}, "arnas derived PGD-AT"),
    "arnas 2nd": ("arnas", {"order": "second"}, "arnas derived PGD-AT"),
}


def _load(args):
    from robustnas.data.datasets import load_dataset
    from robustnas.core.errors import UserError

    n = 4 * args.batch_size
    try:
        return load_dataset(args.dataset, subset=n)
    except UserError:
        return load_dataset("digits", subset=n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_row(name: str, args) -> dict:
    """Build the row's model, time --iters steps after a warm-up step, measure the peak memory."""
    from robustnas.core.config import TrainConfig
    from robustnas.nets.genotypes import build_network
    from robustnas.search import SearchContext, build_strategy
    from robustnas.training.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = _load(args)
    m = data.meta
    eps = 0.1
    kind, settings, _ = ROWS[name]
    bs = args.batch_size
    x_w, y_w = data.train.x[:bs].to(device), data.train.y[:bs].to(device)
    x_a, y_a = data.train.x[bs:2 * bs].to(device), data.train.y[bs:2 * bs].to(device)

    # the derived network: the genotype of a freshly initialised supernet of the same space and size
    common = {"C": args.C, "layers": args.layers, "batch_size": bs, "attack_steps": args.steps}
    if kind == "derived":
        strat = build_strategy("darts", {**common, "space": settings["space"]})
    else:
        strat = build_strategy(kind, {**common, **settings})
    strat.setup(SearchContext(data=data, eps=eps, device=device, seed=0, progress=False))
    if kind == "derived":
        torch.manual_seed(0)
        net = build_network(strat.net.genotype(), args.C, args.layers, m.num_classes, m.shape, m.mean, m.std)
        cfg = TrainConfig.model_validate({"adv": settings["adv"], "batch_size": bs, "lr": 0.025,
                                          "attack": {"steps": args.steps}, "grad_clip": 5.0})
        trainer = Trainer(net, data, cfg, eps, device=device, progress=False)
        del strat

        def step():
            trainer.train_step(x_w, y_w, 0.025)
        params = sum(p.numel() for p in net.parameters())
    else:
        def step():
            strat.search_step(x_w, y_w, x_a, y_a, lr=0.025)
        params = sum(p.numel() for p in strat.weights)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    step()  # warm-up (allocations, lazy init, the second-order copy)
    _sync(device)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"row": name, "seconds": statistics.median(times), "peak_bytes": peak, "params": params,
            "dataset": m.name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist", help="falls back to digits when not installed")
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=7, help="PGD steps (weights and ARNAS alpha batch)")
    ap.add_argument("--iters", type=int, default=2, help="timed steps per row")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one row, print JSON
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_row(args.one, args)))
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    base_args = [a for a in sys.argv[1:]]
    results = {}
    for name in rows:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *base_args, "--one", name],
                             check=True, capture_output=True, text=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {name}: {results[name]['seconds']:.3f} s/step", file=sys.stderr, flush=True)

    first = next(iter(results.values()))
    print(f"\nsearch step vs derived-network training step: {first['dataset']}, C={args.C}, layers={args.layers}, "
          f"batch {args.batch_size}, PGD-{args.steps}, device {args.device}, median of {args.iters}")
    print(f"{'row':<20} {'params':>9} {'s/step':>9} {'x derived':>10} {'peak MiB':>9}")
    for name, r in results.items():
        ref = results.get(ROWS[name][2] or "")
        ratio = f"{r['seconds'] / ref['seconds']:.1f}x" if ref else "-"
        print(f"{name:<20} {r['params']:>9,} {r['seconds']:>9.3f} {ratio:>10} {r['peak_bytes'] / 2**20:>9.1f}")


if __name__ == "__main__":
    main()
