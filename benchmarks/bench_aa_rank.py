"""aa-rank (AutoAttack-rank, not standard AA) against standard AutoAttack on PGD-AT networks of three families.

Trains, with the one Trainer (PGD-AT), a hand-crafted CNN, a small darts_v2 genotype network and a small
PreAct-ResNet, then attacks the first --n test images with standard AutoAttack and with aa-rank (same seed).
Prints per network both accuracies, the images where they disagree, the disagreement in points, both wall
times and the speedup; the last two lines are the worst case over the networks (smallest speedup, largest
disagreement in points).

    python benchmarks/bench_aa_rank.py [--dataset fashion-mnist] [--n 500] [--epochs 3] [--subset 10000]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch

    from robustnas.nets.arch import build_arch
    from robustnas.robustness.attacks import AA_RANK_TARGETS, AA_RANK_TITLE, run_autoattack
    from robustnas.core.config import TrainConfig
    from robustnas.data.datasets import load_dataset
    from robustnas.nets.size import count_params
    from robustnas.training.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--subset", type=int, default=10000, help="training images (0: all)")
    ap.add_argument("--n", type=int, default=500, help="test images attacked")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--targets", type=int, default=AA_RANK_TARGETS, help="aa-rank's APGD-T target classes")
    ap.add_argument("--nets", default="cnn,darts_v2,preact_resnet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)

    data = load_dataset(args.dataset, subset=args.subset or None, seed=args.seed)
    builds = {"cnn": dict(width=0.5), "darts_v2": dict(C=4, layers=3), "preact_resnet": dict(width=0.125)}
    x, y = data.test.x[:args.n].to(dev), data.test.y[:args.n].to(dev)
    print(f"{args.dataset}, eps {args.eps}, n = {len(x)}, PGD-AT {args.epochs} epochs on {len(data.train.y)} "
          f"images; {AA_RANK_TITLE}: APGD-CE + APGD-T on {args.targets} targets", flush=True)
    speedups, gaps = [], []
    for name in args.nets.split(","):
        torch.manual_seed(args.seed)
        net, _ = build_arch(name, data.meta, **builds.get(name, {}))
        t0 = time.perf_counter()
        cfg = TrainConfig(epochs=args.epochs, adv="pgd", attack={"steps": 5}, val_n=200)
        Trainer(net, data, cfg, eps=args.eps, seed=args.seed, progress=False, device=args.device).fit()
        net = net.to(dev).eval()
        train_s = time.perf_counter() - t0
        with torch.no_grad():
            clean = (net(x).argmax(1) == y)

        def robust(x_adv):
            with torch.no_grad():
                return clean & (net(x_adv).argmax(1) == y)

        t0 = time.perf_counter()
        std = run_autoattack(net, x, y, args.eps, seed=args.seed)
        std_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rank = run_autoattack(net, x, y, args.eps, version="custom", attacks=["apgd-ce", "apgd-t"], seed=args.seed,
                              n_target_classes=args.targets)
        rank_s = time.perf_counter() - t0
        s, r = robust(std.x_adv), robust(rank.x_adv)
        gap = 100 * (r.float().mean() - s.float().mean()).item()
        speedups.append(std_s / rank_s)
        gaps.append(gap)
        comps = "  ".join(f"{k} {v:.3f}" for k, v in std.components.items())
        print(f"\n{name} ({count_params(net)} parameters, trained in {train_s:.0f} s): "
              f"clean {clean.float().mean():.3f}")
        print(f"  standard AA {s.float().mean():.3f} in {std_s:.1f} s  ({comps})")
        print(f"  aa-rank     {r.float().mean():.3f} in {rank_s:.1f} s")
        print(f"  disagree on {(s != r).sum().item()} images (aa-rank robust, AA not: {(r & ~s).sum().item()}; "
              f"the other way: {(s & ~r).sum().item()}), {gap:.3f} points, speedup {std_s / rank_s:.1f}x",
              flush=True)
    print(f"\naa_fast_speedup {min(speedups):.1f}")
    print(f"aa_fast_max_disagreement {max(gaps):.3f}")


if __name__ == "__main__":
    main()
