"""aa-rank (AutoAttack-rank, not standard AA) against standard AutoAttack on PGD-AT networks of three families.

Trains, with the one Trainer (PGD-AT), a hand-crafted CNN, a small darts_v2 genotype network and a small
PreAct-ResNet, then attacks the first --n test images with standard AutoAttack and with aa-rank (same seed), both
on the network's BatchNorm-folded copy as evaluate attacks it (evaluation.evaluate.attacked_copy). Prints per
network both accuracies, the images where they disagree, the disagreement in points, both wall times and the
speedup; the last two lines are the worst case over the networks (`summary_lines`: smallest speedup over those
that some image resisted APGD-CE on, largest disagreement in points). `compare_aa_rank` is the comparison; benchmarks/bench_nets.py runs it at a smaller size.

    python benchmarks/bench_aa_rank.py [--dataset fashion-mnist] [--n 500] [--epochs 3] [--subset 10000]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

BUILDS = {"cnn": dict(width=0.5), "darts_v2": dict(C=4, layers=3), "preact_resnet": dict(width=0.125)}


def compare_aa_rank(data, nets=tuple(BUILDS), n: int = 500, eps: float = 0.1, epochs: int = 3,
                    targets: int | None = None, seed: int = 0, device: str = "cpu",
                    log: Callable[[str], None] = print) -> list[dict]:
    """For each network family in `nets`: PGD-AT (`epochs` on data's training split), then standard AutoAttack
    and aa-rank on the first `n` test images. Returns one dict a network: name, params, clean, standard and
    aa-rank robust accuracy, their seconds, the images they disagree on, the gap in points (aa-rank - AA) and
    the speedup (AA seconds / aa-rank seconds)."""
    import torch

    from robustnas.core.config import TrainConfig
    from robustnas.evaluation.evaluate import attacked_copy
    from robustnas.nets.arch import build_arch
    from robustnas.nets.size import count_params
    from robustnas.robustness.attacks import AA_RANK_TARGETS, run_autoattack
    from robustnas.training.trainer import Trainer

    targets = AA_RANK_TARGETS if targets is None else targets
    dev = torch.device(device)
    x, y = data.test.x[:n].to(dev), data.test.y[:n].to(dev)
    out = []
    for name in nets:
        torch.manual_seed(seed)
        net, _ = build_arch(name, data.meta, **BUILDS.get(name, {}))
        t0 = time.perf_counter()
        cfg = TrainConfig(epochs=epochs, adv="pgd", attack={"steps": 5}, val_n=200)
        Trainer(net, data, cfg, eps=eps, seed=seed, progress=False, device=device).fit()
        net = net.to(dev).eval()
        train_s = time.perf_counter() - t0
        attacked = attacked_copy(net)
        with torch.no_grad():
            clean = (net(x).argmax(1) == y)

        def robust(x_adv):
            with torch.no_grad():
                return clean & (net(x_adv).argmax(1) == y)

        t0 = time.perf_counter()
        std = run_autoattack(attacked, x, y, eps, seed=seed)
        std_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rank = run_autoattack(attacked, x, y, eps, version="custom", attacks=["apgd-ce", "apgd-t"], seed=seed,
                              n_target_classes=targets)
        rank_s = time.perf_counter() - t0
        s, r = robust(std.x_adv), robust(rank.x_adv)
        res = dict(name=name, params=count_params(net), train_s=train_s, clean=clean.float().mean().item(),
                   standard=s.float().mean().item(), rank=r.float().mean().item(), standard_s=std_s,
                   rank_s=rank_s, disagree=(s != r).sum().item(), rank_only=(r & ~s).sum().item(),
                   standard_only=(s & ~r).sum().item(), gap=100 * (r.float().mean() - s.float().mean()).item(),
                   speedup=std_s / rank_s, components=std.components)
        out.append(res)
        comps = "  ".join(f"{k} {v:.3f}" for k, v in std.components.items())
        log(f"\n{name} ({res['params']} parameters, trained in {train_s:.0f} s): clean {res['clean']:.3f}")
        log(f"  standard AA {res['standard']:.3f} in {std_s:.1f} s  ({comps})")
        log(f"  aa-rank     {res['rank']:.3f} in {rank_s:.1f} s")
        log(f"  disagree on {res['disagree']} images (aa-rank robust, AA not: {res['rank_only']}; the other way: "
            f"{res['standard_only']}), {res['gap']:.3f} points, speedup {res['speedup']:.1f}x")
    return out


def summary_lines(results: list[dict]) -> list[str]:
    """The two last lines: `aa_fast_speedup` (the smallest speedup over the networks that some image resisted
    APGD-CE on: elsewhere both versions stop after APGD-CE and the ratio says nothing) and
    `aa_fast_max_disagreement` (the largest gap in points, over all networks)."""
    informative = [r for r in results if r["components"].get("apgd-ce", 0.0) > 0]
    skipped = [r["name"] for r in results if r not in informative]
    note = f"  (not counted: {', '.join(skipped)}, no image survived APGD-CE)" if skipped else ""
    speed = f"{min(r['speedup'] for r in informative):.1f}" if informative else "n/a"
    return [f"aa_fast_speedup {speed}{note}", f"aa_fast_max_disagreement {max(r['gap'] for r in results):.3f}"]


def main() -> None:
    import torch

    from robustnas.data.datasets import load_dataset
    from robustnas.robustness.attacks import AA_RANK_TARGETS, AA_RANK_TITLE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--subset", type=int, default=10000, help="training images (0: all)")
    ap.add_argument("--n", type=int, default=500, help="test images attacked")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--targets", type=int, default=AA_RANK_TARGETS, help="aa-rank's APGD-T target classes")
    ap.add_argument("--nets", default=",".join(BUILDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)

    data = load_dataset(args.dataset, subset=args.subset or None, seed=args.seed)
    print(f"{args.dataset}, eps {args.eps}, n = {min(args.n, len(data.test.y))}, PGD-AT {args.epochs} epochs on "
          f"{len(data.train.y)} images; {AA_RANK_TITLE}: APGD-CE + APGD-T on {args.targets} targets", flush=True)
    results = compare_aa_rank(data, args.nets.split(","), args.n, args.eps, args.epochs, args.targets, args.seed,
                              args.device, log=lambda s: print(s, flush=True))
    print("\n" + "\n".join(summary_lines(results)))


if __name__ == "__main__":
    main()
