"""DSRNA's default cb metric, the certified radius, on a supernet: for each bound method the radius bracket
of each image (bisection in log eps to 10%), the time per image of the bracket alone and of the metric with
its alpha gradient (implicit-function rule), the mean radius and the L1 norm of its alpha gradient; beside
it the margin bound at eps itself (the `margin` form). BatchNorm statistics from 4 batches. The labels are
the supernet's own predictions (a fresh supernet is mostly wrong, and a misclassified image has radius 0).

Usage (repo root): PYTHONPATH=. python benchmarks/dsrna_bounds/radius_demo.py C LAYERS N EPS DATASET METHODS [SEARCH_RUN]
e.g. `4 5 2 0.1 fashion-mnist ibp,crown-ibp` (the demo's search shape; docs/dsrna.md quotes it).
SEARCH_RUN: a `robustnas search` run directory whose supernet.pt is loaded instead (labels: the true ones).
"""
import sys
import time

import torch

from common import bn_statistics
from robustnas.data.datasets import load_dataset
from robustnas.robustness.certify import margin_lower_bound, radius_bracket
from robustnas.search import SearchContext, build_strategy
from robustnas.search.dsrna import certified_bound_metric

torch.set_num_threads(1)
C, L, n, eps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = load_dataset(sys.argv[5], subset=500, seed=0)
methods = sys.argv[6].split(",")
strat = build_strategy("dsrna", dict(C=C, layers=L, metric="cb", cb_n=n, epochs=1))
strat.setup(SearchContext(data=data, eps=eps, seed=0, progress=False))
net = strat.net
x = data.val.x[:n]
if len(sys.argv) > 7:
    state = torch.load(f"{sys.argv[7]}/supernet.pt", map_location="cpu")
    net.load_state_dict(state["net"] if "net" in state else state)
    y = data.val.y[:n]
else:
    bn_statistics(net, data.train.x)
    with torch.no_grad():
        y = net.eval()(x).argmax(1)
net.eval()
print(f"supernet C={C} layers={L} input {tuple(x.shape[1:])} eps {eps} n={n}")
for method in methods:
    t0 = time.perf_counter()
    lo, hi = radius_bracket(net, x, y, method, eps, rtol=0.1)
    t1 = time.perf_counter()
    r = certified_bound_metric(net, x, y, eps, method, "radius", rtol=0.1)
    g = torch.autograd.grad(r, strat.alphas, allow_unused=True)
    t2 = time.perf_counter()
    with torch.no_grad():
        margin = margin_lower_bound(net, x, y, eps, method)
    print(f"{method:10s} radius in [{', '.join(f'{a:.3g}-{b:.3g}' for a, b in zip(lo.tolist(), hi.tolist()))}] "
          f"mean {r.item():.3g}; bracket {(t1 - t0) / n:.1f} s/image, metric with gradient {(t2 - t1) / n:.1f} "
          f"s/image; grad L1 {sum(float(gi.abs().sum()) for gi in g if gi is not None):.3g}; margin bound at eps "
          f"{[f'{v:.3g}' for v in margin.tolist()]}", flush=True)
