"""Honest robustness evaluation of one model: clean accuracy, an attack suite, certified accuracy, size,
latency, HRS, a robustness-vs-eps curve, and the sanity checks that say whether to believe the numbers.

A sample counts as robust to an attack when the model is right on the clean image and on the attacked one
(the clean image is a point of the ball too), so no attack can report more than the clean accuracy and the
per-sample worst case over all attacks is well defined.

Sanity checks (Carlini et al. 2019, "On evaluating adversarial robustness"; Athalye et al. 2018; Croce &
Hein 2020's flags, which pyautoattack raises itself) run with every evaluation; one failure marks the
whole evaluation unreliable. Two attacks run on the same images are compared image by image
(`paired_difference`): a check fails only when the interval of the difference of their accuracies lies
wholly on the wrong side of zero. docs/evaluation.md lists the checks and what each one catches.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from robustnas.evaluation.analysis import hrs
from robustnas.robustness.attacks import (AA_RANK_TARGETS, AA_RANK_TITLE, PYAUTOATTACK_ATTACKS, AutoAttackResult,
                               attack_names, autoattack_static_checks, ce_loss, eval_mode, get_attack,
                               margin_loss, run_autoattack, transfer_from as bind_transfer)
from robustnas.core.config import format_eps, load_yaml, parse_eps
from robustnas.core.errors import UserError
from robustnas.nets.models.fast import fold_bn as folded_copy
from robustnas.nets.size import count_flops, count_params
from robustnas.core.stats import INTERVALS, paired_exact_interval
from robustnas.robustness.certify import METHODS as CERTIFY_METHODS  # one list of bound methods

DEFAULT_ATTACKS = ("fgsm", "pgd20", "autoattack")
BLACK_BOX = ("square", "transfer")
MAX_ZERO_GRAD_FRACTION = 0.01  # above this share of images with an exactly zero input gradient: masking
SANITY_N = 200  # images the sanity checks' own extra attacks see (evaluate_model's sanity_n)
SANITY_LEVEL = 0.95  # confidence level of the paired intervals the checks compare two attacks with


# ------------------------------------------------------------------------------------------ small helpers
def paired_difference(a: Tensor, b: Tensor, level: float = SANITY_LEVEL) -> tuple[float, float, float]:
    """acc(a) - acc(b) and its exact conditional interval (stats.paired_exact_interval), for two per-image
    robust masks of the same images: the interval excludes 0 exactly when McNemar's exact test rejects."""
    return paired_exact_interval(int((a & ~b).sum()), int((~a & b).sum()), len(a), level)


def large_eps(norm: str, in_shape: Sequence[int]) -> float:
    """A radius whose ball around any image in [0,1]^d holds the uniform mid-gray image.

    Every image whose label differs from the model's prediction for gray is then provably breakable at this
    radius, so a working attack leaves at most the images of the class predicted for gray (about 1/K).
    """
    return 0.5 if norm == "Linf" else 0.5 * math.sqrt(math.prod(in_shape))


def eps_value(eps: float | str, norm: str = "Linf") -> float:
    """An epsilon in pixel units, checked for its norm (config.parse_eps: Linf in [0, 1], L2 any >= 0)."""
    return parse_eps(eps, norm)


@dataclass
class Check:
    """One sanity check: status is "pass", "fail", or "skip" (its attacks were not run)."""

    name: str
    status: str
    detail: str

    def as_dict(self) -> dict:
        return {"status": self.status, "detail": self.detail}


