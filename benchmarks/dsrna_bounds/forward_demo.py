"""The crown-fwd bound (forward intermediate bounds, backward final bound) on a DSRNA supernet, beside IBP and
CROWN-IBP: value, time and peak memory per image, the L1 norm of its gradient w.r.t. the alphas, and the margin
a PGD-50 margin attack finds (soundness: bound <= attacked margin). BatchNorm statistics from 4 batches.

Usage (repo root): PYTHONPATH=. python benchmarks/dsrna_bounds/forward_demo.py C LAYERS N EPS [DATASET [SEARCH_RUN]]
SEARCH_RUN: a `robustnas search` run directory whose supernet.pt is loaded instead (after a cb search).
docs/dsrna.md quotes it at the demo's search shape: 4 5 2 0.1 fashion-mnist.
"""
import resource, sys, time, torch
torch.set_num_threads(1)
from robustnas.data.datasets import load_dataset
from robustnas.search import SearchContext, build_strategy
from robustnas.robustness.certify import margin_lower_bound
from robustnas.robustness.attacks import pgd
from common import bn_statistics


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


C, L, n, eps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = load_dataset(sys.argv[5] if len(sys.argv) > 5 else "digits", subset=500, seed=0)
strat = build_strategy("dsrna", dict(C=C, layers=L, metric="cb", cb_method="crown-fwd", cb_n=n, epochs=1))
strat.setup(SearchContext(data=data, eps=eps, seed=0, progress=False))
net = strat.net
if len(sys.argv) > 6:
    state = torch.load(f"{sys.argv[6]}/supernet.pt", map_location="cpu")
    net.load_state_dict(state["net"] if "net" in state else state)
    net.eval()
else:
    bn_statistics(net, data.train.x)
x, y = data.val.x[:n], data.val.y[:n]
print(f"supernet C={C} layers={L} input {tuple(x.shape[1:])} eps {eps} n={n}; maxrss before {rss_gb():.2f} GB")
for method in ("ibp", "crown-ibp", "crown-fwd"):
    t = time.perf_counter()
    b = margin_lower_bound(net, x, y, eps, method)
    r = b.mean()
    g = torch.autograd.grad(r, strat.alphas)
    dt = time.perf_counter() - t
    print(f"{method:10s} bound {[f'{v:.4g}' for v in b.tolist()]} {dt / n:.1f} s/image (with alpha gradient) "
          f"grad L1 {sum(float(gi.abs().sum()) for gi in g):.4g} maxrss {rss_gb():.2f} GB", flush=True)
with torch.no_grad():
    t = time.perf_counter()
    b = margin_lower_bound(net, x, y, eps, "crown-fwd")
    print(f"crown-fwd without gradient {(time.perf_counter() - t) / n:.1f} s/image")
xa = pgd(net, x, y, eps, steps=50, loss="cw", restarts=1)
with torch.no_grad():
    z = net(xa)
    m = z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], float("-inf")).max(1).values
    z0 = net(x)
    m0 = z0.gather(1, y[:, None]).squeeze(1) - z0.scatter(1, y[:, None], float("-inf")).max(1).values
print("clean margin", [f"{v:.4g}" for v in m0.tolist()], "PGD-50 margin", [f"{v:.4g}" for v in m.tolist()])
