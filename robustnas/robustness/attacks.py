"""Attacks: the one PGD (Linf / L2, random start, restarts, any loss) and the suite built on it.

Training, search and evaluation all call `pgd`, so a fix or speed-up here reaches every number we report.
FGSM, PGD-K, the CW-style attack (PGD on the margin) and the transfer attack (PGD on a surrogate) are
settings of it; AutoAttack and Square (black-box) run through the authors' pyautoattack behind one adapter.
`ATTACKS` / `get_attack` name them all, each as attack(model, x, y, eps, norm="Linf", **options) -> x_adv.
Every attack puts the model in eval mode, restores the caller's mode, and leaves no parameter gradients
(gradients are taken with `torch.autograd.grad` with respect to the perturbation only).
"""

from __future__ import annotations

import functools
import io
import logging
import re
import sys
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
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
        from robustnas.core.errors import UserError

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


# ================================================================================================ the suite
# Every named attack has one signature, attack(model, x, y, eps, norm="Linf", **options) -> x_adv, so the
# evaluation can run any of them by name. The gradient attacks are all the one `pgd` above.
Attack = Callable[..., Tensor]


def pgd_attack(steps: int) -> Attack:
    """PGD-`steps` on the cross-entropy (restarts via the `restarts` option)."""

    def attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf", **kw) -> Tensor:
        return pgd(model, x, y, eps, steps=steps, norm=norm, **kw)

    attack.__name__ = f"pgd{steps}"
    attack.__doc__ = f"PGD with {steps} steps of 2.5 * eps / {steps} on the cross-entropy, random start."
    return attack


pgd20 = pgd_attack(20)
pgd100 = pgd_attack(100)


def cw(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf", steps: int = 20, **kw) -> Tensor:
    """CW-style attack: PGD on the margin loss (CW-inf / CW-2 of the robust-training literature).

    The margin does not saturate like the cross-entropy, which catches models whose softmax is overconfident.
    Same budget as PGD-20 by default, so the two differ only in the loss.
    """
    return pgd(model, x, y, eps, steps=steps, norm=norm, loss="margin", **kw)


def transfer(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf",
             surrogate: Optional[nn.Module] = None, steps: int = 20, **kw) -> Tensor:
    """Transfer attack: PGD-`steps` on a `surrogate` model; the target `model` is never queried.

    A target that resists white-box PGD but falls to examples made on another network has masked gradients.
    """
    if surrogate is None:
        from robustnas.core.errors import UserError

        raise UserError("the transfer attack needs a surrogate model: pass --transfer-from RUN_DIR")
    return pgd(surrogate, x, y, eps, steps=steps, norm=norm, **kw)


def transfer_from(surrogate: nn.Module, steps: int = 20) -> Attack:
    """The transfer attack bound to one surrogate, in the common signature."""

    def attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf", **kw) -> Tensor:
        kw.setdefault("steps", steps)
        return transfer(model, x, y, eps, norm=norm, surrogate=surrogate, **kw)

    attack.__name__ = "transfer"
    return attack


# ------------------------------------------------------------------------------ AutoAttack (pyautoattack)
AA_LOGGER = "auto-attack"  # pyautoattack logs its progress and its reliability warnings here


@dataclass
class AutoAttackResult:
    """What one pyautoattack run gives back.

    `components` holds the robust accuracy after each attack of the ensemble, cumulative in the order run
    ('clean' first), read from pyautoattack's own log; `warnings` are its reliability flags (checks.py).
    """

    x_adv: Tensor
    accuracy: float  # robust accuracy on the images attacked
    components: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def _is_autoattack_flag(path: str) -> bool:
    """Whether a log record or Python warning was raised by pyautoattack's checks.py: its reliability flags
    (randomized / dynamic defence, probabilities as outputs, zero gradients, Square beating the rest, too
    many target classes) come from there and nowhere else."""
    try:
        return Path(path).resolve() == _autoattack_checks_file()
    except (OSError, TypeError):
        return False


@functools.lru_cache(maxsize=1)
def _autoattack_checks_file() -> Path:
    from pyautoattack import checks

    return Path(checks.__file__).resolve()


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str], flags: list[str], on_message: Optional[Callable[[str], None]]):
        super().__init__(logging.DEBUG)
        self.lines, self.flags, self.on_message = lines, flags, on_message

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.lines.append(f"{record.levelname.lower()}: {msg}")
        if record.levelno >= logging.WARNING and _is_autoattack_flag(record.pathname):
            self.flags.append(msg)
        if self.on_message is not None:
            self.on_message(msg)


