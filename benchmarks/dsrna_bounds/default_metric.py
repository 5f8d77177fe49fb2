"""The default cb metric on a tiny digits supernet at eps 0.1: value, time and alpha gradient, beside IBP,
CROWN-IBP and a PGD-50 margin. Usage: default_metric.py "dict(C=2, layers=3)" [DATASET] (extra dsrna settings)."""
import sys, time, torch, resource
torch.set_num_threads(1)
from robustnas.data.datasets import load_dataset
from robustnas.search import SearchContext, build_strategy
from robustnas.robustness.certify import margin_lower_bound
from robustnas.robustness.attacks import pgd
data = load_dataset(sys.argv[2] if len(sys.argv) > 2 else "digits", subset=200, seed=0)
kw = dict(C=4, layers=3, batch_size=16, epochs=2, max_batches_per_epoch=2, val_n=16, val_steps=1, val_metric_n=8, metric="cb")
kw.update(eval(sys.argv[1]) if len(sys.argv) > 1 else {})
strat = build_strategy("dsrna", kw)
strat.setup(SearchContext(data=data, eps=0.1, seed=3, progress=False))
with torch.no_grad():
    strat.net.train(); strat.net(data.train.x[:32])
x, y = data.train.x[:4], data.train.y[:4]
t = time.time()
r, parts = strat.metric(strat.net, x, y)
g = torch.autograd.grad(r, strat.alphas)
print("R", r.item(), f"{time.time()-t:.1f}s", [float(gi.abs().sum()) for gi in g], "maxrss GB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6)
net = strat.net.eval()
n = strat.cfg.cb_n
with torch.no_grad():
    ibp = margin_lower_bound(net, x[:n], y[:n], 0.1, "ibp")
    ci = margin_lower_bound(net, x[:n], y[:n], 0.1, "crown-ibp")
    cw = margin_lower_bound(net, x[:n], y[:n], 0.1, "crown", window=strat.cfg.cb_window)
xa = pgd(net, x[:n], y[:n], 0.1, steps=50, loss="cw" if "cw" in __import__("robustnas.robustness.attacks", fromlist=["LOSSES"]).LOSSES else "ce")
with torch.no_grad():
    z = net(xa); m = z.gather(1, y[:n, None]).squeeze(1) - z.scatter(1, y[:n, None], float("-inf")).max(1).values
print("ibp", ibp.numpy(), "crown-ibp", ci.numpy(), "crown(window)", cw.numpy(), "pgd margin", m.numpy())
