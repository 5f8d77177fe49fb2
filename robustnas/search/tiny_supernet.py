"""One-shot training and scoring of the tiny-block supernet (spaces/tiny.py's TinySuperNet), as TAM-NAS
uses them.

Training: every step trains one subnet drawn uniformly from the encoding (or, with the sandwich rule, the
largest, the smallest and `sandwich_random` random ones, gradients summed), on clean, PGD or FGSM-RS
examples of that subnet, with epsilon ramped up from 0 over `eps_warmup_epochs` (on Fashion-MNIST at eps
0.1, a supernet trained at full epsilon from the first step stayed near chance for the first hundreds of
steps). The attack sees the subnet normalised by its batch statistics on the clean batch, frozen while it
runs: the shared BN running statistics describe no single subnet, and live batch statistics would couple
the images of the batch. SGD with a per-step cosine learning rate. TAM-NAS runs the epochs through the epoch
scaffold (training/loop.py: seeding from (seed, epoch), checkpoints, resume); this file is one epoch's work.

Scoring: a subnet is extracted with inherited weights, its BatchNorm recalibrated on fixed training
images, then its clean and robust error measured on fixed held-out images: PGD error, or with
`attack="aa-rank"` its error under aa-rank (AutoAttack-rank, not standard AA) on its BatchNorm-folded copy.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustnas.robustness.attacks import accuracy, fgsm_rs, pgd, robust_accuracy
from robustnas.core.config import parse_eps
from robustnas.data.datasets import Dataset
from robustnas.evaluation.evaluate import accuracy_under_attack
from robustnas.nets.size import count_params
from robustnas.nets.spaces.tiny import TinySuperNet, recalibrate_bn
from robustnas.search.nsga2 import ROBUST_ERR
from robustnas.training.loop import cosine_lr, epoch_seed, epoch_steps


def encoding_seed(seed: int, encoding: Sequence[int]) -> int:
    """A seed from (seed, encoding), the same in every process: a subnet's score depends on nothing else."""
    return (zlib.crc32(np.asarray(encoding, dtype=np.int64).tobytes()) + 1_000_003 * seed) % (2**63 - 1)


def scoring_images(data: Dataset, seed: int, recal_n: int, eval_n: int,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """The fixed images every subnet is scored on: `recal_n` random training images for the BN
    recalibration, the first `eval_n` validation images (and labels) for the errors."""
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(epoch_seed(seed, 20_000)))
    recal_x = data.train.x[perm[:recal_n]].to(device)
    n = min(eval_n, len(data.val))
    return recal_x, data.val.x[:n].to(device), data.val.y[:n].to(device)


class SubnetScorer:
    """Scores one subnet: extract it with inherited weights, recalibrate BN on fixed training images,
    then clean and robust error on held-out images and its parameter count. `attack` names the robust
    error: "pgd" (PGD-`pgd_steps`, key "pgd_err") or "aa-rank" (AutoAttack-rank, not standard AA, on the
    BatchNorm-folded copy as an evaluation attacks it, key "aa_rank_err"); the score's "score_attack" says
    which. The attack's noise is seeded from (seed, encoding). Picklable (it carries the supernet and its
    images), so any executor can run it."""

    def __init__(self, supernet: TinySuperNet, recal_x: Tensor, eval_x: Tensor, eval_y: Tensor, eps: float,
                 norm: str = "Linf", pgd_steps: int = 10, recal_batch_size: int = 64, seed: int = 0,
                 attack: str = "pgd"):
        if attack not in ROBUST_ERR:
            raise ValueError(f"unknown score attack {attack!r}; known: {', '.join(ROBUST_ERR)}")
        self.supernet = supernet
        self.recal_x, self.eval_x, self.eval_y = recal_x, eval_x, eval_y
        self.eps, self.norm, self.pgd_steps = eps, norm, pgd_steps
        self.recal_batch_size, self.seed, self.attack = recal_batch_size, seed, attack

    def __call__(self, encoding: Sequence[int]) -> dict[str, Any]:
        encoding = [int(v) for v in encoding]
        net = self.supernet.extract(encoding)
        recalibrate_bn(net, self.recal_x.split(self.recal_batch_size))
        x, y = self.eval_x, self.eval_y
        clean = accuracy(net, x, y)
        seed = encoding_seed(self.seed, encoding)
        if self.attack == "pgd":
            gen = torch.Generator(device=x.device).manual_seed(seed)
            robust = robust_accuracy(net, x, y, lambda xb, yb: pgd(net, xb, yb, self.eps, steps=self.pgd_steps,
                                                                   norm=self.norm, generator=gen))
        else:
            robust = accuracy_under_attack(net, x, y, self.eps, self.attack, self.norm, seed=seed)
        return {"encoding": encoding, "clean_err": 1.0 - clean, ROBUST_ERR[self.attack]: 1.0 - robust,
                "score_attack": self.attack, "params": count_params(net)}


