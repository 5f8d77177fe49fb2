"""What the scripts of this folder share (run them from the repo root with PYTHONPATH=.; Python puts this folder
on sys.path, so `from common import ...` works)."""
import torch


def bn_statistics(net: torch.nn.Module, x: torch.Tensor, batches: int = 4, batch_size: int = 32) -> torch.nn.Module:
    """Give a fresh supernet's BatchNorm running statistics from `batches` batches of x, then eval mode."""
    with torch.no_grad():
        net.train()
        for i in range(0, batches * batch_size, batch_size):
            net(x[i:i + batch_size])
    return net.eval()
