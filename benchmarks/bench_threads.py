"""Speed beside a busy process: torch's thread count and OpenMP's wait policy (issue 25).

On a 2-core machine one busy single-threaded process beside a 2-thread run costs that run half a core, but
it made the demo's search epoch 4x slower (10 min 15 s against 2 min 36 s): OpenMP's worker threads spin at
the end of every parallel region while the thread that was descheduled waits for a core, and these networks
run thousands of tiny parallel regions a step. This runs one workload (a PGD-3 adversarial-training step of
the demo-sized DARTS network, darts_v2 C=8, 5 cells, 28x28, batch 64) in fresh processes under each setting,
alone and beside one busy single-threaded process, and prints img/s and the slowdown beside the busy process
(`slowdown <setting> <x.xx>`, alone / beside). The settings:

- `spin`: libgomp's default when OMP_WAIT_POLICY is unset (spin up to 300,000 iterations at a barrier), 2
  threads; GOMP_SPINCOUNT=300000 says so explicitly, since `import robustnas` would otherwise set PASSIVE
- `spin10k`, `spin1k`, `spin100`: spin 10,000 / 1,000 / 100 iterations, then sleep (GOMP_SPINCOUNT), 2 threads
- `passive`: OMP_WAIT_POLICY=PASSIVE (sleep at once), 2 threads
- `1thread`: one torch thread (no barriers to wait at)
- `default`: what `import robustnas` sets when the variables are unset (robustnas/__init__.py)

A reference figure measured in the same run: `alone` img/s of each setting on the idle machine, so the
cost of each setting when nothing else runs is visible too.

    python benchmarks/bench_threads.py [--steps 6] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SETTINGS = {
    "spin": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000", "threads": "2"},
    "spin10k": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000", "threads": "2"},
    "spin1k": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "1000", "threads": "2"},
    "spin100": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "100", "threads": "2"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None, "threads": "2"},
    "1thread": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, "threads": "1"},
    "default": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, "threads": ""},
}

WORKLOAD = r"""
import sys, time
import robustnas  # sets the defaults under test (before torch is imported)
import torch, torch.nn.functional as F
from robustnas.nets.genotypes import build_network
from robustnas.robustness.attacks import pgd
threads, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(int(threads))
torch.manual_seed(0)
model = build_network("darts_v2", 8, 5, 10, (1, 28, 28), [0.5], [0.25]).train()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
def step():
    xa = pgd(model, x, y, 0.1, steps=3)
    opt.zero_grad(); F.cross_entropy(model(xa), y).backward(); opt.step()
step()
t = time.perf_counter()
for _ in range(steps):
    step()
print(steps * batch / (time.perf_counter() - t), torch.get_num_threads())
"""


def run(setting: dict, steps: int, batch: int) -> tuple[float, int]:
    env = dict(os.environ)
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        env.pop(var, None)
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if setting[var] is not None:
            env[var] = setting[var]
    out = subprocess.run([sys.executable, "-c", WORKLOAD, setting["threads"], str(steps), str(batch)],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated settings (default: all)")
    args = ap.parse_args()
    names = [n for n in SETTINGS if not args.only or n in args.only.split(",")]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the run")
    alone = {n: run(SETTINGS[n], args.steps, args.batch) for n in names}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        beside = {n: run(SETTINGS[n], args.steps, args.batch) for n in names}
    finally:
        busy.kill()
    for n in names:
        print(f"{n:<8} threads {alone[n][1]}  alone {alone[n][0]:6.1f} img/s  beside a busy process "
              f"{beside[n][0]:6.1f} img/s")
    for n in names:
        print(f"slowdown {n} {alone[n][0] / beside[n][0]:.2f}")
    ref = alone.get("spin")
    if ref:
        for n in names:
            print(f"alone_vs_spin {n} {alone[n][0] / ref[0]:.2f}")


if __name__ == "__main__":
    main()
