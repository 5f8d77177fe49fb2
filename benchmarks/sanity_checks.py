"""The evaluation's sanity checks on honest and deliberately gradient-masked models (docs/evaluation.md).

Trains a small CNN on a dataset twice with the one Trainer (standard and PGD-AT), then evaluates on the
first --n test images: each network as it is, behind a non-differentiable input quantisation (8 levels),
with its logits multiplied by 1e4 (the cross-entropy saturates), and the PGD-AT network once more with a
PGD-20 whose step is too small to converge (--small-step). Prints each check's verdict per model and the
uniform-noise accuracy at the large_eps radius (what a random start there does on its own).

    python benchmarks/sanity_checks.py [--dataset digits] [--n 200] [--epochs 5] [--square 0]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    from torch import nn

    from robustnas.core.config import TrainConfig
    from robustnas.data.datasets import load_dataset
    from robustnas.evaluation.evaluate import evaluate_model
    from robustnas.nets.models import build_model
    from robustnas.training.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--subset", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--n", type=int, default=200, help="test images evaluated")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--square", type=int, default=0, help="Square queries (0: no black-box attack)")
    ap.add_argument("--small-step", type=float, default=0.006, help="PGD-20 step of the unconverged case")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    class RoundInput(nn.Module):
        def forward(self, x):
            return torch.round(x * 7) / 7

    class ScaleLogits(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x) * 1e4

    data = load_dataset(args.dataset, subset=args.subset, seed=args.seed)
    m = data.meta
    nets = {}
    for adv in ("none", "pgd"):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        net = build_model("cnn", m.num_classes, m.shape, m.mean, m.std, width=0.25)
        cfg = TrainConfig(epochs=args.epochs, adv=adv, attack={"steps": 5}, val_n=200)
        Trainer(net, data, cfg, eps=args.eps, seed=args.seed, progress=False).fit()
        nets["standard" if adv == "none" else "pgd-at"] = net.eval()
        print(f"trained {adv}: {time.perf_counter() - t0:.0f} s", flush=True)

    x, y = data.test.x[:args.n], data.test.y[:args.n]
    attacks = ("fgsm", "pgd20") + (("square",) if args.square else ())
    options = {"square": {"n_queries": args.square}} if args.square else {}
    cases = []
    for name, net in nets.items():
        cases += [(name, net, options), (f"{name} quantised", nn.Sequential(RoundInput(), net).eval(), options),
                  (f"{name} saturated", ScaleLogits(net).eval(), options)]
    cases.append(("pgd-at, PGD-20 step %g" % args.small_step, nets["pgd-at"],
                  {**options, "pgd20": {"step_size": args.small_step}}))
    print(f"{args.dataset}, eps {args.eps}, n = {args.n}, attacks {', '.join(attacks)}")
    for name, model, opts in cases:
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            noisy = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.5).clamp(0, 1)
            noise_acc = ((model(x).argmax(1) == y) & (model(noisy).argmax(1) == y)).float().mean().item()
        r = evaluate_model(model, x, y, args.eps, attacks=attacks, progress=False, attack_options=opts,
                           seed=args.seed)
        failed = [k for k, v in r["sanity"].items() if v["status"] == "fail"]
        acc = "  ".join(f"{k} {v:.3f}" for k, v in r["robust_acc"].items())
        print(f"\n{name}: clean {r['clean_acc']:.3f}  {acc}  uniform noise at 0.5: {noise_acc:.3f}")
        print(f"  failed: {', '.join(failed) or 'none'}")
        for k, v in r["sanity"].items():
            print(f"    {k:22s} {v['status']:4s}  {v['detail']}")


if __name__ == "__main__":
    main()
