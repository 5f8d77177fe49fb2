"""IBP vs CROWN time per image for certified accuracy + radius (as robustnas evaluate runs them), on a darts_v2
network trained briefly on digits. Usage: certify_speed.py C LAYERS N METHODS [EPOCHS]; METHODS e.g.
ibp,crown-ibp,crown-fwd,crown:30,crown (crown:W = CROWN intermediate bounds with window W). Issue 16's figures
(docs/performance.md, docs/dsrna.md): certify_speed.py 16 8 10 ibp,crown-fwd 6."""
import sys, time, torch
torch.set_num_threads(1)
from robustnas.data.datasets import load_dataset
from robustnas.nets.genotypes import build_network
from robustnas.robustness.certify import certified_accuracy, certified_radius
data = load_dataset("digits")
m = data.meta
torch.manual_seed(0)
C, L, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
net = build_network("darts_v2", C, L, 10, m.shape, m.mean, m.std)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
net.train()
for ep in range(int(sys.argv[5]) if len(sys.argv) > 5 else 1):
    for i in range(0, len(data.train.x), 64):
        out = net(data.train.x[i:i+64]); out = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(out, data.train.y[i:i+64]); opt.zero_grad(); loss.backward(); opt.step()
net.eval()
x, y = data.test.x[:n], data.test.y[:n]
print("clean acc", (net(x).argmax(1) == y).float().mean().item())
for spec in sys.argv[4].split(","):  # a method, or crown:WINDOW
    meth, _, w = spec.partition(":")
    w = int(w) if w else None
    t = time.time()
    acc = certified_accuracy(net, x, y, 0.1, meth, window=w)
    rad = certified_radius(net, x, y, meth, max_eps=0.1, tol=0.1 / 200, window=w)
    print(spec, f"{(time.time()-t)/n:.2f} s/image", "cert acc", acc, "mean radius", rad.mean().item(), flush=True)
