"""How close each network family runs to this machine's conv2d peak (issue 16).

For the hand-crafted CNN, a DARTS-space network and an ARNAS network at the demo's size
(configs/demo.yaml: C=8, 5 cells, reductions in cells 0 and 2), a TAM-NAS tiny-block network, one
DARTS supernet search step (the demo's search settings) and one LRNAS subset evaluation, it prints
images/s of a PGD-AT step and of a PGD attack, FLOPs per image, the achieved GFLOP/s and its ratio to
the conv2d peak measured in the same run.

FLOPs are torch's FlopCounterMode count (convs and matmuls, forward and backward; robustnas.nets.size) of
the workload run once in its eager NCHW form; every variant of a workload is credited with those same
FLOPs, so a variant that does more arithmetic (a fused conv) gains nothing from it. Variants of one
workload run interleaved in rounds in this process (A, B, A, B, ...) and each figure is the best round,
so that load on the machine hits them alike. Variants: `old` (the code before issue 16: NCHW
activations, one ReLU per op), `default` (what the code does now: channels_last on CPU, one ReLU per
cell state or MixedOp input) and for attacks `bnfold` (default + models.fast.fold_bn).
`speedup <name>` is default / old; `cnn_ratio <name>` is a family's GFLOP/s over the CNN's.
The last two lines, `aa_fast_speedup` and `aa_fast_max_disagreement`, come from benchmarks/bench_aa_rank.py's
comparison of aa-rank with standard AutoAttack (smallest speedup, largest disagreement in points over a CNN, a
darts_v2 and a PreAct-ResNet briefly PGD-trained; --aa-n test images, default 100; --aa-n 0 skips it).

Run from the repository root: python -m benchmarks.bench_nets [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from robustnas.robustness.attacks import pgd
from robustnas.data.datasets import load_dataset
from robustnas.core.errors import UserError
from robustnas.nets.genotypes import build_network
from robustnas.nets.models import build_model
from robustnas.nets.models.base import set_channels_last
from robustnas.nets.models.fast import compile_model, fold_bn
from robustnas.search import SearchContext, build_strategy
from robustnas.search.lrnas import SubsetAccuracy
from robustnas.nets.size import count_flops, count_flops_of, count_params
from robustnas.nets.spaces.darts import Cell, MixedOp

EPS = 0.1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, repeat: int = 1) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeat


def conv_peak(device: torch.device, rounds: int) -> float:
    """GFLOP/s of the best of several dense 3x3 convs (forward), NCHW and channels_last."""
    best = 0.0
    for c, hw in ((64, 28), (128, 14)):
        x = torch.randn(128, c, hw, hw, device=device)
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
        flops = count_flops_of(lambda: conv(x))
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf, cf = x.contiguous(memory_format=fmt), conv.to(memory_format=fmt)
            with torch.no_grad():
                cf(xf)
                for _ in range(rounds):
                    best = max(best, flops / best_time(lambda: cf(xf), device, 3) / 1e9)
    return best


def old_code(model, old: bool) -> None:
    """Switch `model` between the code before issue 16 (NCHW, one ReLU per op) and now."""
    set_channels_last(model, not old)
    MixedOp.share_relu = Cell.share_relu = not old


def at_step(model, x, y, steps):
    """One PGD-AT step (the Trainer's recipe): PGD-k in eval mode, then a train-mode forward/backward."""
    x_adv = pgd(model, x, y, EPS, steps=steps)
    model.train()
    loss = F.cross_entropy(model(x_adv), y)
    model.zero_grad(set_to_none=True)
    loss.backward()


def attack(model, x, y, steps):
    model.eval()
    pgd(model, x, y, EPS, steps=steps)


def interleaved(variants: dict, device, rounds: int) -> dict[str, float]:
    """Best seconds per variant, the variants run in turn each round (after one untimed warm-up each)."""
    for fn in variants.values():
        fn()
    best = {k: float("inf") for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            best[k] = min(best[k], best_time(fn, device))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist", help="falls back to digits when not installed")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="PGD steps of the AT step (the demo's 3)")
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--only", default="", help="comma-separated subset of cnn,darts,arnas,tiny,supernet,lrnas")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of each AT step (old, default)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    ap.add_argument("--quick", action="store_true", help="batch 64, 2 rounds: a few minutes on 2 idle cores")
    ap.add_argument("--aa-n", type=int, default=100, help="test images of the aa-rank vs AutoAttack comparison (0: skip)")
    ap.add_argument("--aa-train", type=int, default=2000, help="training images of its PGD-AT networks")
    ap.add_argument("--aa-epochs", type=int, default=2, help="PGD-AT epochs of its networks")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.quick:
        args.batch_size, args.rounds = min(args.batch_size, 64), min(args.rounds, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    B = args.batch_size
    try:
        data = load_dataset(args.dataset, subset=4 * B)
    except UserError:
        data = load_dataset("digits", subset=4 * B)
    m = data.meta
    x, y = data.train.x[:B].to(dev), data.train.y[:B].to(dev)
    x2, y2 = data.train.x[B:2 * B].to(dev), data.train.y[B:2 * B].to(dev)

    peak = conv_peak(dev, args.rounds)
    print(f"bench_nets: {m.name} {tuple(m.shape)}, batch {B}, PGD-{args.steps} AT step, PGD-{args.attack_steps} "
          f"attack, device {dev.type}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"best of {args.rounds} rounds")
    print(f"conv2d peak {peak:.1f} GFLOP/s")

    def nets():
        torch.manual_seed(0)
        size = dict(reduction_layers=[0, 2])
        arnas = build_network("arnas_cifar10", 8, 5, m.num_classes, m.shape, m.mean, m.std, **size).to(dev)
        darts = build_network("darts_v2", 8, 5, m.num_classes, m.shape, m.mean, m.std, **size).to(dev)
        cnn = build_model("cnn", m.num_classes, m.shape, m.mean, m.std, params=count_params(darts)).to(dev)
        from robustnas.nets.spaces.tiny import TinySpace
        tiny_geno = TinySpace().decode(TinySpace().sample(np.random.default_rng(0)))
        tiny = build_network(tiny_geno, None, None, m.num_classes, m.shape, m.mean, m.std).to(dev)
        return {"cnn": cnn, "darts": darts, "arnas": arnas, "tiny": tiny}

    only = {s for s in args.only.split(",") if s}
    results: dict[str, dict] = {}
    header = f"{'workload':10} {'variant':8} {'img/s':>8} {'GFLOP/s':>8} {'peak':>5}"
    print(f"\nFLOPs: FlopCounterMode count of the eager NCHW workload (forward + backward), per image\n{header}")

    def report(name, kind, flops, secs, n_img):
        for k, s in secs.items():
            gf = flops / s / 1e9
            print(f"{name + ' ' + kind:10} {k:8} {n_img / s:8.1f} {gf:8.2f} {gf / peak:5.2f}")
        return {k: flops / s / 1e9 for k, s in secs.items()}

    for name, net in nets().items():
        if only and name not in only:
            continue
        print(f"# {name}: {count_params(net)} params, {count_flops(net, tuple(m.shape)) / 1e6:.2f} MFLOP forward/image")
        old_code(net, True)
        f_at = count_flops_of(lambda: at_step(net, x, y, args.steps))
        f_att = count_flops_of(lambda: attack(net, x, y, args.attack_steps))

        def variant(old, fn, model=net):
            def run():
                old_code(model, old)
                fn()
            return run
        at = interleaved({"old": variant(True, lambda: at_step(net, x, y, args.steps)),
                          "default": variant(False, lambda: at_step(net, x, y, args.steps))}, dev, args.rounds)
        net.eval()
        folded = fold_bn(net)
        att = interleaved({"old": variant(True, lambda: attack(net, x, y, args.attack_steps)),
                           "default": variant(False, lambda: attack(net, x, y, args.attack_steps)),
                           "bnfold": variant(False, lambda: attack(folded, x, y, args.attack_steps), folded)},
                          dev, args.rounds)
        results[name] = {"at": report(name, "AT", f_at, at, B), "attack": report(name, "att", f_att, att, B)}
        if args.profile:
            for old in (True, False):
                old_code(net, old)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    at_step(net, x, y, args.steps)
                print(f"{name} AT step, {'old' if old else 'default'} code: top ops by self CPU time")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
        old_code(net, False)
        if args.compile:
            compiled, secs, err = compile_model(net, lambda mdl: at_step(mdl, x, y, args.steps))
            if err:
                print(f"{name} compile failed after {secs:.0f} s, eager fallback: {err}")
            else:
                t = interleaved({"compiled": lambda: at_step(compiled, x, y, args.steps)}, dev, args.rounds)
                results[name]["at"].update(report(name, "AT", f_at, t, B))
                print(f"{name} compile time {secs:.0f} s")

    if not only or "supernet" in only:
        strat = build_strategy("darts", {"C": 4, "layers": 5, "batch_size": 32, "weight_adv": "pgd",
                                         "attack_steps": 2})
        strat.setup(SearchContext(data=data, eps=EPS, device=dev, seed=0, progress=False))
        xs, ys, xa, ya = x[:32], y[:32], x2[:32], y2[:32]
        step = lambda: strat.search_step(xs, ys, xa, ya, lr=0.025)  # noqa: E731
        print(f"# supernet: DARTS search step, C=4, 5 cells, batch 32+32, PGD-2 weight examples")
        old_code(strat.net, True)
        flops = count_flops_of(step)
        secs = interleaved({"old": lambda: (old_code(strat.net, True), step()),
                            "default": lambda: (old_code(strat.net, False), step())}, dev, args.rounds)
        results["supernet"] = {"at": report("supernet", "step", flops, secs, 32)}

    if not only or "lrnas" in only:
        strat = build_strategy("lrnas", {"C": 8, "layers": 5, "contrib_batch_size": 64})
        strat.setup(SearchContext(data=data, eps=EPS, device=dev, seed=0, progress=False))
        net, G = strat.net, 8
        xb, yb = x[:64], y[:64]
        gen = torch.Generator().manual_seed(0)
        n_players = sum(a.numel() for a in net.alphas().values())
        active = torch.rand(G, n_players, generator=gen) > 0.3
        print(f"# lrnas: {G} op subsets of the supernet (C=8, 5 cells, k=4), clean + FGSM on 64 images each")
        old_code(net, True)

        def evaluate():
            SubsetAccuracy(net, xb, yb, EPS)(active)
        flops = count_flops_of(evaluate)
        secs = interleaved({"old": lambda: (old_code(net, True), evaluate()),
                            "default": lambda: (old_code(net, False), evaluate())}, dev, args.rounds)
        results["lrnas"] = {"at": report("lrnas", "eval", flops, secs, G * 2 * len(yb))}

    print()
    cnn = results.get("cnn", {}).get("at", {}).get("default")
    for name, r in results.items():
        gf = r["at"]["default"]
        line = f"speedup {name} {gf / r['at']['old']:.2f}"
        print(line + (f"  (attack, bnfold {r['attack']['bnfold'] / r['attack']['old']:.2f})" if "attack" in r else ""))
        if cnn and name in ("darts", "arnas", "tiny"):
            print(f"cnn_ratio {name} {gf / cnn:.2f}")
    for name, r in results.items():
        print(f"peak_ratio {name} {r['at']['default'] / peak:.2f}")
    if args.aa_n <= 0:
        print("aa_fast_speedup n/a  (--aa-n 0)")
        return
    # aa-rank vs standard AutoAttack on briefly PGD-trained networks of three families (bench_aa_rank's
    # comparison, smaller: --aa-n images, --aa-epochs epochs on --aa-train images)
    from benchmarks.bench_aa_rank import compare_aa_rank, summary_lines

    aa_data = load_dataset(m.name, subset=args.aa_train, seed=0)
    print(f"\naa-rank vs standard AutoAttack: {m.name}, eps {EPS}, n = {min(args.aa_n, len(aa_data.test.y))}, "
          f"PGD-AT {args.aa_epochs} epoch(s) on {len(aa_data.train.y)} images", flush=True)
    res = compare_aa_rank(aa_data, n=args.aa_n, eps=EPS, epochs=args.aa_epochs, device=str(dev),
                          log=lambda line: print(line, flush=True))
    print("\n".join(summary_lines(res)))


if __name__ == "__main__":
    main()