@contextmanager
def capture_autoattack_output(lines: list[str], flags: list[str],
                              on_message: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Route pyautoattack's logger, prints and Python warnings into `lines`; its reliability flags (raised by
    its checks.py, through its logger or as Python warnings) also into `flags`. Any other warning raised
    during the run (a deprecation in torch, the model's own) is logged and is not a flag."""
    logger = logging.getLogger(AA_LOGGER)
    handler = _ListHandler(lines, flags, on_message)
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # nothing reaches the root logger or stderr
    logger.addHandler(handler)
    out = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as recorded, redirect_stdout(out):
            warnings.simplefilter("always")
            caught = recorded
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        lines.extend(f"print: {line}" for line in out.getvalue().splitlines() if line.strip())
        for w in caught:
            lines.append(f"warning: {w.message}")
            if _is_autoattack_flag(w.filename):
                flags.append(str(w.message))


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients for a while: an attack that calls .backward() (pyautoattack's
    FAB does) then leaves no parameter gradients, and the backward pass skips the weight gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def _pyautoattack_globals() -> Iterator[None]:
    """Two pieces of global state pyautoattack leaves behind: `checks.check_dynamic` counts calls in a
    module-level dict it never resets (one dynamic model would flag every later one), and it ends its
    tracing with sys.settrace(None), which would switch off a debugger's or coverage's tracer."""
    from pyautoattack import checks

    for k in checks.funcs:
        checks.funcs[k] = 0
    tracer = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(tracer)


def autoattack_static_checks(model: nn.Module, x: Tensor, y: Tensor) -> tuple[list[str], list[str]]:
    """pyautoattack's own checks that need no attack (randomized defence, probabilities given as outputs,
    dynamic defence), on one batch in eval mode; returns (flags, log lines)."""
    from pyautoattack import checks

    lines: list[str] = []
    flags: list[str] = []
    logger = logging.getLogger(AA_LOGGER)
    with eval_mode(model), _pyautoattack_globals(), capture_autoattack_output(lines, flags):
        checks.check_randomized(model, x, y, bs=len(x), logger=logger)
        checks.check_range_output(model, x, logger=logger)
        checks.check_dynamic(model, x, False, logger=logger)
    return flags, lines


def _fork_rng(device: torch.device):
    """pyautoattack reseeds the global RNG before every attack: keep the caller's random state out of it."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _parse_component(msg: str, n: int, out: dict[str, float]) -> None:
    # 'initial accuracy: 45.00%' and 'robust accuracy after APGD-CE: 40.00% (total time 3.1 s)'; percentages
    # carry two decimals, so for n <= 10000 rounding the count recovers the exact accuracy
    m = re.match(r"initial accuracy: ([0-9.]+)%", msg)
    if m:
        out["clean"] = round(float(m.group(1)) * n / 100) / n
        return
    m = re.match(r"robust accuracy after ([A-Z0-9-]+): ([0-9.]+)%", msg)
    if m:
        out[m.group(1).lower()] = round(float(m.group(2)) * n / 100) / n


def build_autoattack(model: nn.Module, eps: float, norm: Norm = "Linf", version: str = "standard",
                     attacks: Optional[list[str]] = None, seed: int = 0, device: Optional[torch.device] = None,
                     num_classes: Optional[int] = None, n_queries: Optional[int] = None,
                     n_iter: Optional[int] = None, n_target_classes: Optional[int] = None):
    """A pyautoattack.AutoAttack as we run it: seeded; with fewer than 10 classes the targeted attacks
    aim at every other class instead of the standard 9 (more targets than classes would index past the end);
    a component run alone (version="custom") keeps the standard version's single restart.
    `n_target_classes` lowers APGD-T's targets (the standard version's first ones, same order)."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm=norm, eps=eps, version=version, attacks=attacks, seed=seed,
                    device=device if device is not None else "cpu")
    if version == "custom":
        aa.apgd.n_restarts = aa.fab.n_restarts = 1
    if n_iter is not None:
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = n_iter
    if n_target_classes is not None:
        aa.apgd_targeted.n_target_classes = n_target_classes
    if num_classes is not None and num_classes - 1 < aa.apgd_targeted.n_target_classes:
        aa.apgd_targeted.n_target_classes = max(num_classes - 1, 1)
        aa.fab.n_target_classes = max(num_classes - 1, 1)
    if n_queries is not None:
        aa.square.n_queries = n_queries
    return aa


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf",
                   version: str = "standard", attacks: Optional[list[str]] = None, seed: int = 0,
                   batch_size: int = 250, n_queries: Optional[int] = None, n_iter: Optional[int] = None,
                   n_target_classes: Optional[int] = None, on_message: Optional[Callable[[str], None]] = None) -> AutoAttackResult:
    """AutoAttack through the authors' reference code (pyautoattack), called as they intend.

    `version="standard"` runs APGD-CE, APGD-T, FAB-T and Square, each on the points the previous ones left
    robust. We add what pyautoattack does not do: eval mode (restoring the caller's), no parameter
    gradients, the caller's global RNG left untouched, and its log and prints captured instead of printed.
    """
    if len(x) == 0:
        return AutoAttackResult(x.detach().clone(), 0.0)
    with torch.no_grad(), eval_mode(model):
        num_classes = model(x[:1]).shape[1]
    lines: list[str] = []
    flags: list[str] = []
    components: dict[str, float] = {}

    def on_msg(msg: str) -> None:
        _parse_component(msg, len(x), components)
        if on_message is not None:
            on_message(msg)

    with eval_mode(model), frozen_parameters(model), _fork_rng(x.device), _pyautoattack_globals(), \
            capture_autoattack_output(lines, flags, on_msg):
        aa = build_autoattack(model, eps, norm, version, attacks, seed, x.device, num_classes, n_queries, n_iter,
                              n_target_classes)
        x_adv, _ = aa.run_standard_evaluation(x.detach(), y, batch_size=batch_size)
    for name in aa.attacks_to_run:  # pyautoattack stops logging once no robust image is left
        components.setdefault(name, 0.0)
    with torch.no_grad(), eval_mode(model):
        correct = torch.cat([(model(x_adv[i:i + batch_size]).argmax(1) == y[i:i + batch_size])
                             for i in range(0, len(x), batch_size)])
    return AutoAttackResult(x_adv.detach(), correct.sum().item() / len(x), components, flags, lines)


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf", seed: int = 0,
               batch_size: int = 250, version: str = "standard", generator: Optional[torch.Generator] = None,
               **kw) -> Tensor:
    """AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square), in the common signature.

    pyautoattack seeds itself from `seed`; `generator` is accepted for uniformity and not used.
    """
    return run_autoattack(model, x, y, eps, norm, version=version, seed=seed, batch_size=batch_size, **kw).x_adv