def cpu_latency_ms(model: nn.Module, in_shape: Sequence[int], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass at batch 1 on the CPU, in milliseconds."""
    try:
        on_cpu = next(model.parameters()).device.type == "cpu"
    except StopIteration:
        on_cpu = True
    m = model if on_cpu else copy.deepcopy(model).cpu()
    x = torch.rand(1, *in_shape, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad(), eval_mode(m):
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            m(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def attacked_copy(model: nn.Module, fold_bn: bool = True) -> nn.Module:
    """What the attacks and clean passes of an evaluation run on: with `fold_bn`, an eval-mode copy with every
    BatchNorm that follows a conv folded into it (models.fast.fold_bn: same outputs and input gradients up to
    float rounding, 1.3-1.9x faster attacks of DARTS-cell networks, docs/performance.md), its parameters frozen
    (attacks never need their gradients); otherwise `model` itself. Certification, size and latency always
    read `model` itself."""
    if not fold_bn:
        return model
    copy_ = folded_copy(model)
    copy_.requires_grad_(False)
    return copy_


# ------------------------------------------------------------------------------------------ the runner
class AttackRunner:
    """Runs attacks on fixed images and keeps, per attack, which images stayed robust. It attacks
    `attacked_copy(model, fold_bn)` (and of the surrogate), kept as `self.model`: evaluate_model, extend_per_image
    and the study's attack table all attack through it."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, batch_size: int,
                 seed: int, bar: Progress, surrogate: Optional[nn.Module], log: list[str],
                 options: dict[str, dict], fold_bn: bool = True):
        model = attacked_copy(model, fold_bn)
        surrogate = attacked_copy(surrogate, fold_bn) if surrogate is not None else None
        self.model, self.x, self.y, self.eps, self.norm = model, x, y, eps, norm
        self.options = options
        self.batch_size, self.seed, self.bar, self.surrogate, self.log = batch_size, seed, bar, surrogate, log
        self.n = len(x)
        self.max_perturbation: dict[str, float] = {}  # per attack: largest perturbation / eps
        self.outside_box: dict[str, float] = {}  # per attack: largest distance outside [0,1]
        self.aa_results: dict[str, AutoAttackResult] = {}
        self.seconds: dict[str, float] = {}
        with torch.no_grad(), eval_mode(model):
            self.clean = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                                    for i in range(0, self.n, batch_size)])

    def _record(self, key: str, x_adv: Tensor, x: Tensor, eps: float) -> None:
        d = (x_adv - x).flatten(1)
        size = (d.abs().max(1).values if self.norm == "Linf" else d.norm(dim=1)).max().item() if len(d) else 0.0
        ratio = size / eps if eps > 0 else (0.0 if size == 0 else math.inf)
        out = max((x_adv - x_adv.clamp(0, 1)).abs().max().item() if len(d) else 0.0, 0.0)
        self.max_perturbation[key] = max(self.max_perturbation.get(key, 0.0), ratio)
        self.outside_box[key] = max(self.outside_box.get(key, 0.0), out)

    def run(self, name: str, eps: Optional[float] = None, label: Optional[str] = None,
            count: Optional[int] = None, options: Optional[dict] = None) -> Tensor:
        """Boolean mask of the (first `count`) images robust to attack `name` at `eps` (default: the
        evaluation's eps); `options` are added to the attack's own (e.g. random_start=False)."""
        eps = self.eps if eps is None else eps
        label = label or name
        k = self.n if count is None else min(count, self.n)
        t0 = time.perf_counter()
        own = self.options.get(name, {}) if label == name else {}  # configured options apply at the asked eps
        options = {**own, **(options or {})}
        if name in PYAUTOATTACK_ATTACKS:
            mask = self._run_pyautoattack(name, self.x[:k], self.y[:k], eps, label, options)
        else:
            mask = self._run_batched(name, self.x[:k], self.y[:k], eps, label, options)
        self.seconds[label] = time.perf_counter() - t0
        return mask & self.clean[:k]

    def _run_batched(self, name: str, x: Tensor, y: Tensor, eps: float, label: str, options: dict) -> Tensor:
        attack = bind_transfer(self.surrogate) if name == "transfer" else get_attack(name)
        g = torch.Generator(device=x.device).manual_seed(self.seed)
        task = self.bar.add_task(label, total=len(x), info="")
        robust, t0 = [], time.perf_counter()
        for i in range(0, len(x), self.batch_size):
            xb, yb = x[i:i + self.batch_size], y[i:i + self.batch_size]
            x_adv = attack(self.model, xb, yb, eps, norm=self.norm, generator=g, **options)
            self._record(label, x_adv, xb, eps)
            with torch.no_grad(), eval_mode(self.model):
                robust.append(self.model(x_adv).argmax(1) == yb)
            done = i + len(xb)
            acc = (torch.cat(robust) & self.clean[:done]).float().mean().item()
            self.bar.update(task, completed=done,
                            info=f"acc {acc:.3f}  {done / (time.perf_counter() - t0):.0f} img/s")
        return torch.cat(robust)

    def _run_pyautoattack(self, name: str, x: Tensor, y: Tensor, eps: float, label: str,
                          options: dict) -> Tensor:
        components = {"autoattack": ["apgd-ce", "apgd-t", "fab-t", "square"],
                      "aa-rank": ["apgd-ce", "apgd-t"]}.get(name, [name])
        task = self.bar.add_task(label, total=len(components), info="")

        def on_message(msg: str) -> None:
            if msg.startswith("running "):
                self.bar.update(task, info=msg[len("running "):])
            elif msg.startswith("robust accuracy after "):
                self.bar.advance(task)
                self.bar.update(task, info=msg[len("robust accuracy after "):].split(" (")[0])

        if name != "autoattack":  # one component alone (square, apgd-ce, apgd-t), or aa-rank: APGD-CE +
            if name == "aa-rank":  # APGD-T on fewer target classes (AutoAttack-rank, not standard AA)
                options = {"n_target_classes": AA_RANK_TARGETS, **options}
            result = run_autoattack(self.model, x, y, eps, self.norm, version="custom", attacks=components,
                                    seed=self.seed, batch_size=self.batch_size, on_message=on_message, **options)
        else:
            result = run_autoattack(self.model, x, y, eps, self.norm, seed=self.seed,
                                    batch_size=self.batch_size, on_message=on_message, **options)
        self.bar.update(task, completed=len(components))
        self.aa_results[label] = result
        self.log.extend(f"[{label}] {line}" for line in result.log)
        self._record(label, result.x_adv, x, eps)
        with torch.no_grad(), eval_mode(self.model):
            return torch.cat([self.model(result.x_adv[i:i + self.batch_size]).argmax(1)
                              == y[i:i + self.batch_size] for i in range(0, len(x), self.batch_size)])


