"""TAM-NAS (Tiny Adversarial Multi-objective one-shot NAS, arXiv 2103.00363) on the tiny-block space.

Three phases, all in one `search` call, each resumable:
1. Supernet training (spaces/tiny.py's TinySuperNet): every step trains one subnet drawn uniformly from
   the encoding (or, with the sandwich rule, the largest, the smallest and `sandwich_random` random ones,
   gradients summed), on clean, PGD or FGSM-RS examples of that subnet, with epsilon ramped up from 0
   over `eps_warmup_epochs` (on Fashion-MNIST at eps 0.1, a supernet trained at full epsilon from the
   first step stayed near chance for the first hundreds of steps). The attack sees the subnet normalised
   by its batch statistics on the clean batch, frozen while it runs: the shared BN running statistics
   describe no single subnet, and live batch statistics would couple the images of the batch.
2. NSGA-II (pymoo, ask/tell) over the integer encoding with our own sampling, uniform layer-wise
   crossover and per-gene mutation, all returning canonical encodings. Objectives, all minimised:
   clean error and PGD error on the first `eval_n` validation images of the subnet with inherited
   weights and recalibrated BatchNorm, and its parameter count divided by that of the space's largest
   subnet; an optional ceiling `max_params` is a constraint. A generation's evaluations go through one
   executor call (robustnas/executor.py); a subnet is scored once and remembered.
3. Optionally (`final`), Pareto subnets spread over the size range are trained by the one Trainer,
   from the supernet's weights (`finetune`) or from a fresh initialisation (`scratch`).

Each generation's record in search.jsonl holds the non-dominated front of everything scored so far and
its hypervolume for the fixed reference point `hv_ref` (in the normalised objectives), so the logged
hypervolume never decreases; `population_hv` is that of the current population's first front.
Resume is exact: after every supernet epoch the checkpoint holds the weights and optimizer state, and
after every generation the population, pymoo's random state and every score so far.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.crossover import Crossover
from pymoo.core.evaluator import Evaluator
from pymoo.core.mutation import Mutation
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.indicators.hv import HV
from pymoo.problems.static import StaticProblem
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from robustnas import analysis
from robustnas.attacks import accuracy, fgsm_rs, pgd, robust_accuracy
from robustnas.config import EpsText, ParamCount, TrainConfig, parse_eps
from robustnas.data import Dataset
from robustnas.errors import UserError
from robustnas.executor import Executor, ExecutorSettings
from robustnas.rundir import atomic_write_text, save_model, write_json
from robustnas.search.base import SearchContext, SearchResult, checkpoint_meta, register
from robustnas.size import count_params, parse_count
from robustnas.spaces.tiny import (TinyGenotype, TinyNetwork, TinySpace, TinySuperNet, genotype_params,
                                   layer_frequencies, model_spec, recalibrate_bn)
from robustnas.training import Trainer, cosine_lr, epoch_seed, resolve_device

CHECKPOINT = "search_checkpoint"  # .safetensors (supernet, optimizer) + .json (progress, NSGA-II state)
OBJECTIVES = ("clean_err", "pgd_err", "size")  # size = params / params of the space's largest subnet


class TamNasConfig(ExecutorSettings):
    """Settings of TAM-NAS. Defaults are CPU-sized for Fashion-MNIST."""

    # --- space
    width_mult: int = Field(default=1, ge=1, le=8)  # supernet width: the paper studies x1 and x2
    # --- supernet training (SGD, cosine per step from lr to lr_min)
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=64, ge=1)
    max_batches_per_epoch: Optional[int] = Field(default=None, ge=1)  # CPU budgets; None: the whole train split
    lr: float = Field(default=0.05, gt=0)
    lr_min: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=3e-4, ge=0)
    grad_clip: Optional[float] = Field(default=5.0, gt=0)
    sampling: Literal["uniform", "sandwich"] = "uniform"
    sandwich_random: int = Field(default=2, ge=0)  # random subnets per sandwich step, besides largest and smallest
    adv: Literal["none", "pgd", "fgsm-rs"] = "pgd"  # standard vs adversarial supernet training
    attack_steps: int = Field(default=5, ge=1)      # PGD steps of the supernet's training examples
    eps_warmup_epochs: float = Field(default=2.0, ge=0)  # epsilon ramps linearly from 0 over these epochs
    step_size: EpsText = None                       # None: 2.5*eps/steps for PGD, 1.25*eps for FGSM-RS
    val_n: int = Field(default=200, ge=0)           # per-epoch check of the largest/smallest subnet; 0: none
    # --- scoring of one subnet (inherited weights, recalibrated BN)
    eval_n: int = Field(default=500, ge=1)          # first eval_n images of the validation split
    eval_pgd_steps: int = Field(default=10, ge=1)
    recal_batches: int = Field(default=10, ge=1)
    recal_batch_size: int = Field(default=64, ge=1)
    # --- NSGA-II
    pop_size: int = Field(default=20, ge=2)
    generations: int = Field(default=10, ge=1)      # populations scored, the initial random one included
    crossover_prob: float = Field(default=0.9, ge=0, le=1)
    mutation_rate: Optional[float] = Field(default=None, gt=0, le=1)  # per gene; None: 1 / number of layers
    max_params: ParamCount = None                   # parameter ceiling (constraint), e.g. "200k"
    hv_ref: tuple[float, float, float] = (1.0, 1.0, 1.0)  # in (clean_err, pgd_err, size)
    # executor, executor_options: where subnets are scored (ExecutorSettings, robustnas/executor.py)
    # --- post-search training of Pareto subnets (the Trainer's settings in final_train)
    final: Literal["none", "scratch", "finetune"] = "none"
    final_n: int = Field(default=3, ge=1)
    final_train: TrainConfig = TrainConfig(epochs=10, batch_size=64)


# ================================================================================================ scoring
def encoding_seed(seed: int, encoding: Sequence[int]) -> int:
    """A seed from (seed, encoding), the same in every process: a subnet's score depends on nothing else."""
    return (zlib.crc32(np.asarray(encoding, dtype=np.int64).tobytes()) + 1_000_003 * seed) % (2**63 - 1)