def square(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf", seed: int = 0,
           batch_size: int = 250, n_queries: int = 5000, generator: Optional[torch.Generator] = None,
           **kw) -> Tensor:
    """Square Attack alone (pyautoattack's, 5000 queries): random search that only reads the model's
    outputs, so masked gradients cannot stop it. Seeded by `seed` (`generator` is not used)."""
    return run_autoattack(model, x, y, eps, norm, version="custom", attacks=["square"], seed=seed,
                          batch_size=batch_size, n_queries=n_queries, **kw).x_adv


def apgd_ce(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf", seed: int = 0,
            batch_size: int = 250, n_iter: int = 100, generator: Optional[torch.Generator] = None, **kw) -> Tensor:
    """APGD-CE alone (AutoAttack's first component: step-size-free PGD on the cross-entropy, 1 restart of
    `n_iter` iterations), through pyautoattack. Seeded by `seed` (`generator` is not used)."""
    return run_autoattack(model, x, y, eps, norm, version="custom", attacks=["apgd-ce"], seed=seed,
                          batch_size=batch_size, n_iter=n_iter, **kw).x_adv


def apgd_t(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf", seed: int = 0,
           batch_size: int = 250, n_iter: int = 100, generator: Optional[torch.Generator] = None, **kw) -> Tensor:
    """APGD-T alone (targeted APGD on the DLR loss against up to 9 other classes, `n_iter` iterations each),
    through pyautoattack. Seeded by `seed` (`generator` is not used)."""
    return run_autoattack(model, x, y, eps, norm, version="custom", attacks=["apgd-t"], seed=seed,
                          batch_size=batch_size, n_iter=n_iter, **kw).x_adv


