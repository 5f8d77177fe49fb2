"""Attack speed: our PGD-20 against a plain hand-written PGD loop, and AutoAttack's cost for the demo model.

1. Images/s of `robustnas.robustness.attacks.pgd` (20 steps, Linf) vs the same attack written out by hand, on the same
   model and images; both run in this process, interleaved in rounds so machine noise hits them alike;
   each figure is the median over rounds. Prints both and the ratio (goal >= 0.95).
2. Seconds per 1000 images of standard AutoAttack (pyautoattack, through our adapter) on the demo model, a
   `cnn` at 100k parameters on Fashion-MNIST (digits if it is not installed). Its cost depends on how many
   images stay robust, so the model is briefly PGD-trained first (or pass --run-dir runs/demo); measured on
   --aa-n images and scaled linearly to 1000, which the output says. The default is 50 images, not more:
   for this model (31 MFLOPs per image) each robust image costs APGD-T and FAB-T 900 gradient steps and
   Square 5000 queries, i.e. tens of seconds per robust image on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from robustnas.robustness.attacks import accuracy, pgd, run_autoattack
from robustnas.data.datasets import load_dataset
from robustnas.nets.models import build_model
from robustnas.nets.size import count_params


def plain_pgd(model, x, y, eps, alpha, steps, generator):
    """The reference: Linf PGD with a random start, written out by hand."""
    delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += alpha * g.sign()
            delta.copy_((x + delta.clamp(-eps, eps)).clamp(0, 1) - x)
    return (x + delta).detach()


def brief_pgd_training(model, data, eps, n, epochs, device, seed=0):
    """A few minutes at most: PGD-5 adversarial training on n images, so some images resist attacks."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = data.train.x[:n], data.train.y[:n]
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(order), 128):
            x, y = x_all[order[i:i + 128]].to(device), y_all[order[i:i + 128]].to(device)
            x = pgd(model, x, y, eps, steps=5)
            model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--params", default="100k")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=128, help="images per PGD round")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--aa-n", type=int, default=50, help="images AutoAttack is timed on (0: skip)")
    ap.add_argument("--train-n", type=int, default=2000, help="images of the brief PGD training (0: untrained)")
    ap.add_argument("--train-epochs", type=int, default=1)
    ap.add_argument("--run-dir", default=None, help="time AutoAttack on this run's model instead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)

    try:
        data = load_dataset(args.dataset)
    except Exception as e:  # noqa: BLE001 - a benchmark falls back rather than stops
        print(f"{args.dataset} unavailable ({e}); using digits")
        data = load_dataset("digits")
    meta = data.meta
    torch.manual_seed(0)
    model = build_model("cnn", meta.num_classes, meta.shape, meta.mean, meta.std, params=args.params).to(dev).eval()
    print(f"model: cnn {count_params(model)} params on {meta.name} {meta.shape}, device {dev}, "
          f"{torch.get_num_threads()} threads")

    # ---------------------------------------------------------------------------------- PGD-20 throughput
    steps, eps = 20, args.eps
    alpha = 2.5 * eps / steps
    x, y = data.test.x[:args.n].to(dev), data.test.y[:args.n].to(dev)
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_ours():
        g = torch.Generator(device=dev).manual_seed(0)
        return [pgd(model, xb, yb, eps, steps=steps, step_size=alpha, generator=g) for xb, yb in batches]

    def run_plain():
        g = torch.Generator(device=dev).manual_seed(0)
        return [plain_pgd(model, xb, yb, eps, alpha, steps, g) for xb, yb in batches]

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return len(x) / (time.perf_counter() - t0), out

    g0 = torch.Generator(device=dev).manual_seed(0)  # warm-up on one batch
    pgd(model, *batches[0], eps, steps=2, generator=g0), plain_pgd(model, *batches[0], eps, alpha, 2, g0)
    ours, plain = [], []
    for r in range(args.rounds):
        order = (("ours", run_ours), ("plain", run_plain)) if r % 2 == 0 else (("plain", run_plain), ("ours", run_ours))
        for name, fn in order:
            ips, out = timed(fn)
            (ours if name == "ours" else plain).append(ips)
    adv_ours, adv_plain = torch.cat(run_ours()), torch.cat(run_plain())
    same = torch.equal(adv_ours, adv_plain)
    med_ours, med_plain = statistics.median(ours), statistics.median(plain)
    print(f"PGD-20 ours:  {med_ours:8.1f} images/s (median of {args.rounds} rounds, {len(x)} images, "
          f"batch {args.batch_size})")
    print(f"PGD-20 plain: {med_plain:8.1f} images/s")
    print(f"ratio ours/plain: {med_ours / med_plain:.3f} (goal >= 0.95); identical adversarial images: {same}")

    # ---------------------------------------------------------------------------------- AutoAttack cost
    if args.aa_n <= 0:
        return
    if args.run_dir:
        from robustnas.nets.arch import load_model

        model, _ = load_model(args.run_dir, device=str(dev))
        model.eval()
        what = f"the model of {args.run_dir}"
    elif args.train_n > 0:
        t0 = time.perf_counter()
        brief_pgd_training(model, data, eps, args.train_n, args.train_epochs, dev)
        what = (f"the demo-sized model after {args.train_epochs} epoch(s) of PGD-5 training on {args.train_n} "
                f"images ({time.perf_counter() - t0:.0f} s)")
    else:
        what = "the untrained demo-sized model"
    xa, ya = data.test.x[:args.aa_n].to(dev), data.test.y[:args.aa_n].to(dev)
    clean = accuracy(model, xa, ya)
    sync()
    t0 = time.perf_counter()
    result = run_autoattack(model, xa, ya, eps, seed=0, batch_size=250)
    sync()
    seconds = time.perf_counter() - t0
    print(f"AutoAttack (standard, Linf eps {eps:g}) on {what}: clean {clean:.3f}, robust {result.accuracy:.3f}")
    print("  components (cumulative robust accuracy): "
          + ", ".join(f"{k} {v:.3f}" for k, v in result.components.items()))
    times = [line.split("robust accuracy after ")[1] for line in result.log if "robust accuracy after " in line]
    print("  pyautoattack's clock (cumulative): " + "; ".join(times))
    print(f"AutoAttack: {seconds:.1f} s for {len(xa)} images -> {seconds * 1000 / len(xa):.0f} s per 1000 images "
          f"(measured on {len(xa)} and scaled linearly; the cost grows with the number of robust images)")


if __name__ == "__main__":
    main()
