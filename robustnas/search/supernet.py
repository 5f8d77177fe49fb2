"""The differentiable search loop shared by every DARTS-space gradient method (DARTS, ARNAS, DSRNA, ...).

Bilevel search as in DARTS: the training set is split (seeded) into a weight half and an alpha half;
each step takes one batch of each, updates the alphas on the alpha batch (first order, or second
order through one unrolled weight step) and then the weights on the weight batch (SGD, natural or
adversarial examples). A method changes only what it must: usually `alpha_step`, sometimes
`weight_loss` or `build_supernet`.

The epochs run through the epoch scaffold (training/loop.py): each reseeds from (seed, epoch), the
learning rate is a function of the epoch, and the checkpoint written after every epoch
(search_checkpoint.json + .e<epoch>.safetensors) holds the supernet (weights, alphas, BN statistics), both
optimizers' state, the method's own state (`state_tensors`) and the history. A search killed anywhere and
resumed ends with the same numbers and genotype as one that ran through.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from robustnas.evaluation.analysis import search_decision
from robustnas.robustness.attacks import accuracy, fgsm_rs, pgd, robust_accuracy
from robustnas.core.config import Base, EpsText, parse_eps
from robustnas.data.datasets import DatasetMeta
from robustnas.core.errors import UserError
from robustnas.nets.genotypes import save_genotype
from robustnas.search.base import SearchContext, SearchResult
from robustnas.nets.spaces import get_space
from robustnas.nets.spaces.darts import SuperNet
from robustnas.training.loop import EpochLoop, SessionClock, cosine_lr, epoch_seed, epoch_steps
from robustnas.training.trainer import resolve_device

CHECKPOINT = "search_checkpoint"  # .json + .e<epoch>.safetensors; not "checkpoint": the Trainer's, in a run dir

LossFn = Callable[[nn.Module], Tensor]  # model -> scalar loss; evaluated on the supernet or its unrolled copy


class SupernetConfig(Base):
    """Settings of a DARTS-space gradient search. Defaults are CPU-sized; comments give the published
    CIFAR-10 values (DARTS, Liu et al. 2019; ARNAS, CVPR 2024)."""

    # --- space
    space: Literal["darts", "arnas"] = "darts"
    C: int = Field(default=8, ge=1)            # DARTS 16, ARNAS 24
    layers: int = Field(default=5, ge=1)       # DARTS 8, ARNAS 8
    partial_channels_k: int = Field(default=1, ge=1)  # PC-DARTS 4; 1 = every channel through every op
    # --- schedule and data
    epochs: int = Field(default=10, ge=1)      # 50
    warmup_epochs: int = Field(default=0, ge=0)  # weight steps only, alphas frozen (DARTS 0)
    batch_size: int = Field(default=32, ge=1)  # DARTS 64, ARNAS 32
    train_portion: float = Field(default=0.5, gt=0, lt=1)  # share of the training set for the weights: 0.5
    max_batches_per_epoch: Optional[int] = Field(default=None, ge=1)  # CPU budgets; None: the whole half
    # --- weight step: SGD, cosine per epoch from w_lr to w_lr_min
    w_lr: float = Field(default=0.025, gt=0)      # 0.025
    w_lr_min: float = Field(default=0.001, ge=0)  # 0.001
    w_momentum: float = Field(default=0.9, ge=0)  # 0.9
    w_weight_decay: float = Field(default=3e-4, ge=0)  # 3e-4
    grad_clip: Optional[float] = Field(default=5.0, gt=0)  # 5
    weight_adv: Literal["none", "pgd", "fgsm-rs"] = "none"  # examples the weights learn on (ARNAS: pgd)
    attack_steps: int = Field(default=7, ge=1)    # PGD steps of the weight step (ARNAS: 7)
    step_size: EpsText = None                     # None: PGD step_size_fraction*eps or 2.5*eps/steps; FGSM-RS 1.25*eps
    step_size_fraction: Optional[float] = Field(default=None, gt=0)  # PGD step as a share of eps (ARNAS code: 1/4)
    # BatchNorm during the search-time attacks: "eval" (running statistics; the project's attack convention) or
    # "train" (batch statistics, and every attack forward updates the running statistics, as a model left in
    # train mode does: the ARNAS code runs cleverhans' PGD so)
    attack_bn_mode: Literal["eval", "train"] = "eval"
    attack_clip: bool = True                      # clip search-time adversarial inputs to [0, 1] (ARNAS code: no)
    # --- alpha step: Adam
    alpha_lr: float = Field(default=3e-4, gt=0)   # 3e-4
    alpha_betas: tuple[float, float] = (0.5, 0.999)  # (0.5, 0.999)
    alpha_weight_decay: float = Field(default=1e-3, ge=0)  # 1e-3
    order: Literal["first", "second"] = "first"   # DARTS reports both; ARNAS code uses second
    xi: Optional[float] = Field(default=None, ge=0)  # unrolled step size; None: the current weight lr (DARTS)
    # paper: w' = w - xi*grad; the DARTS code adds the momentum buffer and weight decay to the unrolled step
    unrolled_momentum: bool = False
    # Hessian-vector product of the second-order gradient: central finite differences at w +- r/||v|| * v
    # (DARTS, r = 0.01), or exact by double backward (about twice the memory). On ReLU / max-pool nets the
    # difference straddles kinks, so "finite-difference" is a smoothed version of the exact product.
    hvp: Literal["finite-difference", "autograd"] = "finite-difference"
    hvp_r: float = Field(default=0.01, gt=0)
    # --- per-epoch validation of the supernet on the first val_n images of the validation split
    val_n: int = Field(default=256, ge=1)
    val_steps: int = Field(default=10, ge=1)      # PGD steps of the robust validation accuracy

    @model_validator(mode="after")
    def _check_epochs(self) -> "SupernetConfig":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} leaves no epoch for the alphas "
                             f"(epochs={self.epochs})")
        return self


@dataclass
class SearchBatch:
    """One search step's inputs: a weight batch (and its adversarial version, x_w itself when training
    naturally) and an alpha batch; the step's weight learning rate and position."""

    x_w: Tensor
    y_w: Tensor
    x_w_adv: Tensor
    x_a: Tensor
    y_a: Tensor
    lr: float
    epoch: int
    step: int


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def term_share(g_main: Sequence[Tensor], g_term: Sequence[Tensor], name: str) -> dict[str, Tensor]:
    """How much a regulariser steers the alphas: the alpha-gradient norms of the main loss (grad_ce) and of the
    term (grad_<name>), the term's share ||g_term|| / (||g_main|| + ||g_term||) (<name>_share) and the cosine of
    the two (grad_cos)."""
    g_main, g_term = _flat(g_main), _flat(g_term)
    n_main, n_term = g_main.norm(), g_term.norm()
    total = n_main + n_term
    return {"grad_ce": n_main, f"grad_{name}": n_term, f"{name}_share": n_term / total if total > 0 else total,
            "grad_cos": F.cosine_similarity(g_main, g_term, dim=0, eps=1e-30)}


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """d loss / d params, zeros for parameters the loss does not reach (e.g. an alpha set of a cell kind
    that a small network has no cell of, or a loss that is constant: a radius of 0)."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class SupernetSearch:
    """Base class of the DARTS-space gradient strategies (not registered itself).

    Subclasses set `name` and `Config` (a SupernetConfig subclass with the method's defaults) and
    override `alpha_step` (and, when the method needs it, `weight_loss`, `build_supernet`,
    `epoch_info`, `state_tensors` / `load_state_tensors`).
    """

    name: ClassVar[str] = "supernet"
    Config: ClassVar[type[SupernetConfig]] = SupernetConfig
    # alpha-step figures also logged step by step: a list per epoch under "<name>_steps" in search.jsonl
    step_series: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: SupernetConfig):
        if not isinstance(cfg, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg
        self._unrolled: Optional[SuperNet] = None

    # ================================================================================ hooks
    def build_supernet(self, meta: DatasetMeta) -> SuperNet:
        cls = get_space(self.cfg.space).supernet
        return cls(self.cfg.C, meta.num_classes, self.cfg.layers, meta.shape, meta.mean, meta.std,
                   partial_channels_k=self.cfg.partial_channels_k)

    def weight_examples(self, x: Tensor, y: Tensor) -> Tensor:
        """The inputs of the weight step: x, or its PGD / FGSM-RS version against the current supernet."""
        cfg = self.cfg
        if cfg.weight_adv == "pgd":
            return self.attack(x, y, cfg.attack_steps)
        if cfg.weight_adv == "fgsm-rs":
            return fgsm_rs(self.net, x, y, self.eps, step_size=self.step_size, norm=self.norm,
                           **self._attack_mode())
        return x

    def attack(self, x: Tensor, y: Tensor, steps: int) -> Tensor:
        """The search-time PGD against the current supernet, in the BatchNorm mode, step and clipping the
        config names (`attack_bn_mode`, `step_size` / `step_size_fraction`, `attack_clip`)."""
        step = self.step_size
        if step is None and self.cfg.step_size_fraction is not None:
            step = self.cfg.step_size_fraction * self.eps
        return pgd(self.net, x, y, self.eps, steps=steps, step_size=step, norm=self.norm, **self._attack_mode())

    def _attack_mode(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"clip": (0.0, 1.0) if self.cfg.attack_clip else (-math.inf, math.inf)}
        if self.cfg.attack_bn_mode == "train":
            self.net.train()
            kw["keep_mode"] = True
        return kw

    def weight_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The training loss L_train of the weights (also the one unrolled in second order) and its logits."""
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def alpha_step(self, batch: SearchBatch) -> dict[str, Any]:
        """DARTS: descend the validation cross-entropy. Returns figures to log (averaged per epoch)."""
        (grad,), (loss,) = self.hypergradients(batch, lambda m: F.cross_entropy(m(batch.x_a), batch.y_a))
        self.apply_alpha_gradient(grad)
        return {"alpha_loss": loss}

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        """Method fields added to each epoch's record before the step figures (e.g. a stage name)."""
        return {}

    def series_info(self, series: dict[str, list[float]]) -> dict[str, Any]:
        """Fields of an epoch's record from its per-step series (those named in `step_series`)."""
        return {f"{k}_steps": v for k, v in series.items()}

    def state_tensors(self) -> dict[str, Tensor]:
        """Method state beyond the supernet and optimizers, saved in the checkpoint."""
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        pass

    # ================================================================================ alpha gradients
    def hypergradients(self, batch: SearchBatch, *loss_fns: LossFn) -> tuple[list[list[Tensor]], list[Tensor]]:
        """d L / d alpha for each validation loss L (a function of the model): first order at the current
        weights, or second order through w' = w - xi * grad_w L_train(w) (DARTS eq. 7-8). Returns the
        gradients (one list per loss, one tensor per alpha set) and the detached loss values."""
        if self.cfg.order == "first":
            alphas = self.net.arch_parameters()
            grads, losses = [], []
            for fn in loss_fns:
                loss = fn(self.net)
                grads.append(_grads(loss, alphas))
                losses.append(loss.detach())
            return grads, losses
        xi = self.xi(batch)
        unrolled = self.unrolled_model(batch.x_w_adv, batch.y_w, xi)
        ua, uw = unrolled.arch_parameters(), unrolled.weight_parameters()
        grads, losses = [], []
        for fn in loss_fns:
            loss = fn(unrolled)
            g = _grads(loss, ua + uw)
            dalpha, dw = g[:len(ua)], g[len(ua):]
            hvp = self.hessian_vector_product(dw, batch.x_w_adv, batch.y_w)
            grads.append([da - xi * h for da, h in zip(dalpha, hvp)])
            losses.append(loss.detach())
        return grads, losses

    def xi(self, batch: SearchBatch) -> float:
        return batch.lr if self.cfg.xi is None else self.cfg.xi

    def unrolled_model(self, x: Tensor, y: Tensor, xi: float) -> SuperNet:
        """A copy of the supernet at w' = w - xi * grad_w L_train(w) (same alphas and buffers). The copy is
        made once and refilled every step, which saves re-building the module."""
        net = self.net
        weights = net.weight_parameters()
        loss, _ = self.weight_loss(net, x, y)
        grads = _grads(loss, weights)
        if self._unrolled is None:
            self._unrolled = copy.deepcopy(net)
        u = self._unrolled
        u.train(net.training)
        with torch.no_grad():
            for pu, p in zip(u.parameters(), net.parameters()):
                pu.copy_(p)
            for bu, b in zip(u.buffers(), net.buffers()):
                bu.copy_(b)
            for pu, p, g in zip(u.weight_parameters(), weights, grads):
                step = g
                if self.cfg.unrolled_momentum:  # the DARTS code's _compute_unrolled_model
                    step = step + self.cfg.w_weight_decay * p
                    buf = self.w_opt.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        step = step + self.cfg.w_momentum * buf
                pu.sub_(xi * step)
        for p in u.parameters():
            p.grad = None
        return u

    def hessian_vector_product(self, vector: Sequence[Tensor], x: Tensor, y: Tensor,
                               r: Optional[float] = None) -> list[Tensor]:
        """(d^2 L_train / d alpha d w) . vector by central differences at w +- R*vector, R = r / ||vector||
        (DARTS `_hessian_vector_product`; the weights are restored exactly afterwards), or by double
        backward when cfg.hvp == "autograd"."""
        r = self.cfg.hvp_r if r is None else r
        net = self.net
        weights, alphas = net.weight_parameters(), net.arch_parameters()
        if self.cfg.hvp == "autograd":
            gw = torch.autograd.grad(self.weight_loss(net, x, y)[0], weights, create_graph=True)
            return _grads(sum((g * v).sum() for g, v in zip(gw, vector)), alphas)
        norm = _flat(vector).norm()
        if norm.item() == 0:
            return [torch.zeros_like(a) for a in alphas]
        R = r / norm
        saved = [p.detach().clone() for p in weights]
        try:
            with torch.no_grad():
                for p, v in zip(weights, vector):
                    p.add_(R * v)
            g_plus = _grads(self.weight_loss(net, x, y)[0], alphas)
            with torch.no_grad():
                for p, p0, v in zip(weights, saved, vector):
                    p.copy_(p0 - R * v)
            g_minus = _grads(self.weight_loss(net, x, y)[0], alphas)
        finally:
            with torch.no_grad():
                for p, p0 in zip(weights, saved):
                    p.copy_(p0)
        return [(gp - gm) / (2 * R) for gp, gm in zip(g_plus, g_minus)]

    def apply_alpha_gradient(self, grads: Sequence[Tensor]) -> None:
        """One alpha-optimizer (Adam) step along `grads` (one tensor per alpha set)."""
        for a, g in zip(self.alphas, grads):
            a.grad = g.detach().clone()
        self.a_opt.step()
        self.a_opt.zero_grad(set_to_none=True)

    # ================================================================================ weight step
    def weight_step(self, batch: SearchBatch) -> tuple[Tensor, Tensor]:
        self.net.train()
        for g in self.w_opt.param_groups:
            g["lr"] = batch.lr
        loss, logits = self.weight_loss(self.net, batch.x_w_adv, batch.y_w)
        self.w_opt.zero_grad(set_to_none=True)
        loss.backward(inputs=self.weights)  # no gradient reaches the alphas
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.weights, self.cfg.grad_clip)
        self.w_opt.step()
        return loss.detach(), (logits.detach().argmax(1) == batch.y_w).sum()

    def search_step(self, x_w: Tensor, y_w: Tensor, x_a: Tensor, y_a: Tensor, lr: float, epoch: int = 0,
                    step: int = 0, update_alphas: bool = True) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """One bilevel step: the alpha step (DARTS order: first), then the weight step. Returns the weight
        loss, the number of weight-batch images classified right, and the alpha step's figures."""
        # the weight step's examples are made once, before the alpha step, so that a second-order alpha
        # step unrolls the very loss the weight step then descends
        x_w_adv = self.weight_examples(x_w, y_w)
        self.net.train()
        batch = SearchBatch(x_w, y_w, x_w_adv, x_a, y_a, lr, epoch, step)
        info: dict[str, Any] = {}
        if update_alphas:
            info = self.alpha_step(batch)
            self.net.train()
        loss, correct = self.weight_step(batch)
        return loss, correct, info

    # ================================================================================ setup
    def lr_at(self, epoch: int) -> float:
        """DARTS' CosineAnnealingLR stepped per epoch."""
        cfg = self.cfg
        return cosine_lr(cfg.w_lr, cfg.w_lr_min, epoch / cfg.epochs)

    def setup(self, ctx: SearchContext) -> None:
        """Supernet, optimizers and data halves; deterministic in ctx.seed."""
        cfg = self.cfg
        self.ctx = ctx
        self.device = resolve_device(ctx.device) if isinstance(ctx.device, str) else ctx.device
        self.eps, self.norm = float(ctx.eps), ctx.norm
        self.step_size = parse_eps(cfg.step_size) if cfg.step_size else None
        torch.manual_seed(ctx.seed)
        self.net = self.build_supernet(ctx.data.meta).to(self.device)
        self.net.train()
        self._unrolled = None
        self.weights = self.net.weight_parameters()
        self.alphas = self.net.arch_parameters()
        self.w_opt = torch.optim.SGD(self.weights, lr=cfg.w_lr, momentum=cfg.w_momentum,
                                     weight_decay=cfg.w_weight_decay)
        self.a_opt = torch.optim.Adam(self.alphas, lr=cfg.alpha_lr, betas=cfg.alpha_betas,
                                      weight_decay=cfg.alpha_weight_decay)
        n = len(ctx.data.train)
        n_w = int(round(cfg.train_portion * n))
        if n_w < 1 or n - n_w < 1:
            raise UserError(f"train_portion={cfg.train_portion} of {n} training images leaves one half empty; "
                            f"use more images or a train_portion nearer 0.5")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))
        self.w_idx, self.a_idx = perm[:n_w], perm[n_w:]
        self.steps_per_epoch = self.steps_for(n)

    def steps_for(self, train_size: int) -> int:
        """Steps per epoch: over the smaller of the weight and alpha halves (train_portion), in batches."""
        n_w = int(round(self.cfg.train_portion * train_size))
        return epoch_steps(min(n_w, train_size - n_w), self.cfg.batch_size, self.cfg.max_batches_per_epoch)

    # ================================================================================ the epochs
    def search(self, ctx: SearchContext, resume: bool = False) -> SearchResult:
        clock = SessionClock()  # set-up included; a resume carries the checkpoint's time on
        self.setup(ctx)
        self.loop = self.epoch_loop(clock)
        if resume:
            self.loop.resume()

        def after_epoch(record: dict) -> None:
            if ctx.out_dir is not None:
                save_genotype(self.net.genotype(), ctx.out_dir / "genotype.json")
            if ctx.on_epoch_end is not None:
                ctx.on_epoch_end(record)

        self.history = self.loop.run(self.train_epoch, after_epoch)
        genotype = self.net.genotype()
        genotype.source = f"robustnas search --method {self.name} (seed {ctx.seed})"
        if ctx.out_dir is not None:
            save_genotype(genotype, ctx.out_dir / "genotype.json")
        alphas = {k: w.tolist() for k, w in self.net.op_weights().items()}
        last = self.history[-1] if self.history else {}
        return SearchResult(genotype=genotype, history=self.history, seconds=clock.seconds(), sessions=clock.sessions,
                            extra={"alphas": alphas, "supernet_params": sum(p.numel() for p in self.weights)},
                            decision=self.decision(alphas, last.get("val_clean", float("nan")), last))

    def epoch_loop(self, clock: Optional[SessionClock] = None) -> EpochLoop:
        """The epoch scaffold over this search's state (after `setup`): `.resume()` loads the checkpoint."""
        ctx = self.ctx
        return EpochLoop(ctx.out_dir, CHECKPOINT, ctx.seed, self.cfg.epochs, self.steps_per_epoch, self._identity(),
                         {"net": self.net, "w_opt": self.w_opt, "a_opt": self.a_opt, "extra": _MethodState(self)},
                         log="search.jsonl", progress=ctx.progress, description=f"search {self.name}", clock=clock)

    def train_epoch(self, epoch: int, g: torch.Generator) -> dict[str, Any]:
        """One epoch of bilevel steps (batches of both halves in the order `g` draws), then validation; the
        epoch's record for search.jsonl."""
        cfg = self.cfg
        x_tr, y_tr = self.ctx.data.train.x, self.ctx.data.train.y
        w_order = self.w_idx[torch.randperm(len(self.w_idx), generator=g)]
        a_order = self.a_idx[torch.randperm(len(self.a_idx), generator=g)]
        lr = self.lr_at(epoch)
        update_alphas = epoch >= cfg.warmup_epochs
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        sums: dict[str, Any] = {}
        series: dict[str, list[float]] = {}
        seen = 0
        for b in range(self.steps_per_epoch):
            sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            iw, ia = w_order[sl], a_order[sl]
            x_w, y_w = x_tr[iw].to(self.device), y_tr[iw].to(self.device)
            x_a, y_a = x_tr[ia].to(self.device), y_tr[ia].to(self.device)
            loss, corr, info = self.search_step(x_w, y_w, x_a, y_a, lr, epoch, b, update_alphas)
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + (v.detach() if isinstance(v, Tensor) else v)
                if k in self.step_series:
                    series.setdefault(k, []).append(_num(v))
            loss_sum += loss * len(y_w)
            correct += corr
            seen += len(y_w)
            self.loop.step_done(lambda: f"loss {loss_sum.item() / seen:.3f} acc {correct.item() / seen:.3f} " + "".join(
                f"{k} {_num(v) / (b + 1):.3f} " for k, v in sums.items()) + f"{seen / (time.perf_counter() - t0):.0f} img/s")
        train_seconds = time.perf_counter() - t0
        val_clean, val_robust = self.validate()
        record: dict[str, Any] = {"epoch": epoch, **self.epoch_info(epoch), "lr": lr, "alpha_updates": update_alphas,
                                  "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen}
        record.update({k: _num(v) / self.steps_per_epoch for k, v in sums.items()})
        record.update(self.series_info(series))
        genotype = self.net.genotype()
        alphas = {k: w.tolist() for k, w in self.net.op_weights().items()}
        record.update({"val_clean": val_clean, "val_robust": val_robust, "alphas": alphas,
                       "decision": self.decision(alphas, val_clean, record), "genotype": genotype.to_dict(),
                       "seconds": time.perf_counter() - t0, "images_per_s": seen / train_seconds})
        return record

    def decision(self, alphas: dict[str, list[list[float]]], val_clean: float,
                 record: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Did the search decide anything: the alphas' distance from uniform and the supernet's validation
        accuracy (on min(val_n, |val|) images) against chance. `record`: the epoch's search.jsonl line so far,
        for methods that also say when their own term steered nothing (a list "inert")."""
        return search_decision(alphas, val_clean, min(self.cfg.val_n, len(self.ctx.data.val)),
                               self.ctx.data.meta.num_classes)

    def validate(self) -> tuple[float, float]:
        """Clean and PGD accuracy of the supernet on the first val_n validation images (fixed attack noise)."""
        val = self.ctx.data.val
        n = min(self.cfg.val_n, len(val))
        if n == 0:
            return float("nan"), float("nan")
        x, y = val.x[:n].to(self.device), val.y[:n].to(self.device)
        clean = accuracy(self.net, x, y)
        torch.manual_seed(epoch_seed(self.ctx.seed, 10_000))
        robust = robust_accuracy(self.net, x, y, lambda xb, yb: pgd(
            self.net, xb, yb, self.eps, steps=self.cfg.val_steps, norm=self.norm))
        return clean, robust

    # ================================================================================ checkpoints
    def _identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        return {"method": self.name, "config": self.cfg.model_dump(mode="json"), "seed": self.ctx.seed,
                "eps": self.eps, "norm": self.norm, "dataset": self.ctx.data.meta.name,
                "train_size": len(self.ctx.data.train)}


class _MethodState:
    """A method's state beyond the supernet and optimizers (`state_tensors`), as the epoch loop saves state."""

    def __init__(self, search: SupernetSearch):
        self.search = search

    def state_dict(self) -> dict[str, Tensor]:
        return self.search.state_tensors()

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        self.search.load_state_tensors(tensors)


def _num(v: Any) -> float:
    return v.item() if isinstance(v, Tensor) else float(v)
