"""The one Trainer: standard, PGD-AT (Madry), TRADES and FGSM-RS training. Its epochs run through the epoch
scaffold (training/loop.py): per-epoch seeding from (seed, epoch), a checkpoint after every epoch
(checkpoint.json + checkpoint.e<epoch>.safetensors in out_dir), exact resume, and the best epoch kept by the
`select` rule. The learning rate is a pure function of the iteration (`lr_at`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustnas.robustness.attacks import accuracy, eval_mode, fgsm_rs, pgd, robust_accuracy
from robustnas.core.config import TrainConfig, parse_eps
from robustnas.data.datasets import Dataset
from robustnas.training.loop import EpochLoop, cosine_lr, epoch_seed, epoch_steps

__all__ = ["EpochLog", "TrainResult", "Trainer", "lr_at", "resolve_device"]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from robustnas.core.errors import UserError

        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(device)


def lr_at(cfg: TrainConfig, it: int, total: int, steps_per_epoch: int) -> float:
    """Learning rate at iteration `it` of `total`: optional linear warm-up, then cosine / piecewise / constant."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if it < warm:
        return cfg.lr * (it + 1) / warm
    t = (it - warm) / max(total - warm, 1)
    if cfg.schedule == "cosine":
        return cosine_lr(cfg.lr, 0.0, t)
    if cfg.schedule == "piecewise":
        return cfg.lr * (0.1 if t >= 0.5 else 1.0) * (0.1 if t >= 0.75 else 1.0)
    return cfg.lr


@dataclass
class EpochLog:
    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_clean: float
    val_robust: float
    seconds: float
    images_per_s: float
    val_n: int = 0  # images val_clean / val_robust were measured on (0: a record from before it was kept)


@dataclass
class TrainResult:
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = -1
    best_val_clean: float = 0.0
    best_val_robust: float = 0.0
    seconds: float = 0.0    # wall time of the epochs, summed over the sessions (run and resumes) that ran them
    sessions: int = 1


