"""Margin bound of a supernet (BN statistics from 4 batches) by CROWN with windowed intermediate bounds, then
IBP and CROWN-IBP. Usage: window.py C LAYERS N EPS WINDOWS(comma list of numbers, full, fwd) [DATASET]; fwd is
crown-fwd (forward intermediate bounds); run from the repo root
with PYTHONPATH=. (docs/dsrna.md)."""
import sys, time, torch
torch.set_num_threads(1)
from robustnas.data.datasets import load_dataset
from robustnas.nets.spaces.darts import SuperNet
import robustnas.robustness.certify as cert
from common import bn_statistics
data = load_dataset(sys.argv[6] if len(sys.argv) > 6 else "digits", subset=500)
m = data.meta
torch.manual_seed(0)
C, L, n, eps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
net = SuperNet(C, 10, L, m.shape, m.mean, m.std)
bn_statistics(net, data.train.x)
x, y = data.val.x[:n], data.val.y[:n]
for w in sys.argv[5].split(","):
    method = "crown-fwd" if w == "fwd" else "crown"
    w = None if w in ("full", "fwd") else int(w)
    t = time.time()
    with torch.no_grad():
        b = cert.margin_lower_bound(net, x, y, eps, method, window=w)
    print(method, w, f"{time.time()-t:.1f}s", b.numpy(), flush=True)
with torch.no_grad():
    print("ibp", cert.margin_lower_bound(net, x, y, eps, "ibp").numpy(), "crown-ibp", cert.margin_lower_bound(net, x, y, eps, "crown-ibp").numpy())