class SubnetScorer:
    """Scores one subnet: extract it with inherited weights, recalibrate BN on fixed training images,
    then clean and PGD error on held-out images and its parameter count. Picklable (it carries the
    supernet and its images), so any executor can run it."""

    def __init__(self, supernet: TinySuperNet, recal_x: Tensor, eval_x: Tensor, eval_y: Tensor, eps: float,
                 norm: str = "Linf", pgd_steps: int = 10, recal_batch_size: int = 64, seed: int = 0):
        self.supernet = supernet
        self.recal_x, self.eval_x, self.eval_y = recal_x, eval_x, eval_y
        self.eps, self.norm, self.pgd_steps = eps, norm, pgd_steps
        self.recal_batch_size, self.seed = recal_batch_size, seed

    def __call__(self, encoding: Sequence[int]) -> dict[str, Any]:
        encoding = [int(v) for v in encoding]
        net = self.supernet.extract(encoding)
        recalibrate_bn(net, self.recal_x.split(self.recal_batch_size))
        x, y = self.eval_x, self.eval_y
        clean = accuracy(net, x, y)
        gen = torch.Generator(device=x.device).manual_seed(encoding_seed(self.seed, encoding))
        robust = robust_accuracy(net, x, y, lambda xb, yb: pgd(net, xb, yb, self.eps, steps=self.pgd_steps,
                                                               norm=self.norm, generator=gen))
        return {"encoding": encoding, "clean_err": 1.0 - clean, "pgd_err": 1.0 - robust,
                "params": count_params(net)}