class Trainer:
    """Trains `model` on `data` with the recipe in `cfg`; checkpoints into `out_dir` every epoch."""

    def __init__(self, model: nn.Module, data: Dataset, cfg: TrainConfig, eps: float, seed: int = 0,
                 device: str | torch.device = "cpu", out_dir: Optional[Path] = None, progress: bool = True,
                 on_epoch_end: Optional[Callable[[EpochLog], None]] = None):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device)
        self.data = data
        self.cfg = cfg
        self.eps = eps
        self.step_size = parse_eps(cfg.attack.step_size) if cfg.attack.step_size else None
        self.seed = seed
        self.out_dir = Path(out_dir) if out_dir else None
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() <= 1 else decay).append(p)
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.result = TrainResult()

    # ------------------------------------------------------------------------------------ one step
    def adversarial_examples(self, x: Tensor, y: Tensor) -> Tensor:
        a, m = self.cfg.attack, self.model
        if self.cfg.adv == "pgd":
            return pgd(m, x, y, self.eps, steps=a.steps, step_size=self.step_size, norm=a.norm)
        if self.cfg.adv == "fgsm-rs":
            return fgsm_rs(m, x, y, self.eps, step_size=self.step_size)
        if self.cfg.adv == "trades":
            with torch.no_grad(), eval_mode(m):
                p_clean = F.softmax(m(x), dim=1)

            def kl(logits: Tensor, _: Tensor) -> Tensor:
                return F.kl_div(F.log_softmax(logits, 1), p_clean, reduction="none").sum(1)

            jitter = 0.001 * torch.randn_like(x)  # TRADES starts next to x, not at a uniform point
            return pgd(m, x, y, self.eps, steps=a.steps, step_size=self.step_size, norm=a.norm, loss=kl,
                       init=jitter)
        return x

    def loss(self, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Training loss and the logits it was computed on (for the running accuracy)."""
        if self.cfg.adv == "trades":
            logits = self.model(torch.cat([x, x_adv]))
            clean, adv = logits[: len(x)], logits[len(x):]
            robust = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
            return F.cross_entropy(clean, y) + self.cfg.trades_beta * robust, clean
        logits = self.model(x_adv)
        return F.cross_entropy(logits, y), logits

    def train_step(self, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial_examples(x, y)
        self.model.train()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss, logits = self.loss(x, x_adv, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    # ------------------------------------------------------------------------------------ validation
    def validate(self) -> tuple[float, float]:
        n = min(self.cfg.val_n, len(self.data.val.x))
        x = self.data.val.x[:n].to(self.device)
        y = self.data.val.y[:n].to(self.device)
        clean = accuracy(self.model, x, y)
        torch.manual_seed(epoch_seed(self.seed, 10_000))  # same attack noise at every validation
        a = self.cfg.attack
        rob = robust_accuracy(self.model, x, y, lambda xb, yb: pgd(
            self.model, xb, yb, self.eps, steps=self.cfg.val_steps, norm=a.norm))
        return clean, rob

    # ------------------------------------------------------------------------------------ the epochs
    def identity(self) -> dict:
        """What must match for a checkpoint to be resumed (the network itself is checked by its shapes)."""
        return {"config": self.cfg.model_dump(mode="json"), "seed": self.seed, "eps": self.eps,
                "dataset": self.data.meta.name, "train_size": len(self.data.train.x)}

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        self.steps_per_epoch = epoch_steps(len(self.data.train.x), cfg.batch_size)
        select = {"robust": lambda r: (r["val_robust"], r["val_clean"]),
                  "clean": lambda r: (r["val_clean"], r["val_robust"]), "last": None}[cfg.select]
        self.loop = EpochLoop(self.out_dir, "checkpoint", self.seed, cfg.epochs, self.steps_per_epoch,
                              self.identity(), {"model": self.model, "opt": self.optimizer}, select=select,
                              best_of="model", progress=self.progress, description="train")
        if resume:
            self.loop.resume()
        on_end = self.on_epoch_end
        self.loop.run(self.train_epoch, None if on_end is None else lambda record: on_end(EpochLog(**record)))
        if select is not None:
            self.loop.restore_best()
        history = [EpochLog(**h) for h in self.loop.history]
        best = self.loop.best_record() if select is not None else (self.loop.history or [None])[-1]
        clock = {"seconds": self.loop.clock.seconds(), "sessions": self.loop.clock.sessions}
        self.result = TrainResult(history, **clock) if best is None else \
            TrainResult(history, best["epoch"], best["val_clean"], best["val_robust"], **clock)
        return self.result

    def train_epoch(self, epoch: int, g: torch.Generator) -> dict:
        """One epoch in the order `g` draws, then validation: the epoch's record (an EpochLog as a dict)."""
        cfg, spe = self.cfg, self.steps_per_epoch
        xtr, ytr = self.data.train.x, self.data.train.y
        total = cfg.epochs * spe
        order = torch.randperm(len(xtr), generator=g)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for b in range(spe):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = xtr[idx].to(self.device, non_blocking=True)
            y = ytr[idx].to(self.device, non_blocking=True)
            loss, corr = self.train_step(x, y, lr_at(cfg, epoch * spe + b, total, spe))
            loss_sum += loss * len(y)
            correct += corr
            seen += len(y)
            self.loop.step_done(lambda: f"loss {loss_sum.item() / seen:.3f} acc {correct.item() / seen:.3f} "
                                        f"{seen / (time.perf_counter() - t0):.0f} img/s")
        train_seconds = time.perf_counter() - t0
        val_clean, val_rob = self.validate()
        return asdict(EpochLog(epoch, lr_at(cfg, (epoch + 1) * spe - 1, total, spe), loss_sum.item() / seen,
                               correct.item() / seen, val_clean, val_rob, time.perf_counter() - t0,
                               seen / train_seconds, min(cfg.val_n, len(self.data.val.x))))