def _acc(mask: Tensor) -> float:
    return mask.sum().item() / len(mask) if len(mask) else 0.0


def accuracy_under_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, attack: str, norm: str = "Linf",
                          seed: int = 0, batch_size: int = 256, fold_bn: bool = True) -> float:
    """Robust accuracy of `model` on x, y under the attack called `attack` (get_attack's names, e.g. "aa-rank"),
    measured as an evaluation measures it: by an AttackRunner on `attacked_copy(model, fold_bn)`, seeded by
    `seed`, an image counting as robust when the copy is right on it both clean and attacked. Searches whose
    candidates are scored under a named attack (`score_attack`) call this."""
    runner = AttackRunner(model, x, y, eps, norm, batch_size, seed, Progress(disable=True), None, [], {}, fold_bn)
    return _acc(runner.run(attack))


# ------------------------------------------------------------------------------------------ sanity checks
def _zero_gradient_fraction(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, loss=margin_loss) -> float:
    """Share of images whose `loss` has an exactly zero input gradient."""
    zero = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(model(xb), y[i:i + batch_size]).sum(), xb)
            zero += (g.flatten(1).abs().sum(1) == 0).sum().item()
    return zero / max(len(x), 1)


def _compare(name: str, a_name: str, a: Tensor, b_name: str, b: Tensor, fail_if: str) -> Check:
    """Compare two attacks on the same images; fail when acc(a) - acc(b) is significantly `fail_if`
    ("below" 0, "above" 0, or "either" side)."""
    diff, lo, hi = paired_difference(a, b)
    bad = {"below": hi < 0, "above": lo > 0, "either": hi < 0 or lo > 0}[fail_if]
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return Check(name, "fail" if bad else "pass",
                 f"{a_name} {_acc(a):.3f} vs {b_name} {_acc(b):.3f} on the same {len(a)} images: difference "
                 f"{diff:+.3f} ({SANITY_LEVEL:.0%} interval {lo:+.3f} to {hi:+.3f}); broken by {a_name} alone: "
                 f"{only_b}, by {b_name} alone: {only_a}")


