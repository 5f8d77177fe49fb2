"""Cost of one DSRNA search step with each robustness metric, and of one AdvRush step, relative to one plain
DARTS first-order search step: the same supernet (same size and seed), the same weight and alpha batches,
the same process.

A step is the whole bilevel step (alpha step, then weight step). Seconds are medians over --iters timed
steps after one untimed warm-up step; both wall-clock and process CPU time are given, and the ratio uses
CPU time, which other jobs on a shared machine disturb less (set --threads 1 for that). Published on
CIFAR-10: Jacobian about 1x-2x the DARTS cost, certified bounds about 10x (METHODS.md section 4).

    python benchmarks/bench_dsrna.py [--dataset fashion-mnist] [--C 4] [--layers 3] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

ROWS = {  # name: (method, settings)
    "darts 1st order": ("darts", {}),
    "dsrna jacobian exact": ("dsrna", {"metric": "jacobian", "jacobian_mode": "exact"}),
    "dsrna jacobian projection": ("dsrna", {"metric": "jacobian", "jacobian_mode": "projection"}),
    "dsrna cb ibp margin": ("dsrna", {"metric": "cb", "cb_method": "ibp", "cb_form": "margin", "cb_n": None}),
    "dsrna combined (ibp margin + projection)": ("dsrna", {"metric": "combined", "cb_method": "ibp",
                                                           "cb_form": "margin", "cb_n": None}),
    "dsrna cb radius crown-ibp (default, 1 image)": ("dsrna", {"metric": "cb"}),
    "advrush (penalty on)": ("advrush", {"reg_warmup_epochs": 0, "h_schedule": "after-warmup", "h_ramp_epochs": 1}),
}
OPTIONAL = {
    "dsrna cb crown-ibp margin": ("dsrna", {"metric": "cb", "cb_method": "crown-ibp", "cb_form": "margin",
                                            "cb_n": None}),
    "dsrna cb crown margin (window 30, 1 image)": ("dsrna", {"metric": "cb", "cb_method": "crown", "cb_form": "margin"}),
    "dsrna cb crown-fwd margin (1 image)": ("dsrna", {"metric": "cb", "cb_method": "crown-fwd", "cb_form": "margin"}),
}


def load(name: str, n: int):
    from robustnas.data.datasets import load_dataset
    from robustnas.core.errors import UserError

    try:
        return load_dataset(name, subset=n)
    except UserError:
        return load_dataset("digits", subset=n)


def time_row(method: str, settings: dict, data, args) -> tuple[float, float]:
    from robustnas.search import SearchContext, build_strategy

    bs = args.batch_size
    common = {"C": args.C, "layers": args.layers, "batch_size": bs, "epochs": 2}
    strat = build_strategy(method, {**common, **settings})
    strat.setup(SearchContext(data=data, eps=float(data.meta.eps), seed=0, device=args.device, progress=False))
    x, y = data.train.x.to(strat.device), data.train.y.to(strat.device)
    walls, cpus = [], []
    for i in range(args.iters + 1):
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        strat.search_step(x[:bs], y[:bs], x[bs:2 * bs], y[bs:2 * bs], 0.025, epoch=1, step=i)
        if strat.device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step pays one-off costs (lazy imports, allocator)
            walls.append(time.perf_counter() - t_wall)
            cpus.append(time.process_time() - t_cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--C", type=int, default=4)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--crown", action="store_true", help="add CROWN-IBP and default CROWN rows (slow, memory-hungry on big supernets)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.dataset, 4 * args.batch_size)
    rows = {**ROWS, **(OPTIONAL if args.crown else {})}
    print(f"# {data.meta.name} {'x'.join(map(str, data.meta.shape))}, supernet C={args.C} layers={args.layers}, "
          f"batch {args.batch_size}, eps {data.meta.eps}, {args.threads} thread(s), {args.device}, "
          f"median of {args.iters} steps")
    print(f"| {'search step':<34} | wall s | CPU s | x DARTS (CPU) |")
    print(f"|{'-' * 36}|-------:|------:|--------------:|")
    base = None
    for name, (method, settings) in rows.items():
        wall, cpu = time_row(method, settings, data, args)
        base = base or cpu
        print(f"| {name:<34} | {wall:6.2f} | {cpu:5.2f} | {cpu / base:13.1f} |", flush=True)


if __name__ == "__main__":
    main()