AA_RANK_TARGETS = 3  # APGD-T target classes of aa-rank (standard AutoAttack: 9)
AA_RANK_TITLE = "AutoAttack-rank (not standard AA)"


def aa_rank(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: Norm = "Linf", seed: int = 0,
            batch_size: int = 250, n_target_classes: int = AA_RANK_TARGETS,
            generator: Optional[torch.Generator] = None, **kw) -> Tensor:
    """AutoAttack-rank, NOT standard AutoAttack: for searches, candidate scoring and sequential benchmarks.

    Standard AutoAttack's first two attacks with its own settings and seed (APGD-CE, 1 restart; APGD-T on the
    points left, 1 restart) but APGD-T aims at only the first `n_target_classes` of its 9 targets, and FAB-T and
    Square are not run. Every image it breaks, standard AutoAttack breaks too (same seed), so its accuracy is
    an upper bound of standard AutoAttack's, image by image. Final reports use `autoattack`.
    """
    return run_autoattack(model, x, y, eps, norm, version="custom", attacks=["apgd-ce", "apgd-t"], seed=seed,
                          batch_size=batch_size, n_target_classes=n_target_classes, **kw).x_adv


# --------------------------------------------------------------------------------------------- registry
ATTACKS: dict[str, Attack] = {
    "fgsm": fgsm,
    "pgd20": pgd20,
    "pgd100": pgd100,
    "cw": cw,
    "transfer": transfer,
    "autoattack": autoattack,
    "aa-rank": aa_rank,
    "square": square,
    "apgd-ce": apgd_ce,
    "apgd-t": apgd_t,
}
# attacks that run inside pyautoattack (whole set at once, their own batching and seeding)
PYAUTOATTACK_ATTACKS = ("autoattack", "aa-rank", "square", "apgd-ce", "apgd-t")


def attack_names() -> str:
    return "fgsm, pgd20, pgd100, pgdK (K steps, e.g. pgd50), cw, transfer, autoattack, aa-rank (AutoAttack-rank, not standard AA), apgd-ce, apgd-t, square"


def get_attack(name: str) -> Attack:
    """The attack called `name`: an entry of ATTACKS, or pgdK for PGD with any K >= 1 steps."""
    key = name.strip().lower()
    if key in ATTACKS:
        return ATTACKS[key]
    m = re.fullmatch(r"pgd(\d+)", key)
    if m and int(m.group(1)) >= 1:
        return pgd_attack(int(m.group(1)))
    from robustnas.core.errors import UserError

    raise UserError(f"unknown attack {name!r}; known attacks: {attack_names()}")