# ================================================================================================ NSGA-II
def make_operators(space: TinySpace, mutation_rate: Optional[float] = None, crossover_prob: float = 0.9,
                   fits: Optional[Callable[[list[int]], bool]] = None):
    """pymoo Sampling, Crossover and Mutation on the tiny encoding; every output is canonical and valid.
    With `fits` (a parameter ceiling), each member of the first population is a uniform draw shrunk
    (TinySpace.shrink) until it fits: no uniform draw of 2000 has fewer than 70k parameters, and a
    population with no feasible member leaves NSGA-II nothing to build on."""
    rate = mutation_rate if mutation_rate is not None else 1.0 / space.n_layers

    def draw(rng: np.random.Generator) -> list[int]:
        x = space.sample(rng)
        while fits is not None and not fits(x):
            smaller = space.shrink(x, rng)
            if smaller == x:
                break  # the smallest subnet: the ceiling is below everything
            x = smaller
        return x

    class TinySampling(Sampling):
        def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
            return np.array([draw(random_state) for _ in range(n_samples)], dtype=int)

    class LayerUniformCrossover(Crossover):
        """Two parents, two children; each layer's (block, width) pair comes whole from one parent."""

        def __init__(self):
            super().__init__(2, 2, prob=crossover_prob)

        def _do(self, problem, X, *args, random_state=None, **kwargs):
            _, n_matings, n_var = X.shape
            out = np.empty_like(X)
            for k in range(n_matings):
                swap = np.repeat(random_state.random(n_var // 2) < 0.5, 2)
                a, b = X[0, k], X[1, k]
                out[0, k] = space.canonical(np.where(swap, b, a))
                out[1, k] = space.canonical(np.where(swap, a, b))
            return out

    class GeneMutation(Mutation):
        """Each block gene and each width gene is redrawn from its allowed values with probability `rate`."""

        def _do(self, problem, X, *args, random_state=None, **kwargs):
            X = X.astype(int).copy()
            for row in X:
                for i in range(space.n_layers):
                    if random_state.random() < rate:
                        allowed = space.allowed_blocks(i)
                        row[2 * i] = allowed[random_state.integers(len(allowed))]
                    if random_state.random() < rate:
                        row[2 * i + 1] = random_state.integers(len(space.layer_widths[i]))
                row[:] = space.canonical(row)
            return X

    return TinySampling(), LayerUniformCrossover(), GeneMutation()


def objectives(score: dict[str, Any], params_scale: float) -> list[float]:
    return [score["clean_err"], score["pgd_err"], score["params"] / params_scale]


def pareto_front(scores: Sequence[dict[str, Any]], params_scale: float,
                 max_params: Optional[int] = None) -> list[dict[str, Any]]:
    """The non-dominated scores among the feasible ones, smallest first."""
    feasible = [s for s in scores if max_params is None or s["params"] <= max_params]
    idx = analysis.pareto_front([objectives(s, params_scale) for s in feasible], maximize=(False, False, False))
    return sorted((feasible[i] for i in idx), key=lambda s: (s["params"], s["pgd_err"], s["clean_err"]))


def hypervolume(scores: Sequence[dict[str, Any]], params_scale: float, ref: Sequence[float]) -> float:
    if not scores:
        return 0.0
    return float(HV(ref_point=np.asarray(ref, dtype=float))(np.array([objectives(s, params_scale) for s in scores])))


def run_nsga2(space: TinySpace, fn: Callable[[list[int]], dict[str, Any]], executor: Executor, *, pop_size: int,
              generations: int, seed: int, params_scale: float, max_params: Optional[int] = None,
              hv_ref: Sequence[float] = (1.0, 1.0, 1.0), mutation_rate: Optional[float] = None,
              crossover_prob: float = 0.9, state: Optional[dict] = None,
              count: Optional[Callable[[list[int]], int]] = None,
              on_generation: Optional[Callable[[dict, dict], None]] = None) -> tuple[list[dict], list[dict]]:
    """NSGA-II by ask/tell. `fn(encoding)` scores one subnet ({"clean_err", "pgd_err", "params", ...});
    the generation's new encodings go to `executor.map(fn, ...)` at once. `state` (from a previous
    on_generation call) resumes after its generation. `count(encoding)` (parameters without building the
    subnet) lets the first population be drawn under max_params. Returns (every score, one record per
    generation)."""
    fits = (lambda x: count(x) <= max_params) if count is not None and max_params is not None else None
    sampling, crossover, mutation = make_operators(space, mutation_rate, crossover_prob, fits)
    xl, xu = space.bounds()
    n_constr = 1 if max_params is not None else 0
    problem = Problem(n_var=space.n_var, n_obj=3, n_ieq_constr=n_constr, xl=xl, xu=xu, vtype=int)
    cache: dict[tuple[int, ...], dict[str, Any]] = {}
    records: list[dict] = []
    start = 0
    if state is not None:
        cache = {tuple(s["encoding"]): s for s in state["scores"]}
        records = list(state["records"])
        start = state["generation"] + 1
        sampling = Population.new("X", np.array(state["population"], dtype=int))
    algorithm = NSGA2(pop_size=pop_size, sampling=sampling, crossover=crossover, mutation=mutation,
                      eliminate_duplicates=True)
    algorithm.setup(problem, seed=seed, verbose=False)

    def score(pop) -> tuple[int, int]:
        X = [[int(v) for v in row] for row in pop.get("X")]
        new = list(dict.fromkeys(tuple(x) for x in X if tuple(x) not in cache))
        for s in executor.map(fn, [list(x) for x in new]):
            cache[tuple(s["encoding"])] = s
        scored = [cache[tuple(x)] for x in X]
        Fm = np.array([objectives(s, params_scale) for s in scored])
        kw = {"G": np.array([[s["params"] / max_params - 1.0] for s in scored])} if n_constr else {}
        Evaluator().eval(StaticProblem(problem, F=Fm, **kw), pop)
        return len(new), len(X) - len(new)

    if state is not None:
        # replay the saved population through survival, then put back what survival computed on the merged
        # population of that generation (crowding on a truncated front differs) and the random state
        pop = algorithm.ask()
        score(pop)
        algorithm.tell(infills=pop)
        algorithm.pop.set("rank", np.array(state["rank"], dtype=object),
                          "crowding", np.array([c if c is not None else np.inf if r is not None else None
                                                for r, c in zip(state["rank"], state["crowding"])], dtype=object))
        algorithm.random_state.bit_generator.state = state["rng"]
    for gen in range(start, generations):
        t0 = time.perf_counter()
        pop = algorithm.ask()
        if pop is None or len(pop) == 0:
            break  # no new offspring can be made: the space is exhausted
        n_new, n_cached = score(pop)
        algorithm.tell(infills=pop)
        scores = list(cache.values())
        front = pareto_front(scores, params_scale, max_params)
        pop_scores = [cache[tuple(int(v) for v in x)] for x in algorithm.pop.get("X")]
        pop_front = pareto_front(pop_scores, params_scale, max_params)
        record = {"phase": "nsga2", "generation": gen, "evaluated": n_new, "cached": n_cached,
                  "hv": hypervolume(front, params_scale, hv_ref),
                  "population_hv": hypervolume(pop_front, params_scale, hv_ref),
                  "front": front, "seconds": time.perf_counter() - t0}
        records.append(record)
        if on_generation is not None:
            rank, crowding = algorithm.pop.get("rank", "crowding")
            on_generation(record, {"generation": gen, "population": algorithm.pop.get("X").astype(int).tolist(),
                                   # pymoo leaves rank and crowding of an infeasible member (over max_params)
                                   # unset; None also stands for an infinite crowding distance
                                   "rank": [None if r is None else int(r) for r in rank],
                                   "crowding": [None if c is None or np.isinf(c) else float(c) for c in crowding],
                                   "rng": algorithm.random_state.bit_generator.state, "scores": scores,
                                   "records": records})
    return list(cache.values()), records


# ================================================================================================ the strategy
@register
class TamNas:
    """TAM-NAS: adversarially trained one-shot supernet on the tiny-block space, NSGA-II over
    (clean error, PGD error, parameters), Pareto subnets optionally fine-tuned or trained from scratch."""

    name: ClassVar[str] = "tamnas"
    Config: ClassVar[type[TamNasConfig]] = TamNasConfig

    def __init__(self, cfg: TamNasConfig):
        if not isinstance(cfg, TamNasConfig):
            raise TypeError(f"TamNas needs a TamNasConfig, got {type(cfg).__name__}")
        self.cfg = cfg

    # ------------------------------------------------------------------------------------ setup
    def setup(self, ctx: SearchContext) -> None:
        cfg = self.cfg
        self.ctx = ctx
        self.device = resolve_device(ctx.device) if isinstance(ctx.device, str) else ctx.device
        self.eps, self.norm = float(ctx.eps), ctx.norm
        self.step_size = parse_eps(cfg.step_size) if cfg.step_size else None
        self.max_params = parse_count(cfg.max_params) if cfg.max_params else None
        data: Dataset = ctx.data
        if len(data.train) == 0 or len(data.val) == 0:
            raise UserError("tamnas needs a non-empty train and validation split (the subnets are scored on "
                            "held-out validation images); raise data.val_size or the subset")
        meta = data.meta
        torch.manual_seed(ctx.seed)
        self.net = TinySuperNet(meta.num_classes, meta.shape, meta.mean, meta.std, cfg.width_mult).to(self.device)
        self.space = self.net.space
        self.params_scale = float(count_params(self.net.extract(self.space.largest())))
        if self.max_params is not None:
            smallest = count_params(self.net.extract(self.space.smallest()))
            if self.max_params < smallest:
                raise UserError(f"max_params {cfg.max_params} is below the smallest subnet of the tiny space "
                                f"({smallest} parameters); raise it")
        decay, no_decay = [], []
        for p in self.net.parameters():
            (no_decay if p.dim() <= 1 else decay).append(p)
        self.opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum)
        n = len(data.train)
        per_epoch = math.ceil(n / cfg.batch_size)
        self.steps_per_epoch = min(per_epoch, cfg.max_batches_per_epoch or per_epoch)
        # fixed images for BN recalibration and scoring: every subnet sees the same ones
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(ctx.seed, 20_000)))
        recal_idx = perm[: cfg.recal_batches * cfg.recal_batch_size]
        self.recal_x = data.train.x[recal_idx].to(self.device)
        n_eval = min(cfg.eval_n, len(data.val))
        self.eval_x, self.eval_y = data.val.x[:n_eval].to(self.device), data.val.y[:n_eval].to(self.device)
        self.history: list[dict] = []
        self.start_epoch = 0
        self.nsga_state: Optional[dict] = None

    def scorer(self, n: Optional[int] = None) -> SubnetScorer:
        cfg = self.cfg
        n = len(self.eval_x) if n is None else n
        return SubnetScorer(self.net, self.recal_x, self.eval_x[:n], self.eval_y[:n], self.eps, self.norm,
                            cfg.eval_pgd_steps, cfg.recal_batch_size, self.ctx.seed)

    # ------------------------------------------------------------------------------------ supernet training
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

    def train_epoch(self, epoch: int, bar: Progress, task) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(epoch_seed(ctx.seed, epoch))
        g = torch.Generator().manual_seed(epoch_seed(ctx.seed, epoch))
        order = torch.randperm(len(ctx.data.train), generator=g)
        rng = np.random.default_rng([ctx.seed, epoch])
        total = cfg.epochs * self.steps_per_epoch
        x_tr, y_tr = ctx.data.train.x, ctx.data.train.y
        t0 = time.perf_counter()
        loss_sum, correct, seen, images = 0.0, 0, 0, 0
        for b in range(self.steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x, y = x_tr[idx].to(self.device), y_tr[idx].to(self.device)
            it = epoch * self.steps_per_epoch + b
            lr = cosine_lr(cfg.lr, cfg.lr_min, it / max(total, 1))
            l, c, n = self.train_step(x, y, self.step_subnets(rng), lr, self.eps_at(it))
            loss_sum, correct, seen, images = loss_sum + l * len(y), correct + c, seen + n, images + len(y)
            if ctx.progress and (b % 5 == 0 or b == self.steps_per_epoch - 1):
                bar.update(task, completed=it + 1, info=(
                    f"supernet ep {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f} acc {correct / seen:.3f} "
                    f"{images / (time.perf_counter() - t0):.0f} img/s"))
        train_seconds = time.perf_counter() - t0
        last = (epoch + 1) * self.steps_per_epoch - 1
        record: dict[str, Any] = {"phase": "supernet", "epoch": epoch, "lr": cosine_lr(cfg.lr, cfg.lr_min, last / max(total, 1)),
                                  "eps": self.eps_at(last),
                                  "train_loss": loss_sum / seen, "train_acc": correct / seen}
        if cfg.val_n > 0:
            scorer = self.scorer(cfg.val_n)
            for which, enc in (("largest", self.space.largest()), ("smallest", self.space.smallest())):
                s = scorer(enc)
                record[f"val_clean_{which}"], record[f"val_robust_{which}"] = 1 - s["clean_err"], 1 - s["pgd_err"]
        record.update({"seconds": time.perf_counter() - t0, "images_per_s": images / train_seconds})
        return record

    # ------------------------------------------------------------------------------------ the search
    def search(self, ctx: SearchContext, resume: bool = False) -> SearchResult:
        self.setup(ctx)
        if resume:
            self._load_checkpoint()
        cfg = self.cfg
        t_start = time.perf_counter()
        total_steps = cfg.epochs * self.steps_per_epoch
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TimeRemainingColumn(), disable=not ctx.progress, transient=False)
        with bar:
            task = bar.add_task("search tamnas", total=total_steps, completed=self.start_epoch * self.steps_per_epoch,
                                info="")
            for epoch in range(self.start_epoch, cfg.epochs):
                record = self.train_epoch(epoch, bar, task)
                self.history.append(record)
                self._save_checkpoint(epoch)
                if ctx.on_epoch_end is not None:
                    ctx.on_epoch_end(record)
            self.net.eval()
            gen_task = bar.add_task("nsga-ii", total=cfg.generations, info="",
                                    completed=0 if self.nsga_state is None else self.nsga_state["generation"] + 1)

            def on_generation(record: dict, state: dict) -> None:
                self.history.append(record)
                self.nsga_state = state
                self._save_checkpoint(cfg.epochs - 1)
                if ctx.out_dir is not None and record["front"]:
                    write_json(ctx.out_dir / "genotype.json", self.pick(record["front"]).to_dict())
                bar.update(gen_task, completed=record["generation"] + 1,
                           info=f"front {len(record['front'])} hv {record['hv']:.4f}")
                if ctx.on_epoch_end is not None:
                    ctx.on_epoch_end(record)

            executor = cfg.make_executor()
            try:
                scores, _ = run_nsga2(self.space, self.scorer(), executor, pop_size=cfg.pop_size,
                                      generations=cfg.generations, seed=ctx.seed, params_scale=self.params_scale,
                                      max_params=self.max_params, hv_ref=cfg.hv_ref, mutation_rate=cfg.mutation_rate,
                                      crossover_prob=cfg.crossover_prob, state=self.nsga_state,
                                      on_generation=on_generation, count=self.count_params)
            finally:
                executor.close()
        front = pareto_front(scores, self.params_scale, self.max_params)
        if not front:
            raise UserError(f"no scored subnet has at most {cfg.max_params} parameters; raise max_params")
        best = self.pick(front)
        front_out = [{**s, "genotype": self.space.decode(s["encoding"]).to_dict()} for s in front]
        extra: dict[str, Any] = {
            "front": front_out, "objectives": list(OBJECTIVES), "params_scale": self.params_scale,
            "supernet_params": count_params(self.net),
            "layer_frequencies": layer_frequencies([s["encoding"] for s in front], cfg.width_mult)}
        if ctx.out_dir is not None:
            write_json(ctx.out_dir / "genotype.json", best.to_dict())
            write_json(ctx.out_dir / "front.json", front_out)
        if cfg.final != "none":
            extra["final"] = self.train_final(front, cfg.final, resume)
            if ctx.out_dir is not None:
                write_json(ctx.out_dir / "final.json", extra["final"])
        return SearchResult(genotype=best.to_dict(), history=self.history, seconds=time.perf_counter() - t_start,
                            extra=extra)

    # ------------------------------------------------------------------------------------ run / report
    def final_size(self) -> dict:
        """A tiny-block genotype fixes its own widths and depth: `run` builds it as it is."""
        return {}

    def report_sections(self, result: SearchResult, out, meta=None) -> list[str]:
        """The front per generation, hypervolume per generation, the first front's layer-by-layer block
        and width frequencies, and the fine-tuned / from-scratch front members when trained."""
        from robustnas.report import plot_fronts, plot_heatmaps, plot_series

        gens = [h for h in result.history if h.get("phase") == "nsga2"]
        lines = ["## TAM-NAS search", ""]
        if gens:
            p1 = plot_fronts([g["front"] for g in gens], out / "plots" / "fronts.png")
            p2 = plot_series([g["generation"] for g in gens],
                             {"archive front": [g["hv"] for g in gens],
                              "population front": [g["population_hv"] for g in gens]},
                             out / "plots" / "hypervolume.png", "hypervolume per generation", "generation", "HV")
            lines += [f"![fronts](plots/{p1.name})", "", f"![hypervolume](plots/{p2.name})", ""]
        front = result.extra.get("front") or []
        if front:
            lines += ["First front (supernet weights, BN recalibrated, held-out split):", "",
                      "| params | clean err | PGD err |", "|---|---|---|"]
            lines += [f"| {s['params']:,} | {s['clean_err']:.3f} | {s['pgd_err']:.3f} |"
                      for s in sorted(front, key=lambda s: s["params"])]
            lines.append("")
        freq = result.extra.get("layer_frequencies")
        if freq:
            rows = [f"layer {i}" for i in range(len(freq["blocks"]))]
            widths = [f"choice {j}" for j in range(len(freq["widths"][0]))]
            p3 = plot_heatmaps([("blocks on the first front", freq["blocks"], rows, freq["block_names"]),
                                ("width choice (stage widths)", freq["widths"], rows, widths)],
                               out / "plots" / "layer_frequencies.png")
            lines += [f"![layer frequencies](plots/{p3.name})", ""]
        final = result.extra.get("final") or []
        if final:
            lines += [f"Front members trained after the search ({final[0]['mode']}), validation split:", "",
                      "| params | val clean | val robust | best epoch |", "|---|---|---|---|"]
            lines += [f"| {f['params']:,} | {f['val_clean']:.3f} | {f['val_robust']:.3f} | {f['best_epoch']} |"
                      for f in final]
            lines.append("")
        return lines

    def count_params(self, encoding: Sequence[int]) -> int:
        meta = self.ctx.data.meta
        return genotype_params(self.space.decode(encoding), meta.num_classes, meta.shape[0])

    def pick(self, front: Sequence[dict]) -> TinyGenotype:
        """The front member written as genotype.json: the lowest PGD error (then clean error, then size);
        use max_params to bound its size."""
        best = min(front, key=lambda s: (s["pgd_err"], s["clean_err"], s["params"]))
        g = self.space.decode(best["encoding"])
        g.source = f"robustnas search --method tamnas (seed {self.ctx.seed})"
        return g

    # ------------------------------------------------------------------------------------ post-search
    def train_final(self, front: Sequence[dict], mode: str, resume: bool = False) -> list[dict]:
        """Train `final_n` front members spread over the size range with the Trainer, from the supernet's
        weights (`finetune`, BN recalibrated first) or from scratch; each into out_dir/final/<k>_<mode>/."""
        cfg, ctx, meta = self.cfg, self.ctx, self.ctx.data.meta
        picks = sorted(set(np.linspace(0, len(front) - 1, min(cfg.final_n, len(front))).round().astype(int)))
        train_cfg = cfg.final_train.model_copy(update={"attack": cfg.final_train.attack.model_copy(
            update={"norm": self.norm})})
        results: list[dict] = []
        self.final_models: list[TinyNetwork] = []  # the trained networks, in the order of the results
        for k, i in enumerate(picks):
            s = front[i]
            genotype = self.space.decode(s["encoding"])
            if mode == "finetune":
                model = recalibrate_bn(self.net.extract(genotype), self.recal_x.split(cfg.recal_batch_size))
            else:
                torch.manual_seed(epoch_seed(ctx.seed, 30_000 + k))
                model = TinyNetwork(genotype, meta.num_classes, meta.shape, meta.mean, meta.std)
            out = ctx.out_dir / "final" / f"{k}_{mode}" if ctx.out_dir is not None else None
            trainer = Trainer(model, ctx.data, train_cfg, self.eps, seed=ctx.seed, device=self.device, out_dir=out,
                              progress=ctx.progress)
            result = trainer.fit(resume=resume)
            entry = {"mode": mode, "genotype": genotype.to_dict(), "params": count_params(model),
                     "search_clean_err": s["clean_err"], "search_pgd_err": s["pgd_err"],
                     "best_epoch": result.best_epoch, "val_clean": result.best_val_clean,
                     "val_robust": result.best_val_robust, "dir": str(out) if out is not None else None}
            if out is not None:
                save_model(out, model, model_spec(genotype, meta.num_classes, meta.shape, meta.mean, meta.std))
                write_json(out / "genotype.json", genotype.to_dict())
            self.final_models.append(model)
            results.append(entry)
        return results

    # ------------------------------------------------------------------------------------ checkpoints
    def _identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (the post-search settings may change)."""
        cfg = self.cfg.model_dump(mode="json", exclude={"final", "final_n", "final_train", "executor",
                                                     "executor_options"})
        return {"method": self.name, "config": cfg, "seed": self.ctx.seed, "eps": self.eps, "norm": self.norm,
                "dataset": self.ctx.data.meta.name, "train_size": len(self.ctx.data.train),
                "val_size": len(self.ctx.data.val)}

    def _save_checkpoint(self, epoch: int) -> None:
        out = self.ctx.out_dir
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.nsga_state is None:  # the supernet changes only while it trains
            tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
            for pid, state in self.opt.state_dict()["state"].items():
                if state.get("momentum_buffer") is not None:
                    tensors[f"opt.{pid}"] = state["momentum_buffer"]
            tmp = out / f".{CHECKPOINT}.safetensors.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            tmp.replace(out / f"{CHECKPOINT}.safetensors")
        meta = {"epoch": epoch, "identity": self._identity(), "history": self.history, "nsga2": self.nsga_state}
        atomic_write_text(out / f"{CHECKPOINT}.json", json.dumps(meta))
        atomic_write_text(out / "search.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))

    def _load_checkpoint(self) -> None:
        out = self.ctx.out_dir
        meta = checkpoint_meta(out, CHECKPOINT, self._identity())
        if meta is None:
            return  # nothing to resume: start from scratch
        tensors = load_file(str(out / f"{CHECKPOINT}.safetensors"), device=str(self.device))
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        sd = self.opt.state_dict()
        sd["state"] = {int(k[4:]): {"momentum_buffer": v.clone()} for k, v in tensors.items() if k.startswith("opt.")}
        self.opt.load_state_dict(sd)
        self.history = meta["history"]
        self.start_epoch = meta["epoch"] + 1
        self.nsga_state = meta.get("nsga2")
