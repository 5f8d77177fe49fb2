"""TAM-NAS (Tiny Adversarial Multi-objective one-shot NAS, arXiv 2103.00363) on the tiny-block space.

Three phases, all in one `search` call, each resumable (after every supernet epoch and every generation):
1. Supernet training: search/tiny_supernet.py's SupernetTrainer trains spaces/tiny.py's TinySuperNet, one
   subnet per step (or the sandwich rule), on clean, PGD or FGSM-RS examples, epsilon ramped up from 0.
2. NSGA-II (search/nsga2.py, pymoo ask/tell) over the integer encoding. Objectives, all minimised: clean
   and robust error on the first `eval_n` validation images of the subnet with inherited weights and
   recalibrated BatchNorm (SubnetScorer), and its parameters over those of the largest subnet; an optional
   `max_params` is a constraint. The robust error is that under `score_attack`: PGD-`eval_pgd_steps`
   ("pgd_err", default) or aa-rank ("aa_rank_err": AutoAttack-rank, not standard AA). A generation's
   subnets are scored in one executor call, each once.
3. Optionally (`final`), Pareto subnets spread over the size range are trained by the one Trainer,
   from the supernet's weights (`finetune`) or from a fresh initialisation (`scratch`).
search.jsonl has one record per supernet epoch and per generation (front, hypervolume: search/nsga2.py).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import Field

from robustnas.evaluation.analysis import search_decision
from robustnas.core.config import EpsText, ParamCount, TrainConfig
from robustnas.data.datasets import Dataset
from robustnas.core.errors import UserError
from robustnas.core.executor import ExecutorSettings
from robustnas.core.rundir import write_json
from robustnas.nets.arch import save_model
from robustnas.robustness.attacks import AA_RANK_TITLE
from robustnas.search.base import ScoreAttack, SearchContext, SearchResult, register
from robustnas.search.nsga2 import ROBUST_ERR, objective_names, pareto_front, robust_err, run_nsga2
from robustnas.search.tiny_supernet import SubnetScorer, SupernetTrainer, scoring_images
from robustnas.nets.size import count_params
from robustnas.core.config import parse_count
from robustnas.nets.spaces.tiny import (TinyGenotype, TinyNetwork, TinySuperNet, genotype_params, layer_frequencies,
                                   model_spec, recalibrate_bn)
from robustnas.training.loop import EpochLoop, SessionClock, epoch_seed, epoch_steps, progress_bar
from robustnas.training.trainer import Trainer, resolve_device

CHECKPOINT = "search_checkpoint"  # .e<epoch>.safetensors (supernet, optimizer) + .json (history, NSGA-II state)
ERR_HEADER = {"pgd": "PGD err", "aa-rank": "aa-rank err"}  # the report's robust-error column, by score_attack


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
    score_attack: ScoreAttack = "pgd"               # robust error of a scored subnet: PGD, or aa-rank (not standard AA)
    recal_batches: int = Field(default=10, ge=1)
    recal_batch_size: int = Field(default=64, ge=1)
    # --- NSGA-II
    pop_size: int = Field(default=20, ge=2)
    generations: int = Field(default=10, ge=1)      # populations scored, the initial random one included
    crossover_prob: float = Field(default=0.9, ge=0, le=1)
    mutation_rate: Optional[float] = Field(default=None, gt=0, le=1)  # per gene; None: 1 / number of layers
    max_params: ParamCount = None                   # parameter ceiling (constraint), e.g. "200k"
    hv_ref: tuple[float, float, float] = (1.0, 1.0, 1.0)  # in (clean_err, robust error, size)
    # executor, executor_options: where subnets are scored (ExecutorSettings, robustnas/executor.py)
    # --- post-search training of Pareto subnets (the Trainer's settings in final_train)
    final: Literal["none", "scratch", "finetune"] = "none"
    final_n: int = Field(default=3, ge=1)
    final_train: TrainConfig = TrainConfig(epochs=10, batch_size=64)


@register
class TamNas:
    """TAM-NAS: adversarially trained one-shot supernet on the tiny-block space, NSGA-II over
    (clean error, PGD or aa-rank error, parameters), Pareto subnets optionally fine-tuned or trained from scratch."""

    name: ClassVar[str] = "tamnas"
    Config: ClassVar[type[TamNasConfig]] = TamNasConfig

    def __init__(self, cfg: TamNasConfig):
        if not isinstance(cfg, TamNasConfig):
            raise TypeError(f"TamNas needs a TamNasConfig, got {type(cfg).__name__}")
        self.cfg = cfg

    def setup(self, ctx: SearchContext) -> None:
        cfg = self.cfg
        self.ctx = ctx
        self.device = resolve_device(ctx.device) if isinstance(ctx.device, str) else ctx.device
        self.eps, self.norm = float(ctx.eps), ctx.norm
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
        self.trainer = SupernetTrainer(self.net, cfg, data, self.eps, self.norm, ctx.seed, self.device)
        n_recal = cfg.recal_batches * cfg.recal_batch_size
        self.recal_x, self.eval_x, self.eval_y = scoring_images(data, ctx.seed, n_recal, cfg.eval_n, self.device)

    def steps_for(self, train_size: int) -> int:
        """Supernet-training steps per epoch (SupernetTrainer's): over the whole training split, in batches."""
        return epoch_steps(train_size, self.cfg.batch_size, self.cfg.max_batches_per_epoch)

    def scorer(self, n: Optional[int] = None, attack: Optional[str] = None) -> SubnetScorer:
        """The subnet scorer on the first `n` eval images (default all), under `attack` (default score_attack)."""
        n = len(self.eval_x) if n is None else n
        return SubnetScorer(self.net, self.recal_x, self.eval_x[:n], self.eval_y[:n], self.eps, self.norm,
                            self.cfg.eval_pgd_steps, self.cfg.recal_batch_size, self.ctx.seed,
                            self.cfg.score_attack if attack is None else attack)

    def search(self, ctx: SearchContext, resume: bool = False) -> SearchResult:
        clock = SessionClock()  # set-up included; a resume carries the checkpoint's time on
        self.setup(ctx)
        cfg = self.cfg
        loop = self.loop = EpochLoop(ctx.out_dir, CHECKPOINT, ctx.seed, cfg.epochs, self.trainer.steps_per_epoch,
                                     self._identity(), {"net": self.net, "opt": self.trainer.opt}, log="search.jsonl",
                                     progress=ctx.progress, description="search tamnas", clock=clock)
        if resume:
            loop.resume()
        self.history = loop.history  # supernet epochs, then NSGA-II generations
        scorer = self.scorer(cfg.val_n, "pgd") if cfg.val_n > 0 else None  # the per-epoch check stays PGD
        loop.run(lambda epoch, g: self.trainer.train_epoch(epoch, g, loop.step_done, scorer), ctx.on_epoch_end)
        self.net.eval()
        with progress_bar(ctx.progress) as bar:
            nsga_state = loop.extra.get("nsga2")  # run_nsga2's state after the last finished generation
            gen_task = bar.add_task("nsga-ii", total=cfg.generations, info="",
                                    completed=0 if nsga_state is None else nsga_state["generation"] + 1)

            def on_generation(record: dict, state: dict) -> None:
                loop.history.append(record)
                loop.extra["nsga2"] = state
                loop.save_progress()  # the supernet no longer changes: the JSON (and search.jsonl) only
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
                                      crossover_prob=cfg.crossover_prob, state=nsga_state,
                                      on_generation=on_generation, count=self.count_params)
            finally:
                executor.close()
        front = pareto_front(scores, self.params_scale, self.max_params)
        if not front:
            raise UserError(f"no scored subnet has at most {cfg.max_params} parameters; raise max_params")
        best = self.pick(front)
        front_out = [{**s, "genotype": self.space.decode(s["encoding"]).to_dict()} for s in front]
        extra: dict[str, Any] = {
            "front": front_out, "objectives": list(objective_names(cfg.score_attack)),
            "score_attack": cfg.score_attack, "params_scale": self.params_scale,
            "supernet_params": count_params(self.net),
            "layer_frequencies": layer_frequencies([s["encoding"] for s in front], cfg.width_mult)}
        if ctx.out_dir is not None:
            write_json(ctx.out_dir / "genotype.json", best.to_dict())
            write_json(ctx.out_dir / "front.json", front_out)
        if cfg.final != "none":
            extra["final"] = self.train_final(front, cfg.final, resume)
            if ctx.out_dir is not None:
                write_json(ctx.out_dir / "final.json", extra["final"])
        last = next((r for r in reversed(self.history) if "val_clean_largest" in r), {})  # the supernet's last epoch
        decision = search_decision(acc=last.get("val_clean_largest"), n=min(cfg.val_n, len(self.eval_y)),
                                   num_classes=ctx.data.meta.num_classes, what="supernet (largest subnet)")
        return SearchResult(genotype=best.to_dict(), history=self.history, seconds=clock.seconds(),
                            sessions=clock.sessions, extra=extra, decision=decision)

    # ------------------------------------------------------------------------------------ run / report
    def final_size(self) -> dict:
        """A tiny-block genotype fixes its own widths and depth: `run` builds it as it is."""
        return {}

    def report_sections(self, result: SearchResult, out, meta=None) -> list[str]:
        """The front per generation, hypervolume per generation, the first front's layer-by-layer block
        and width frequencies, and the fine-tuned / from-scratch front members when trained."""
        from robustnas.core.plots import plot_fronts, plot_heatmaps, plot_series

        gens = [h for h in result.history if h.get("phase") == "nsga2"]
        attack = result.extra.get("score_attack", "pgd")
        lines = ["## TAM-NAS search", ""]
        if gens:
            p1 = plot_fronts([g["front"] for g in gens], out / "plots" / "fronts.png", y=ROBUST_ERR[attack])
            p2 = plot_series([g["generation"] for g in gens],
                             {"archive front": [g["hv"] for g in gens],
                              "population front": [g["population_hv"] for g in gens]},
                             out / "plots" / "hypervolume.png", "hypervolume per generation", "generation", "HV")
            lines += [f"![fronts](plots/{p1.name})", "", f"![hypervolume](plots/{p2.name})", ""]
        front = result.extra.get("front") or []
        if front:
            under = "" if attack == "pgd" else f"; robust error under {AA_RANK_TITLE}"
            lines += [f"First front (supernet weights, BN recalibrated, held-out split{under}):", "",
                      f"| params | clean err | {ERR_HEADER[attack]} |", "|---|---|---|"]
            lines += [f"| {s['params']:,} | {s['clean_err']:.3f} | {robust_err(s):.3f} |"
                      for s in sorted(front, key=lambda s: s["params"])] + [""]
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
                      for f in final] + [""]
        return lines

    def count_params(self, encoding: Sequence[int]) -> int:
        meta = self.ctx.data.meta
        return genotype_params(self.space.decode(encoding), meta.num_classes, meta.shape[0])

    def pick(self, front: Sequence[dict]) -> TinyGenotype:
        """The front member written as genotype.json: the lowest robust error (PGD or aa-rank, as scored; then
        clean error, then size); use max_params to bound its size."""
        best = min(front, key=lambda s: (robust_err(s), s["clean_err"], s["params"]))
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
                     "search_clean_err": s["clean_err"],
                     f"search_{ROBUST_ERR[s.get('score_attack', 'pgd')]}": robust_err(s),
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
