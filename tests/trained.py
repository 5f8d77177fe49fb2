"""Small trained models shared by test files (imported, not fixtures: each file keeps its own scope)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustnas.robustness.attacks import pgd
from robustnas.nets.models import build_model

EPS = 0.1


def fit_small_cnn(data, adversarial: bool, seed: int = 0, epochs: int = 5):
    """A 9k-parameter CNN, standard or PGD-5 adversarial training (Adam; about a second each)."""
    m = data.meta
    torch.manual_seed(seed)
    model = build_model("cnn", m.num_classes, m.shape, m.mean, m.std, width=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(data.train.y), generator=g)
        for i in range(0, len(order), 64):
            x, y = data.train.x[order[i:i + 64]], data.train.y[order[i:i + 64]]
            if adversarial:
                x = pgd(model, x, y, EPS, steps=5, generator=g)
            model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()
