"""The one Trainer: standard, PGD-AT (Madry), TRADES and FGSM-RS training with checkpoints and exact resume.

Exact resume works because nothing random carries over between epochs: every epoch reseeds the global
RNG and its data order from (seed, epoch), the learning rate is a pure function of the iteration, and the
checkpoint holds the weights, the optimizer's buffers, the best weights so far and the history.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch import Tensor, nn

from robustnas.robustness.attacks import accuracy, eval_mode, fgsm_rs, pgd, robust_accuracy
from robustnas.core.config import TrainConfig, parse_eps
from robustnas.data.datasets import Dataset
from robustnas.core.rundir import atomic_write_text, save_tensors


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from robustnas.core.errors import UserError

        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(device)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


def cosine_lr(lr: float, lr_min: float, t: float) -> float:
    """Cosine annealing from lr at t = 0 to lr_min at t = 1: the one schedule of training and search."""
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t)) / 2


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


@dataclass
class TrainResult:
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = -1
    best_val_clean: float = 0.0
    best_val_robust: float = 0.0


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
        self.best_state: Optional[dict[str, Tensor]] = None
        self.start_epoch = 0

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

    # ------------------------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> TrainResult:
        if resume:
            self._load_checkpoint()
        cfg = self.cfg
        xtr, ytr = self.data.train.x, self.data.train.y
        n = len(xtr)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TimeRemainingColumn(), disable=not self.progress, transient=False)
        with bar:
            task = bar.add_task("train", total=total, completed=self.start_epoch * steps_per_epoch, info="")
            for epoch in range(self.start_epoch, cfg.epochs):
                torch.manual_seed(epoch_seed(self.seed, epoch))
                g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
                order = torch.randperm(n, generator=g)
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=self.device)
                correct = torch.zeros((), dtype=torch.long, device=self.device)
                seen = 0
                for b in range(steps_per_epoch):
                    idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                    x = xtr[idx].to(self.device, non_blocking=True)
                    y = ytr[idx].to(self.device, non_blocking=True)
                    it = epoch * steps_per_epoch + b
                    loss, corr = self.train_step(x, y, lr_at(cfg, it, total, steps_per_epoch))
                    loss_sum += loss * len(y)
                    correct += corr
                    seen += len(y)
                    if self.progress and (b % 10 == 0 or b == steps_per_epoch - 1):
                        ips = seen / (time.perf_counter() - t0)
                        bar.update(task, completed=it + 1, info=(
                            f"ep {epoch + 1}/{cfg.epochs} loss {loss_sum.item() / seen:.3f} "
                            f"acc {correct.item() / seen:.3f} {ips:.0f} img/s"))
                train_seconds = time.perf_counter() - t0
                val_clean, val_rob = self.validate()
                log = EpochLog(epoch, lr_at(cfg, (epoch + 1) * steps_per_epoch - 1, total, steps_per_epoch),
                               loss_sum.item() / seen, correct.item() / seen, val_clean, val_rob,
                               time.perf_counter() - t0, seen / train_seconds)
                self.result.history.append(log)
                self._maybe_keep_best(log)
                if self.progress:
                    bar.update(task, info=f"ep {epoch + 1}/{cfg.epochs} val clean {val_clean:.3f} "
                                          f"robust {val_rob:.3f}")
                self._save_checkpoint(epoch)
                if self.on_epoch_end:
                    self.on_epoch_end(log)
        if cfg.select != "last" and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.result

    def _maybe_keep_best(self, log: EpochLog) -> None:
        key = {"robust": (log.val_robust, log.val_clean), "clean": (log.val_clean, log.val_robust),
               "last": (log.epoch, 0)}[self.cfg.select]
        best_key = {"robust": (self.result.best_val_robust, self.result.best_val_clean),
                    "clean": (self.result.best_val_clean, self.result.best_val_robust),
                    "last": (self.result.best_epoch, 0)}[self.cfg.select]
        if self.result.best_epoch < 0 or key > best_key:
            self.result.best_epoch = log.epoch
            self.result.best_val_clean = log.val_clean
            self.result.best_val_robust = log.val_robust
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, epoch: int) -> None:
        if self.out_dir is None:
            return
        tensors: dict[str, Tensor] = {}
        for k, v in self.model.state_dict().items():
            tensors[f"model.{k}"] = v.detach().cpu().contiguous()
        for k, v in (self.best_state or {}).items():
            tensors[f"best.{k}"] = v.detach().cpu().contiguous()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"opt.{i}"] = buf.detach().cpu().contiguous()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_tensors(self.out_dir / "checkpoint.safetensors", tensors)
        meta = {"epoch": epoch, "result": {**asdict(self.result)}}
        atomic_write_text(self.out_dir / "checkpoint.json", json.dumps(meta, indent=1))

    def _load_checkpoint(self) -> None:
        if self.out_dir is None or not (self.out_dir / "checkpoint.json").exists():
            return  # nothing to resume: start from scratch
        meta = json.loads((self.out_dir / "checkpoint.json").read_text())
        tensors = load_file(str(self.out_dir / "checkpoint.safetensors"), device=str(self.device))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        self.best_state = best or None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if f"opt.{i}" in tensors:
                self.optimizer.state[p]["momentum_buffer"] = tensors[f"opt.{i}"].clone()
        r = meta["result"]
        self.result = TrainResult([EpochLog(**h) for h in r["history"]], r["best_epoch"],
                                  r["best_val_clean"], r["best_val_robust"])
        self.start_epoch = meta["epoch"] + 1