def sanity_checks(model: nn.Module, runner: AttackRunner, masks: dict[str, Tensor], asked: Sequence[str],
                  aa_flags: list[str], sanity_n: int) -> list[Check]:
    """The checklist. `masks` holds the per-image results at eps of every attack run so far (fgsm, pgd20
    and pgd100 among them; pgd100 possibly on the first `sanity_n` images only). The checks' own extra
    attacks (PGD-20 at a large eps, CW unless asked) see the first `sanity_n` images."""
    x, y, n, norm, bs = runner.x, runner.y, runner.n, runner.norm, runner.batch_size
    k = min(sanity_n, n)
    checks: list[Check] = []

    # 1. deterministic forward: a randomized model makes every gradient attack number meaningless
    with torch.no_grad(), eval_mode(model):
        a, b = model(x[:bs]), model(x[:bs])
    diff = (a - b).abs().max().item()
    ok = diff <= 1e-5 * (1 + a.abs().max().item()) and torch.equal(a.argmax(1), b.argmax(1))
    checks.append(Check("deterministic_forward", "pass" if ok else "fail",
                        f"two eval forwards of the same {len(a)} images differ by at most {diff:.2e}"))

    # 2. input gradients exist, of the cross-entropy PGD and FGSM climb and of the margin CW climbs
    frac = {loss: _zero_gradient_fraction(model, x, y, bs, fn) for loss, fn in (("CE", ce_loss),
                                                                                ("margin", margin_loss))}
    checks.append(Check("gradients_nonzero", "pass" if max(frac.values()) <= MAX_ZERO_GRAD_FRACTION else "fail",
                        f"share of images with an exactly zero input gradient: {frac['CE']:.1%} of the "
                        f"cross-entropy, {frac['margin']:.1%} of the margin (limit {MAX_ZERO_GRAD_FRACTION:.0%})"))

    # 3. in a ball that holds the mid-gray image the attack is at least as strong as that one image: PGD-20
    # from the clean image (a random start of this size could do the work alone and hide an attack that
    # cannot move)
    big = large_eps(norm, tuple(x.shape[1:]))
    with torch.no_grad(), eval_mode(model):
        gray_robust = y[:k] == model(torch.full_like(x[:1], 0.5)).argmax(1)
    robust_big = runner.run("pgd20", eps=big, label=f"pgd20@{format_eps(big)}", count=k,
                            options={"random_start": False})
    checks.append(_compare("large_eps", f"PGD-20 at {norm} eps {format_eps(big)} from the clean image", robust_big,
                           "the mid-gray image", gray_robust & runner.clean[:k], "above"))

    # 4. more steps change nothing significant: PGD-20 has converged (and is not unstable)
    m100 = masks["pgd100"]
    checks.append(_compare("more_steps", "PGD-100", m100, "PGD-20", masks["pgd20"][:len(m100)], "either"))

    # 5. one step is not stronger than many
    checks.append(_compare("fgsm_vs_pgd", "FGSM", masks["fgsm"], "PGD-20", masks["pgd20"], "below"))

    # 6. the margin loss is not stronger than the attacks reported (a saturated softmax hides the gradient
    # of the cross-entropy that PGD and FGSM climb)
    cw = masks["cw"][:k] if "cw" in masks else runner.run("cw", count=k)
    reported = torch.stack([masks[a][:k] for a in asked]).all(0)
    checks.append(_compare("margin_vs_ce", "CW (margin)", cw, "+".join(asked), reported, "below"))

    # 7. black-box attacks are not stronger than the white-box ones together
    white = [w for w in masks if w not in BLACK_BOX and w != "autoattack" and len(masks[w]) == n]
    bb = [b for b in BLACK_BOX if b in asked]
    if bb:
        checks.append(_compare("blackbox_vs_whitebox", "+".join(bb), torch.stack([masks[b] for b in bb]).all(0),
                               "+".join(white), torch.stack([masks[w] for w in white]).all(0), "below"))
    elif "autoattack" in runner.aa_results:
        comp = runner.aa_results["autoattack"].components
        before = comp.get("fab-t", comp.get("apgd-t"))
        if before is not None and "square" in comp:
            took = round((before - comp["square"]) * n)
            _, lo, hi = paired_exact_interval(0, took, n, SANITY_LEVEL)
            checks.append(Check("blackbox_vs_whitebox", "fail" if hi < 0 else "pass",
                                f"Square inside AutoAttack broke {took} of {n} images that APGD and FAB left "
                                f"robust ({SANITY_LEVEL:.0%} interval of the difference {lo:+.3f} to {hi:+.3f})"))
        else:
            checks.append(Check("blackbox_vs_whitebox", "skip", "AutoAttack's Square component did not run"))
    else:
        checks.append(Check("blackbox_vs_whitebox", "skip", "no black-box attack (square, transfer) was run"))

    # 8. AutoAttack is at least as strong as PGD
    if "autoattack" in masks:
        checks.append(_compare("autoattack_vs_pgd", "AutoAttack", masks["autoattack"], "PGD-20", masks["pgd20"],
                               "above"))

    # 9. every attack stayed in its ball and in the pixel box (guards against bugs of our own)
    bad = [key for key in runner.max_perturbation
           if runner.max_perturbation[key] > 1 + 1e-4 or runner.outside_box[key] > 1e-6]
    checks.append(Check("perturbation_in_ball", "fail" if bad else "pass",
                        f"outside the ball or [0,1]: {', '.join(bad)}" if bad else
                        "every adversarial image is inside its eps-ball and [0,1]"))

    # 10. AutoAttack's own flags (raised by its checks.py; no other warning counts)
    flags = list(dict.fromkeys(aa_flags))
    checks.append(Check("autoattack_flags", "fail" if flags else "pass",
                        "; ".join(flags) if flags else "pyautoattack raised no flag"))
    return checks


