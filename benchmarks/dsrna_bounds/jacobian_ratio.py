"""Jacobian metric: the projection estimate (mean of 20 draws) over the exact one, Linf and L2, digits and
Fashion-MNIST supernets (C=4, 3 cells)."""
import torch
torch.set_num_threads(1)
from robustnas.data.datasets import load_dataset
from robustnas.nets.spaces.darts import SuperNet
from robustnas.robustness.jacobian import jacobian_metric
for name in ["digits", "fashion-mnist"]:
    data = load_dataset(name, subset=300)
    m = data.meta
    torch.manual_seed(0)
    net = SuperNet(4, 10, 3, m.shape, m.mean, m.std)
    with torch.no_grad():
        net.train()
        for i in range(0, 96, 32):
            net(data.train.x[i:i + 32])
    net.eval()
    x = data.val.x[:16]
    for norm in ["Linf", "L2"]:
        ex = jacobian_metric(net, x, 0.1, norm, "exact", create_graph=False).item()
        g = torch.Generator().manual_seed(0)
        pr = torch.stack([jacobian_metric(net, x, 0.1, norm, "projection", generator=g, create_graph=False) for _ in range(20)])
        print(name, norm, f"exact {ex:.4g} projection {pr.mean().item():.4g} ratio {pr.mean().item() / ex:.3f} (sd over 20 draws {pr.std().item() / ex:.3f})", flush=True)
