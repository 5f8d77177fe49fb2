"""Images/s of the Trainer's PGD-AT step vs a plain hand-written PyTorch loop, same model, batch and steps.

Prints both and the ratio (goal >= 0.95). Both loops run in this process, interleaved in rounds so that
machine noise hits them alike; each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from robustnas.core.config import TrainConfig
from robustnas.data.datasets import load_dataset
from robustnas.nets.models import build_model
from robustnas.training.trainer import Trainer


def plain_pgd_at_step(model, opt, x, y, eps, alpha, steps):
    """The reference: Madry PGD-AT written out by hand."""
    model.eval()
    delta = (torch.rand_like(x) * 2 - 1) * eps
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += alpha * g.sign()
            delta.copy_((x + delta.clamp(-eps, eps)).clamp(0, 1) - x)
    model.train()
    loss = F.cross_entropy(model((x + delta).detach()), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=8, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    try:
        data = load_dataset(args.dataset, subset=args.batch_size * args.iters)
    except Exception:
        data = load_dataset("digits")
    meta = data.meta
    eps = 0.1
    alpha = 2.5 * eps / args.steps
    dev = torch.device(args.device)
    xs = data.train.x[: args.batch_size * args.iters].to(dev)
    ys = data.train.y[: args.batch_size * args.iters].to(dev)
    batches = [(xs[i:i + args.batch_size], ys[i:i + args.batch_size]) for i in range(0, len(xs), args.batch_size)]

    def make():
        torch.manual_seed(0)
        return build_model(args.arch, meta.num_classes, meta.shape, meta.mean, meta.std,
                           params=args.params).to(dev)

    cfg = TrainConfig.model_validate({"adv": "pgd", "batch_size": args.batch_size, "lr": 0.01,
                                      "attack": {"eps": str(eps), "steps": args.steps}})
    ours_model = make()
    trainer = Trainer(ours_model, data, cfg, eps, device=dev, progress=False)
    ref_model = make()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def time_ours():
        sync(); t = time.perf_counter()
        for x, y in batches:
            trainer.train_step(x, y, 0.01)
        sync(); return len(xs) / (time.perf_counter() - t)

    def time_ref():
        sync(); t = time.perf_counter()
        for x, y in batches:
            plain_pgd_at_step(ref_model, ref_opt, x, y, eps, alpha, args.steps)
        sync(); return len(xs) / (time.perf_counter() - t)

    time_ours(); time_ref()  # warm-up
    ours, ref = [], []
    for _ in range(args.rounds):
        ours.append(time_ours())
        ref.append(time_ref())
    o, r = statistics.median(ours), statistics.median(ref)
    from robustnas.nets.size import count_params
    print(f"bench_train: {meta.name}, {args.arch} ({count_params(ours_model)} params), batch {args.batch_size}, "
          f"PGD-{args.steps} AT, device {dev.type}, torch threads {torch.get_num_threads()}")
    print(f"  plain loop : {r:8.1f} images/s")
    print(f"  Trainer    : {o:8.1f} images/s")
    print(f"  ratio      : {o / r:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
