"""White-box attacks: the one PGD (Linf / L2, random start, restarts, any loss) and FGSM as its one-step case.

Training, search and evaluation all call `pgd`, so a fix or speed-up here reaches every number we report.
Every attack puts the model in eval mode, restores the caller's mode, and leaves no parameter gradients
(gradients are taken with `torch.autograd.grad` with respect to the perturbation only).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["Linf", "L2"]
LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits, y) -> per-sample loss to MAXIMISE


# ------------------------------------------------------------------------------------------------- losses
def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """CW margin: max_{j != y} z_j - z_y (positive once the sample is misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "margin": margin_loss, "cw": margin_loss}


def resolve_loss(loss: Union[str, LossFn]) -> LossFn:
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        from robustnas.errors import UserError

        raise UserError(f"unknown attack loss {loss!r}; known: {', '.join(LOSSES)}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration of an attack, then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _l2(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _random_start(x: Tensor, eps: float, norm: Norm, generator: Optional[torch.Generator]) -> Tensor:
    if norm == "Linf":
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    return direction / _l2(direction) * (radius * eps).view(-1, *([1] * (x.dim() - 1)))


def _project(delta: Tensor, eps: float, norm: Norm) -> Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _l2(delta)).clamp(max=1.0)


def default_step_size(eps: float, steps: int, norm: Norm = "Linf") -> float:
    """Madry et al.'s rule of thumb, 2.5 * eps / steps (one step: eps itself)."""
    return eps if steps == 1 else 2.5 * eps / steps


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    step_size: Optional[float] = None,
    norm: Norm = "Linf",
    random_start: bool = True,
    restarts: int = 1,
    loss: Union[str, LossFn] = "ce",
    clip: tuple[float, float] = (0.0, 1.0),
    generator: Optional[torch.Generator] = None,
    keep_mode: bool = False,
    init: Optional[Tensor] = None,
) -> Tensor:
    """Projected gradient ascent on `loss` inside the `norm` ball of radius `eps` around x, within `clip`.

    With several restarts, each sample keeps the restart that misclassifies it, else the one of highest loss.
    `keep_mode=True` leaves the model in the caller's mode (some training recipes attack in train mode).
    `init` replaces the random start of the first restart (TRADES starts from x + 0.001 * N(0, 1)).
    Returns detached adversarial inputs.
    """
    if eps == 0 or steps == 0:
        return x.detach().clone()
    loss_fn = resolve_loss(loss)
    alpha = default_step_size(eps, steps, norm) if step_size is None else step_size
    x = x.detach()
    lo, hi = clip

    def one_run(init: Optional[Tensor] = None) -> Tensor:
        if init is not None:
            delta = _project(init.detach().clone(), eps, norm)
        else:
            delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
        delta = ((x + delta).clamp(lo, hi) - x).requires_grad_(True)
        for _ in range(steps):
            objective = loss_fn(model(x + delta), y).sum()
            (grad,) = torch.autograd.grad(objective, delta)
            with torch.no_grad():
                if norm == "Linf":
                    delta += alpha * grad.sign()
                else:
                    delta += alpha * grad / _l2(grad)
                delta.copy_((x + _project(delta, eps, norm)).clamp_(lo, hi) - x)
        return (x + delta).detach()

    ctx = _nullcontext(model) if keep_mode else eval_mode(model)
    with ctx:
        best = one_run(init)
        if restarts > 1:
            with torch.no_grad():
                logits = model(best)
                best_fooled = logits.argmax(1) != y
                best_loss = loss_fn(logits, y)
            for _ in range(restarts - 1):
                cand = one_run()
                with torch.no_grad():
                    logits = model(cand)
                    fooled = logits.argmax(1) != y
                    cand_loss = loss_fn(logits, y)
                    better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (cand_loss > best_loss))
                    best[better] = cand[better]
                    best_fooled |= fooled
                    best_loss = torch.where(better, cand_loss, best_loss)
    return best


@contextmanager
def _nullcontext(model: nn.Module) -> Iterator[nn.Module]:
    yield model


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf", **kw) -> Tensor:
    """FGSM: PGD with one step of size eps from the clean point."""
    return pgd(model, x, y, eps, steps=1, step_size=eps, norm=norm, random_start=False, **kw)


def fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: Optional[float] = None, **kw) -> Tensor:
    """FGSM with a random start and step 1.25*eps (Wong et al., 'Fast is better than free')."""
    return pgd(model, x, y, eps, steps=1, step_size=1.25 * eps if step_size is None else step_size,
               random_start=True, **kw)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Clean accuracy in eval mode (restoring the caller's mode)."""
    with eval_mode(model):
        correct = 0
        for i in range(0, len(x), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / max(len(x), 1)


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: Callable[[Tensor, Tensor], Tensor],
                    batch_size: int = 256) -> float:
    """Accuracy on attack(x, y), batch by batch; `attack` is e.g. functools.partial(pgd, model, eps=..)."""
    correct = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            xa = attack(xb, yb)
            with torch.no_grad():
                correct += (model(xa).argmax(1) == yb).sum().item()
    return correct / max(len(x), 1)