class SupernetTrainer:
    """Trains `net` one-shot on `data.train`. `cfg` carries the supernet-training settings of TamNasConfig
    (epochs, batch_size, max_batches_per_epoch, lr, lr_min, momentum, weight_decay, grad_clip, sampling,
    sandwich_random, adv, attack_steps, eps_warmup_epochs, step_size)."""

    def __init__(self, net: TinySuperNet, cfg, data: Dataset, eps: float, norm: str = "Linf", seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.net, self.cfg, self.data, self.space = net, cfg, data, net.space
        self.eps, self.norm, self.seed, self.device = eps, norm, seed, torch.device(device)
        self.step_size = parse_eps(cfg.step_size, norm) if cfg.step_size else None
        decay, no_decay = [], []
        for p in net.parameters():
            (no_decay if p.dim() <= 1 else decay).append(p)
        self.opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum)
        self.steps_per_epoch = epoch_steps(len(data.train), cfg.batch_size, cfg.max_batches_per_epoch)

    def step_subnets(self, rng: np.random.Generator) -> list[list[int]]:
        if self.cfg.sampling == "sandwich":
            return [self.space.largest(), self.space.smallest()] + \
                   [self.space.sample(rng) for _ in range(self.cfg.sandwich_random)]
        return [self.space.sample(rng)]

    def training_examples(self, x: Tensor, y: Tensor, eps: Optional[float] = None) -> Tensor:
        """x, or its PGD / FGSM-RS version against the active subnet. The attack sees the subnet as the
        training step does, normalised by its batch statistics on clean x, frozen during the attack (the
        shared running statistics describe no single subnet). A fixed step size shrinks with a ramped eps."""
        eps = self.eps if eps is None else eps
        if eps <= 0 or self.cfg.adv == "none":
            return x
        step = self.step_size * eps / self.eps if self.step_size else None
        self.net.train()
        with self.net.frozen_batch_stats(x):
            if self.cfg.adv == "pgd":
                return pgd(self.net, x, y, eps, steps=self.cfg.attack_steps, step_size=step, norm=self.norm,
                           keep_mode=True)
            return fgsm_rs(self.net, x, y, eps, step_size=step, norm=self.norm, keep_mode=True)

    def eps_at(self, it: int) -> float:
        """The training epsilon at iteration `it`: a linear ramp over `eps_warmup_epochs`, then eps."""
        warm = self.cfg.eps_warmup_epochs * self.steps_per_epoch
        return self.eps if it >= warm else self.eps * (it + 1) / (warm + 1)

    def train_step(self, x: Tensor, y: Tensor, encodings: Sequence[Sequence[int]], lr: float,
                   eps: Optional[float] = None) -> tuple[float, int, int]:
        """One optimizer step on the summed losses of `encodings` (each on its own adversarial examples at
        `eps`, default the search's). Returns (summed loss, correct predictions, predictions)."""
        self.net.train()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss_sum, correct = 0.0, 0
        for enc in encodings:
            self.net.set_active(enc)
            x_in = self.training_examples(x, y, eps)
            logits = self.net(x_in)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            loss_sum += loss.item()
            correct += int((logits.detach().argmax(1) == y).sum())
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.grad is not None], self.cfg.grad_clip)
        self.opt.step()
        return loss_sum, correct, len(y) * len(encodings)

    def train_epoch(self, epoch: int, g: torch.Generator, step_done: Callable[[Callable[[], str]], None],
                    scorer: Optional[SubnetScorer] = None) -> dict[str, Any]:
        """One epoch in the order `g` draws (the subnets from a numpy generator seeded by (seed, epoch)),
        calling `step_done` after every step (the epoch loop's); its record for search.jsonl. With `scorer`,
        the largest and smallest subnets are scored after it (val_clean_*, val_robust_*)."""
        cfg = self.cfg
        order = torch.randperm(len(self.data.train), generator=g)
        rng = np.random.default_rng([self.seed, epoch])
        total = cfg.epochs * self.steps_per_epoch
        x_tr, y_tr = self.data.train.x, self.data.train.y
        t0 = time.perf_counter()
        loss_sum, correct, seen, images = 0.0, 0, 0, 0
        for b in range(self.steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x, y = x_tr[idx].to(self.device), y_tr[idx].to(self.device)
            it = epoch * self.steps_per_epoch + b
            lr = cosine_lr(cfg.lr, cfg.lr_min, it / max(total, 1))
            l, c, n = self.train_step(x, y, self.step_subnets(rng), lr, self.eps_at(it))
            loss_sum, correct, seen, images = loss_sum + l * len(y), correct + c, seen + n, images + len(y)
            step_done(lambda: f"supernet loss {loss_sum / seen:.3f} acc {correct / seen:.3f} "
                              f"{images / (time.perf_counter() - t0):.0f} img/s")
        train_seconds = time.perf_counter() - t0
        last = (epoch + 1) * self.steps_per_epoch - 1
        record: dict[str, Any] = {"phase": "supernet", "epoch": epoch, "lr": cosine_lr(cfg.lr, cfg.lr_min, last / max(total, 1)),
                                  "eps": self.eps_at(last),
                                  "train_loss": loss_sum / seen, "train_acc": correct / seen}
        if scorer is not None:
            for which, enc in (("largest", self.space.largest()), ("smallest", self.space.smallest())):
                s = scorer(enc)
                record[f"val_clean_{which}"], record[f"val_robust_{which}"] = 1 - s["clean_err"], 1 - s["pgd_err"]
        record.update({"seconds": time.perf_counter() - t0, "images_per_s": images / train_seconds})
        return record