# ------------------------------------------------------------------------------------------ evaluation
def _validate(x: Tensor, y: Tensor, attacks: Sequence[str], norm: str, certify: Sequence[str],
              batch_size: int, seed: int, surrogate: Optional[nn.Module]) -> list[str]:
    if norm not in ("Linf", "L2"):
        raise UserError(f"unknown norm {norm!r}; use Linf or L2")
    if not isinstance(x, Tensor) or x.dim() != 4 or len(x) != len(y):
        raise UserError("images must be one N x C x H x W tensor with one label each")
    if len(x) == 0:
        raise UserError("no images to evaluate: n must be at least 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    names = []
    for a in attacks:
        get_attack(a)  # raises UserError naming the known attacks
        if a.strip().lower() not in names:
            names.append(a.strip().lower())
    if not names:
        raise UserError(f"no attack given; known attacks: {attack_names()}")
    if "transfer" in names and surrogate is None:
        raise UserError("the transfer attack needs a surrogate model: pass --transfer-from RUN_DIR")
    for m in certify:
        if m not in CERTIFY_METHODS:
            raise UserError(f"unknown certification method {m!r}; known: {', '.join(CERTIFY_METHODS)}")
    if certify and norm != "Linf":
        raise UserError("certification covers Linf balls only; drop --certify or use --norm Linf")
    return names


def evaluate_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | str,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    norm: str = "Linf",
    certify: Sequence[str] = (),
    transfer_from: Optional[nn.Module] = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    eps_curve: Optional[Sequence[float]] = None,
    progress: bool = True,
    dataset_meta: Any = None,
    log: Optional[list[str]] = None,
    attack_options: Optional[dict[str, dict]] = None,
    sanity_n: int = SANITY_N,
    per_image: Optional[dict[str, Tensor]] = None,
    interval: str = "wilson",
    fold_bn: bool = True,
) -> dict:
    """Evaluate `model` on images x (pixels in [0,1]) with labels y at radius eps; returns JSON-ready metrics.

    `transfer_from` is the surrogate network of the transfer attack (given one, "transfer" is added to the
    attacks). PGD-20, PGD-100 and FGSM always run for the sanity checks; `robust_acc` lists the asked ones.
    The model is moved to `device`. `log` receives pyautoattack's log lines. `attack_options` passes
    keyword options to single attacks, e.g. {"square": {"n_queries": 1000}, "cw": {"steps": 30}}.
    The sanity checks' extra attacks at other settings (PGD-100, PGD-20 at a large eps) see only the first
    `sanity_n` images, which bounds their cost. `per_image` receives each image's correctness (clean and per
    asked attack); every accuracy gets a 95% `interval` ("wilson" or "exact") in metrics["intervals"].
    With `fold_bn` (default) every attack, clean pass and sanity check runs on `attacked_copy(model)` (the
    transfer surrogate likewise), BatchNorm folded into the convs; certification, size and latency read `model`.
    """
    eps = eps_value(eps, norm)
    attacks = list(attacks) + (["transfer"] if transfer_from is not None and "transfer" not in attacks else [])
    names = _validate(x, y, attacks, norm, certify, batch_size, seed, transfer_from)
    device = torch.device(device)
    model.to(device)
    if transfer_from is not None:
        transfer_from.to(device)
    x, y = x.detach().to(device, torch.float32), y.to(device)
    log = log if log is not None else []
    n = len(x)

    bar = Progress(TextColumn("[bold]{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not progress)
    with bar:
        runner = AttackRunner(model, x, y, eps, norm, batch_size, seed, bar, transfer_from, log,
                              {k.lower(): dict(v) for k, v in (attack_options or {}).items()}, fold_bn)
        attacked = runner.model  # the folded copy (or model itself): the sanity checks see what was attacked
        masks: dict[str, Tensor] = {}
        for name in names:
            masks[name] = runner.run(name)
        for extra in ("fgsm", "pgd20"):  # needed by the sanity checks and the curve
            if extra not in masks:
                masks[extra] = runner.run(extra)
        if "pgd100" not in masks:  # the costliest check runs on a subset
            masks["pgd100"] = runner.run("pgd100", count=sanity_n)
        acc = {k: _acc(v) for k, v in masks.items()}

        # robustness curve: PGD-20 accuracy over a few radii
        radii = list(eps_curve) if eps_curve is not None else [0, eps / 4, eps / 2, eps, 2 * eps]
        if norm == "Linf":
            radii = [min(r, 1.0) for r in radii]
        curve: dict[str, float] = {}
        for r in sorted(set(radii)):
            key = format_eps(r)
            if key in curve:
                continue
            if r == 0:
                curve[key] = _acc(runner.clean)
            elif r == eps:
                curve[key] = acc["pgd20"]
            else:
                curve[key] = _acc(runner.run("pgd20", eps=r, label=f"pgd20@{key}"))

        aa_flags, static_lines = autoattack_static_checks(attacked, x[:batch_size], y[:batch_size])
        log.extend(f"[checks] {line}" for line in static_lines)
        for res in runner.aa_results.values():
            aa_flags += res.warnings
        checks = sanity_checks(attacked, runner, masks, names, aa_flags, sanity_n)

    clean = _acc(runner.clean)
    robust = {k: acc[k] for k in names}
    worst = torch.stack([masks[k] for k in names]).all(0)
    if "autoattack" in robust:
        r_name = "autoattack"
    else:
        r_name = min(robust, key=robust.get)
    metrics: dict[str, Any] = {
        "dataset": getattr(dataset_meta, "name", None),
        "eps": format_eps(eps),
        "norm": norm,
        "n": n,
        "seed": seed,
        "clean_acc": clean,
        "robust_acc": robust,
        "worst_case_acc": _acc(worst),
        "bn_folded": fold_bn,  # attacks ran on the BatchNorm-folded copy (same function up to float rounding)
    }
    if metrics["dataset"] is None:
        del metrics["dataset"]
    if "autoattack" in runner.aa_results:
        metrics["autoattack_acc"] = acc["autoattack"]
        res = runner.aa_results["autoattack"]
        metrics["autoattack"] = {"version": "standard", "components": res.components, "flags": res.warnings}
    if "aa-rank" in runner.aa_results:  # kept apart from autoattack_acc: never the standard version
        res = runner.aa_results["aa-rank"]
        metrics["aa_rank"] = {"title": AA_RANK_TITLE, "version": "custom (apgd-ce, apgd-t)",
                              "n_target_classes": runner.options.get("aa-rank", {}).get(
                                  "n_target_classes", AA_RANK_TARGETS),
                              "components": res.components, "flags": res.warnings}
    metrics["hrs"] = hrs(clean, robust[r_name])
    metrics["hrs_robust_from"] = r_name

    if certify:
        from robustnas.robustness.certify import certified_accuracy, certified_radius

        metrics["certified"], metrics["certified_radius"] = {}, {}
        cap = min(2 * eps, 1.0) if eps > 0 else 1.0  # radii are searched up to the top of the curve
        with eval_mode(model):
            for m in certify:
                t0 = time.perf_counter()
                metrics["certified"][m] = float(certified_accuracy(model, x, y, eps, method=m,
                                                                   batch_size=batch_size))
                radius = certified_radius(model, x, y, method=m, max_eps=cap, tol=cap / 200,
                                          batch_size=batch_size)
                metrics["certified_radius"][m] = float(radius.float().mean().item())
                runner.seconds[f"certify-{m}"] = time.perf_counter() - t0
        metrics["certified_radius_max"] = format_eps(cap)

    metrics["robustness_curve"] = curve
    metrics["params"] = count_params(model)
    metrics["flops"] = count_flops(model, tuple(x.shape[1:]))
    metrics["latency_ms_per_image"] = cpu_latency_ms(model, tuple(x.shape[1:]))
    metrics["attack_seconds"] = {k: round(v, 3) for k, v in runner.seconds.items()}
    metrics["sanity"] = {c.name: c.as_dict() for c in checks}
    metrics["reliable"] = all(c.status != "fail" for c in checks)
    metrics["intervals"] = accuracy_intervals(metrics, interval)
    if per_image is not None:
        per_image.update({"clean": runner.clean.cpu(), **{k: masks[k].cpu() for k in names}})
    return metrics


def accuracy_intervals(metrics: dict, method: str = "wilson") -> dict:
    """95% binomial interval [low, high] of every accuracy in `metrics` (all on metrics["n"] images), keyed
    like the accuracies themselves so that the RobustBench-shaped keys stay as they are."""
    from robustnas.core.stats import LEVEL, accuracy_interval

    n = metrics["n"]

    def iv(acc: float) -> list[float]:
        r = accuracy_interval(acc, n, method)
        return [r["low"], r["high"]]

    out: dict[str, Any] = {"method": method, "level": LEVEL, "n": n, "clean_acc": iv(metrics["clean_acc"]),
                           "robust_acc": {k: iv(v) for k, v in metrics["robust_acc"].items()},
                           "worst_case_acc": iv(metrics["worst_case_acc"])}
    if "autoattack_acc" in metrics:
        out["autoattack_acc"] = iv(metrics["autoattack_acc"])
    if metrics.get("certified"):
        out["certified"] = {k: iv(v) for k, v in metrics["certified"].items()}
    return out


PER_IMAGE = "per_image.csv"


def write_per_image(run_dir: Path, y: Tensor, results: dict[str, Tensor], first_index: int = 0) -> Path:
    """per_image.csv: one row per test image (its index in the test split, label, 1/0 clean correct and
    robust to each attack), so later comparisons pair runs image by image without attacking them again."""
    from robustnas.core.rundir import atomic_write_text

    cols = list(results)
    table = torch.stack([results[c].to(torch.int64) for c in cols], 1).tolist()
    labels = y.cpu().tolist()
    rows = [",".join(["index", "label", *cols])]
    rows += [",".join(map(str, [first_index + i, labels[i], *r])) for i, r in enumerate(table)]
    atomic_write_text(run_dir / PER_IMAGE, "\n".join(rows) + "\n")
    return run_dir / PER_IMAGE


def read_per_image(run_dir: Path) -> Optional[dict[str, Any]]:
    """The columns of a run's per_image.csv as numpy arrays ("index", "label", "clean", one per attack), or
    None for a run evaluated before the file existed."""
    import numpy as np

    path = Path(run_dir) / PER_IMAGE
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    cols = lines[0].split(",")
    data = np.array([ln.split(",") for ln in lines[1:]], dtype=np.int64).reshape(-1, len(cols))
    return {c: (data[:, j] if c in ("index", "label") else data[:, j].astype(bool)) for j, c in enumerate(cols)}


# ------------------------------------------------------------------------------------------ a run directory
def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} has no config.yaml, so its dataset is unknown: is it a run directory?")
    return load_yaml(path)


def _load(run_dir: Path, device: str) -> tuple[nn.Module, dict]:
    from robustnas.nets.arch import load_model

    try:
        return load_model(run_dir, device=device)
    except RuntimeError as e:  # load_state_dict reports shape mismatches as RuntimeError even when not strict
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise UserError(f"weights in {run_dir}/model.safetensors do not match the architecture in "
                        f"model.json: {detail}") from None


def _setup(run_dir: Path, dev: torch.device, eps: Optional[float | str]) -> tuple[nn.Module, Any, str, float, dict]:
    """A run directory's model, dataset, norm, eps (the run's unless given) and the metrics.json it holds."""
    from robustnas.data.datasets import load_dataset
    from robustnas.core.rundir import read_json

    model, spec = _load(run_dir, str(dev))
    cfg = _run_config(run_dir)
    old = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
    data_cfg = cfg.get("data") or {}
    attack_cfg = ((cfg.get("train") or {}).get("attack") or {})
    name = old.get("dataset") or data_cfg.get("dataset")
    if not name:
        raise UserError(f"{run_dir}/config.yaml names no dataset (data.dataset)")
    data = load_dataset(name, data_dir=data_cfg.get("data_dir"), val_size=data_cfg.get("val_size", 0.1),
                        subset=data_cfg.get("subset"), seed=int(cfg.get("seed", 0)))
    in_shape = tuple(spec.get("config", spec).get("in_shape", data.meta.shape))
    if tuple(in_shape) != tuple(data.meta.shape):
        raise UserError(f"the model of {run_dir} takes {tuple(in_shape)} images but {name} has "
                        f"{tuple(data.meta.shape)}")
    norm = attack_cfg.get("norm", "Linf")
    eps_text = eps if eps is not None else (old.get("eps") or attack_cfg.get("eps") or data.meta.eps)
    eps_float = eps_value(eps_text, norm)
    return model, data, norm, eps_float, old


def evaluate_run(
    run_dir: str | Path,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    eps: Optional[float | str] = None,
    n: int = 1000,
    batch_size: int = 256,
    certify: Sequence[str] = (),
    transfer_from: Optional[str | Path] = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    interval: str = "wilson",
    fold_bn: bool = True,
) -> dict:
    """Evaluate the model of a run directory on the first n test images of its dataset, at the run's eps
    unless told; write metrics.json (the training section kept), per_image.csv, report.md and plots/, return
    the metrics. `fold_bn=False` attacks the model as it is instead of its BatchNorm-folded copy."""
    from robustnas.training.trainer import resolve_device

    run_dir = Path(run_dir)
    for a in attacks:
        get_attack(a)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"n must be a positive number of test images, got {n!r}")
    if interval not in INTERVALS:
        raise UserError(f"unknown interval {interval!r}; use one of {', '.join(INTERVALS)}")
    dev = resolve_device(device)
    model, data, norm, eps_float, old = _setup(run_dir, dev, eps)
    surrogate = None
    if transfer_from is not None:
        surrogate, _ = _load(Path(transfer_from), str(dev))
        if "transfer" not in [a.strip().lower() for a in attacks]:
            attacks = list(attacks) + ["transfer"]
    x, y = data.test.x[:n], data.test.y[:n]

    log: list[str] = []
    per_image: dict[str, Tensor] = {}
    metrics = evaluate_model(model, x, y, eps_float, attacks=attacks, norm=norm, certify=certify,
                             transfer_from=surrogate, batch_size=batch_size, device=dev, seed=seed,
                             progress=progress, dataset_meta=data.meta, log=log, per_image=per_image,
                             interval=interval, fold_bn=fold_bn)
    if transfer_from is not None:
        metrics["transfer_from"] = str(transfer_from)
    metrics["dataset"] = data.meta.name
    return write_evaluation(run_dir, {**old, **metrics}, y, per_image, log)  # the training section is kept


