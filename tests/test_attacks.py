"""PGD / FGSM: inside the ball and the pixel box, lower accuracy, keep the caller's mode, leave no gradients."""

import pytest
import torch
from torch import nn

from robustnas.robustness.attacks import accuracy, fgsm, margin_loss, pgd, robust_accuracy


def trained_mlp(seed: int = 0):
    """A small MLP fitted on a separable 2-class problem in [0,1]^(1x4x4), so attacks have work to do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :8].mean(1) > x.flatten(1)[:, 8:].mean(1)).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, x, y


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_pgd_stays_in_ball_and_box_and_lowers_accuracy(norm, eps):
    model, x, y = trained_mlp()
    clean = accuracy(model, x, y)
    x_adv = pgd(model, x, y, eps, steps=20, norm=norm, restarts=2)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        adv = (model(x_adv).argmax(1) == y).float().mean().item()
    assert clean > 0.9
    assert adv < clean - 0.2


def test_more_steps_is_not_weaker_than_fgsm():
    model, x, y = trained_mlp()
    eps = 0.08
    acc_fgsm = robust_accuracy(model, x, y, lambda a, b: fgsm(model, a, b, eps))
    torch.manual_seed(0)
    acc_pgd = robust_accuracy(model, x, y, lambda a, b: pgd(model, a, b, eps, steps=20, restarts=2))
    assert acc_pgd <= acc_fgsm


def test_margin_loss_and_restarts_keep_the_worst_case():
    model, x, y = trained_mlp()
    torch.manual_seed(1)
    one = robust_accuracy(model, x, y, lambda a, b: pgd(model, a, b, 0.05, steps=5, loss="margin"))
    torch.manual_seed(1)
    # the first restart repeats the single run exactly; further restarts can only remove correct samples
    three = robust_accuracy(model, x, y, lambda a, b: pgd(model, a, b, 0.05, steps=5, loss="margin",
                                                          restarts=3))
    assert three <= one


def test_margin_loss_sign():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(margin_loss(logits, y), torch.tensor([-2.0, 2.0]))


def test_attack_restores_mode_and_leaves_no_parameter_gradients():
    model, x, y = trained_mlp()
    model.zero_grad(set_to_none=True)
    model.train()
    running = model[2].running_mean.clone()
    pgd(model, x[:16], y[:16], 0.1, steps=3)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    # attacks run in eval mode, so BatchNorm statistics were not updated by the attack
    assert torch.equal(running, model[2].running_mean)
    model.eval()
    pgd(model, x[:16], y[:16], 0.1, steps=3)
    assert not model.training


def test_zero_eps_returns_clean_input():
    model, x, y = trained_mlp()
    assert torch.equal(pgd(model, x, y, 0.0), x)
