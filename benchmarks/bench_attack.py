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
3. `--demo-aa`: instead of 1 and 2, standard AutoAttack on the demo's final network shape (configs/demo.yaml
   `final:`: darts_v2 genotype, C=8, 5 cells, reductions in cells 0 and 2; Fashion-MNIST), briefly PGD-trained:
   (a) the whole of standard AutoAttack on --aa-n images at batch --aa-n, on the model as it is and on its
   `fold_bn` copy (what evaluate attacks by default), with pyautoattack's per-component clock and whether the
   per-image results agree; (b) how batch size (100/250/500), threads (1/2), folding and channels_last weights
   change the throughput of pyautoattack's APGD-CE (--proxy-iter iterations on --proxy-n images), interleaved in
   rounds, best round. Every timing comes with this process's conv2d peak (benchmarks/bench_nets.conv_peak),
   measured before and after, so that figures from a loaded machine can be read as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from robustnas.robustness.attacks import accuracy, pgd, run_autoattack
from robustnas.nets.models.fast import fold_bn
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
    ap.add_argument("--demo-aa", action="store_true", help="section 3 only (see the docstring)")
    ap.add_argument("--proxy-n", type=int, default=500, help="--demo-aa: images of the APGD-CE throughput probe")
    ap.add_argument("--proxy-iter", type=int, default=10, help="--demo-aa: APGD-CE iterations of the probe")
    ap.add_argument("--skip-full", action="store_true", help="--demo-aa: only the throughput probe")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.demo_aa:
        return demo_autoattack(args, dev)

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


def demo_autoattack(args, dev: torch.device) -> None:
    """Section 3 of the module docstring: standard AutoAttack's cost on the demo's final network."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.bench_nets import conv_peak
    from robustnas.nets.genotypes import build_network

    torch.set_num_threads(1)
    data = load_dataset(args.dataset)
    m = data.meta
    torch.manual_seed(0)
    net = build_network("darts_v2", 8, 5, m.num_classes, m.shape, m.mean, m.std, reduction_layers=[0, 2]).to(dev)
    t0 = time.perf_counter()
    brief_pgd_training(net, data, args.eps, args.train_n, args.train_epochs, dev)
    print(f"darts_v2 C=8, 5 cells, reductions [0, 2], {count_params(net)} params, {m.name}; PGD-5 training, "
          f"{args.train_epochs} epoch(s) on {args.train_n} images ({time.perf_counter() - t0:.0f} s)", flush=True)
    folded = fold_bn(net)
    peaks = [conv_peak(dev, 2)]
    print(f"conv2d peak (1 thread) {peaks[0]:.1f} GFLOP/s", flush=True)

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    n = args.aa_n
    if not args.skip_full and n > 0:  # (a) the whole of standard AutoAttack, model as it is vs folded
        xa, ya = data.test.x[:n].to(dev), data.test.y[:n].to(dev)
        masks = {}
        for name, model in (("folded", folded), ("as-is", net)):
            secs, res = timed(lambda: run_autoattack(model, xa, ya, args.eps, seed=0, batch_size=n))
            with torch.no_grad():
                masks[name] = (net(xa).argmax(1) == ya) & (net(res.x_adv).argmax(1) == ya)
            clock = "; ".join(line.split("robust accuracy after ")[1] for line in res.log
                              if "robust accuracy after " in line)
            print(f"standard AA, {name:6}: {secs:7.1f} s for {n} images = {secs / n:.2f} s/image "
                  f"(1 thread, batch {n}); robust {res.accuracy:.3f}; clock: {clock}", flush=True)
            peaks.append(conv_peak(dev, 2))
            print(f"conv2d peak (1 thread) {peaks[-1]:.1f} GFLOP/s", flush=True)
        diff = (masks["folded"] != masks["as-is"]).sum().item()
        print(f"per-image results of the two AutoAttack runs differ on {diff} of {n} images", flush=True)

    # (b) what batch size, threads, folding and channels_last weights do to APGD-CE's throughput
    xp, yp = data.test.x[:args.proxy_n].to(dev), data.test.y[:args.proxy_n].to(dev)
    variants = {"as-is": net, "folded": folded,
                "folded+cl": fold_bn(net).to(memory_format=torch.channels_last)}
    best: dict[tuple, float] = {}
    for r in range(args.rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for bs in (100, 250, 500):
                for name, model in variants.items():
                    secs, _ = timed(lambda: run_autoattack(model, xp, yp, args.eps, version="custom",
                                                           attacks=["apgd-ce"], seed=0, batch_size=bs,
                                                           n_iter=args.proxy_iter))
                    key = (threads, bs, name)
                    best[key] = min(best.get(key, float("inf")), secs)
                    print(f"  round {r + 1}: {threads} thread(s), batch {bs}, {name}: {secs:.2f} s", flush=True)
        print(f"probe round {r + 1} done", flush=True)
    torch.set_num_threads(1)
    peaks.append(conv_peak(dev, 2))
    ref = best[(1, 100, "as-is")]
    print(f"\nAPGD-CE probe: {args.proxy_iter} iterations on {len(xp)} images, best of {args.rounds} rounds; "
          f"conv2d peaks (1 thread) in this process: {', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s")
    print(f"{'threads':>7} {'batch':>5} {'variant':10} {'s':>7} {'img-iter/s':>10} {'vs 1t/100/as-is':>15}")
    for (threads, bs, name), secs in sorted(best.items()):
        print(f"{threads:7} {bs:5} {name:10} {secs:7.2f} {len(xp) * args.proxy_iter / secs:10.0f} "
              f"{ref / secs:15.2f}")
    top = min(best, key=best.get)
    print(f"best setting: {top[0]} thread(s), batch {top[1]}, {top[2]}: {ref / best[top]:.2f}x the 1-thread "
          f"batch-100 unfolded throughput")


if __name__ == "__main__":
    main()