def write_evaluation(run_dir: str | Path, metrics: dict, y: Tensor, per_image: dict[str, Tensor],
                     log: Sequence[str] = ()) -> dict:
    """An evaluation's files in `run_dir`: evaluate.log (pyautoattack's lines, if any), per_image.csv,
    report.md with plots/, and metrics.json last (its presence marks the evaluation as finished)."""
    from robustnas.core.rundir import atomic_write_text, write_json
    from robustnas.evaluation.report import write_run_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if log:
        atomic_write_text(run_dir / "evaluate.log", "\n".join(log) + "\n")
    metrics = {**metrics, "per_image": write_per_image(run_dir, y, per_image).name}
    write_run_report(run_dir, metrics)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def extend_per_image(run_dir: str | Path, count: int, batch_size: int = 256, device: str = "auto",
                     seed: int = 0, fold_bn: bool = True) -> int:
    """Attack the next `count` test images (after those in per_image.csv) with the attacks the file holds
    and append their rows: sequential evaluation grows a run's paired results in chunks. metrics.json (and
    its sanity checks) stay those of the first evaluation. Returns the number of rows now in the file."""
    from rich.progress import Progress as Bar

    from robustnas.training.trainer import resolve_device

    run_dir = Path(run_dir)
    table = read_per_image(run_dir)
    if table is None:
        raise UserError(f"{run_dir} has no {PER_IMAGE}: run `robustnas evaluate {run_dir}` first")
    dev = resolve_device(device)
    model, data, norm, eps, _ = _setup(run_dir, dev, None)
    start = int(table["index"].max()) + 1
    x, y = data.test.x[start:start + count].to(dev), data.test.y[start:start + count].to(dev)
    if len(x) == 0:
        return len(table["index"])
    model.to(dev)
    names = [c for c in table if c not in ("index", "label", "clean")]
    if "transfer" in names:
        raise UserError(f"{run_dir} was evaluated with the transfer attack, which sequential evaluation cannot "
                        f"extend (no surrogate); drop it from the attacks")
    runner = AttackRunner(model, x, y, eps, norm, batch_size, seed, Bar(disable=True), None, [], {}, fold_bn)
    new = {"clean": runner.clean, **{k: runner.run(k) for k in names}}
    old = {c: torch.as_tensor(table[c]) for c in ("clean", *names)}
    labels = torch.cat([torch.as_tensor(table["label"]), y.cpu()])
    merged = {c: torch.cat([old[c], new[c].cpu()]) for c in old}
    write_per_image(run_dir, labels, merged, first_index=int(table["index"][0]))
    return len(labels)
