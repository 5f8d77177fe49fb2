"""Random search over the DARTS cell space: the baseline every NAS method should beat (Li & Talwalkar 2019;
Yang et al. 2020, "NAS evaluation is frustratingly hard").

`n` genotypes are drawn with `random_genotype` from one seeded generator. Each candidate's network (its C
picked for the parameter budget `params`, else `C`) is trained briefly by the one Trainer on the first
`train_n` training images (`train`: by default one epoch of FGSM-RS adversarial training) and scored on
the validation images the Trainer checks after its last epoch. The genotype returned is the one with the
best score (`select`): "hrs" (default) is the harmonic robustness score of validation clean and robust
accuracy, "robust" and "clean" those accuracies alone, ties to the higher clean accuracy, then the earlier
draw; "first" returns the first draw and trains nothing (pure random sampling). The robust accuracy is
that under `score_attack`: the Trainer's PGD validation ("val_robust", default), or aa-rank (AutoAttack-rank,
not standard AA) on the same images after training ("val_aa_rank"); each record's "score_attack" says which.

Candidates go through an executor (`executor`), `chunk` at a time; search.jsonl gets one line per
candidate after each chunk, and `resume` skips the candidates already there; search_clock.json beside it
(written after search.jsonl) holds the search's wall time so far, which a resume carries on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from robustnas.evaluation.analysis import hrs, search_decision
from robustnas.core.config import ParamCount, TrainConfig
from robustnas.data.datasets import Dataset, DatasetMeta
from robustnas.core.errors import UserError
from robustnas.core.executor import ExecutorSettings
from robustnas.core.rundir import atomic_write_text, read_json, write_json
from robustnas.evaluation.evaluate import accuracy_under_attack
from robustnas.search.base import ScoreAttack, SearchContext, SearchResult, register
from robustnas.nets.size import count_params
from robustnas.core.config import parse_count
from robustnas.nets.spaces.darts import Genotype, random_genotype
from robustnas.training.loop import SessionClock, epoch_seed
from robustnas.training.trainer import EpochLog, Trainer

DEFAULT_C = 8
MAX_DRAWS_PER_GENOTYPE = 50  # redraws allowed per kept genotype before the budget counts as unreachable
ROBUST_KEY = {"pgd": "val_robust", "aa-rank": "val_aa_rank"}  # a record's robust accuracy, by its score_attack


def sample_genotypes(n: int, rng: np.random.Generator | int, meta: DatasetMeta, layers: int,
                     params: Optional[int] = None, C: Optional[int] = None, space: str = "darts",
                     **net_kw: Any) -> tuple[list[tuple[Genotype, int]], int]:
    """`n` random genotypes, each with its initial channel count C, and how many draws were rejected.

    With a parameter budget, C is the one arch.channels_for_params picks for it (network options such as
    reduction_layers in `net_kw`); a draw that cannot meet the budget at all is redrawn from the same
    generator, so the kept set is still a pure function of the seed. Without one, every genotype gets `C`
    (default 8).
    """
    from robustnas.nets.arch import channels_for_params

    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    out: list[tuple[Genotype, int]] = []
    rejected = 0
    while len(out) < n:
        g = random_genotype(rng, space=space)
        if params is None:
            out.append((g, C or DEFAULT_C))
            continue
        try:
            out.append((g, channels_for_params(g, meta, layers, params, **net_kw)))
        except UserError:
            rejected += 1
            if rejected > MAX_DRAWS_PER_GENOTYPE * n:
                raise UserError(f"random genotypes with {layers} cells rarely fit {params} parameters "
                                f"({rejected} draws rejected); change the budget or the number of cells")
    return out, rejected


class RandomConfig(ExecutorSettings):
    """Settings of random search. Defaults are CPU-sized."""

    n: int = Field(default=8, ge=1)                # genotypes drawn
    seed: Optional[int] = Field(default=None, ge=0)  # sampler seed; None: the run's seed
    space: Literal["darts", "arnas"] = "darts"
    layers: int = Field(default=5, ge=1)           # cells of each candidate's proxy network
    C: Optional[int] = Field(default=None, ge=2)   # initial channels when no budget is given (default 8)
    params: ParamCount = None                   # parameter budget that picks each candidate's C, e.g. "50k"
    select: Literal["hrs", "robust", "clean", "first"] = "hrs"
    score_attack: ScoreAttack = "pgd"              # robust accuracy of the score: PGD, or aa-rank (not standard AA)
    train_n: int = Field(default=1000, ge=1)       # training images of the proxy
    train: TrainConfig = TrainConfig(epochs=1, batch_size=64, adv="fgsm-rs", val_n=200, val_steps=10,
                                     select="last")
    # executor, executor_options: where candidates are scored (ExecutorSettings, robustnas/executor.py)
    chunk: int = Field(default=4, ge=1)            # candidates per executor call (and per search.jsonl write)

    @field_validator("C")
    @classmethod
    def _check_c(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v % 2:
            raise ValueError(f"C={v}: final DARTS networks need an even C")
        return v


CLOCK = "search_clock.json"  # the search's wall time so far (training/loop.SessionClock's state)


@dataclass
class ProxyScorer:
    """Trains one candidate briefly and scores it on validation images. Picklable and deterministic in its
    item (the candidate's own seed), so any executor can run it. With `score_attack` "aa-rank" the robust
    accuracy of the score is aa-rank's on the Trainer's validation images, seeded by the candidate's seed
    ("val_robust" stays the Trainer's PGD accuracy)."""

    data: Dataset
    train: TrainConfig
    eps: float
    layers: int
    device: str
    score_attack: str = "pgd"

    def __post_init__(self) -> None:
        if self.score_attack not in ROBUST_KEY:
            raise ValueError(f"unknown score attack {self.score_attack!r}; known: {', '.join(ROBUST_KEY)}")

    def fit(self, item: dict) -> tuple[Trainer, EpochLog]:
        """The candidate's proxy training: its Trainer (the trained model in `.model`) and last epoch's log."""
        from robustnas.nets.genotypes import build_network

        meta = self.data.meta
        torch.manual_seed(item["seed"])
        g = Genotype.from_dict(item["genotype"])
        model = build_network(g, C=item["C"], layers=self.layers, num_classes=meta.num_classes,
                              in_shape=meta.shape, mean=meta.mean, std=meta.std)
        trainer = Trainer(model, self.data, self.train, self.eps, seed=item["seed"], device=self.device,
                          progress=False)
        return trainer, trainer.fit().history[-1]

    def val_images(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation images the Trainer checks (its first `train.val_n`), on `device`."""
        n = min(self.train.val_n, len(self.data.val))
        return self.data.val.x[:n].to(device), self.data.val.y[:n].to(device)

    def __call__(self, item: dict) -> dict:
        t0 = time.perf_counter()
        trainer, log = self.fit(item)
        rec = {"index": item["index"], "genotype": item["genotype"], "C": item["C"], "layers": self.layers,
               "params": count_params(trainer.model), "val_clean": log.val_clean, "val_robust": log.val_robust,
               "score_attack": self.score_attack}
        if self.score_attack != "pgd":
            x, y = self.val_images(trainer.device)
            rec[ROBUST_KEY[self.score_attack]] = accuracy_under_attack(
                trainer.model, x, y, self.eps, self.score_attack, self.train.attack.norm, seed=item["seed"])
        rec["score"] = hrs(log.val_clean, rec[ROBUST_KEY[self.score_attack]])
        return {**rec, "seconds": time.perf_counter() - t0}


def _proxy_data(data: Dataset, train_n: int, val_n: int) -> Dataset:
    """Only the images the proxy uses, so that shipping the scorer to a worker stays cheap."""
    return Dataset(meta=data.meta, train=data.train.head(train_n), val=data.val.head(val_n), test=data.test.head(0))


@register
class RandomSearch:
    """Draw `n` genotypes, score each with a short proxy training, return the best (see the module doc)."""

    name = "random"
    Config = RandomConfig

    def __init__(self, cfg: RandomConfig):
        self.cfg = cfg

    def candidates(self, ctx: SearchContext) -> list[dict]:
        """The drawn genotypes as executor items (index, genotype JSON, C, seed), a function of the seed."""
        cfg = self.cfg
        seed = ctx.seed if cfg.seed is None else cfg.seed
        params = parse_count(cfg.params) if cfg.params else None
        drawn, self.rejected = sample_genotypes(cfg.n, np.random.default_rng(seed), ctx.data.meta, cfg.layers,
                                                params=params, C=cfg.C, space=cfg.space)
        return [{"index": i, "genotype": g.to_dict(), "C": c, "seed": epoch_seed(seed, 1_000 + i)}
                for i, (g, c) in enumerate(drawn)]

    def scorer(self, ctx: SearchContext) -> ProxyScorer:
        """The proxy scorer of this search's candidates (the Trainer's attack norm follows the search)."""
        cfg = self.cfg
        train = cfg.train.model_copy(update={"attack": cfg.train.attack.model_copy(update={"norm": ctx.norm})})
        return ProxyScorer(_proxy_data(ctx.data, cfg.train_n, train.val_n), train, ctx.eps, cfg.layers,
                           str(ctx.device), cfg.score_attack)

    def search(self, ctx: SearchContext, resume: bool = False) -> SearchResult:
        cfg, clock = self.cfg, SessionClock()
        items = self.candidates(ctx)
        records = self._unscored(items[0]) if cfg.select == "first" else self._score(items, ctx, resume, clock)
        self._save(ctx.out_dir, records)
        best = self.pick(records)
        genotype = Genotype.from_dict(best["genotype"])
        scored_by = "" if cfg.select == "first" or cfg.score_attack == "pgd" else f", scored by {cfg.score_attack}"
        genotype.source = (f"robustnas search --method random (draw {best['index']} of {len(items)}, seed "
                           f"{ctx.seed if cfg.seed is None else cfg.seed}, select {cfg.select}{scored_by})")
        if ctx.out_dir is not None:
            from robustnas.nets.genotypes import save_genotype

            save_genotype(genotype, ctx.out_dir / "genotype.json")
        return SearchResult(genotype=genotype, history=records, seconds=clock.seconds(), sessions=clock.sessions,
                            extra={"chosen": best["index"], "C": best["C"], "layers": cfg.layers,
                                   "rejected_draws": self.rejected},
                            decision=search_decision(acc=best.get("val_clean"), n=min(cfg.train.val_n, len(ctx.data.val)),
                                                     num_classes=ctx.data.meta.num_classes, what="proxy scorer (chosen draw)"))

    def _unscored(self, item: dict) -> list[dict]:
        return [{"index": item["index"], "genotype": item["genotype"], "C": item["C"], "layers": self.cfg.layers}]

    def _score(self, items: list[dict], ctx: SearchContext, resume: bool, clock: SessionClock) -> list[dict]:
        """Every candidate's proxy score, through the executor `chunk` at a time (search.jsonl, then the clock,
        after each)."""
        cfg = self.cfg
        done = self._load(ctx.out_dir, items) if resume else {}
        clock_file = Path(ctx.out_dir) / CLOCK if ctx.out_dir is not None else None
        if done and clock_file.exists():
            clock.resumed(read_json(clock_file))
        records = [done[i] for i in sorted(done)]
        todo = [it for it in items if it["index"] not in done]
        scorer = self.scorer(ctx)
        robust = ROBUST_KEY[cfg.score_attack]
        bar = Progress(TextColumn("[bold]search random"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not ctx.progress)
        executor = cfg.make_executor()
        try:
            with bar:
                task = bar.add_task("random", total=len(items), completed=len(records), info="")
                for k in range(0, len(todo), cfg.chunk):
                    for rec in executor.map(scorer, todo[k:k + cfg.chunk]):
                        records.append(rec)
                        if ctx.on_epoch_end is not None:
                            ctx.on_epoch_end(rec)
                    self._save(ctx.out_dir, records)
                    if clock_file is not None:
                        write_json(clock_file, clock.state())
                    best = self.pick(records)
                    bar.update(task, completed=len(records), info=f"best #{best['index']} clean "
                               f"{best['val_clean']:.3f} {cfg.score_attack} {best[robust]:.3f}")
        finally:
            executor.close()
        return records

    def pick(self, records: list[dict]) -> dict:
        """The record `select` prefers: highest score, ties to higher clean accuracy, then the earlier draw."""
        if self.cfg.select == "first":
            return min(records, key=lambda r: r["index"])
        key = {"hrs": "score", "robust": ROBUST_KEY[self.cfg.score_attack], "clean": "val_clean"}[self.cfg.select]
        return max(records, key=lambda r: (r[key], r["val_clean"], -r["index"]))

    @staticmethod
    def _save(out: Optional[Path], records: list[dict]) -> None:
        if out is not None:
            rows = sorted(records, key=lambda r: r["index"])
            atomic_write_text(Path(out) / "search.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def _load(self, out: Optional[Path], items: list[dict]) -> dict[int, dict]:
        """Candidates already scored in out/search.jsonl; they must be this search's draws, scored under this
        search's score_attack (a record that names none was scored by PGD)."""
        path = Path(out) / "search.jsonl" if out is not None else None
        if path is None or not path.exists():
            return {}
        done = {}
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            i = rec.get("index")
            if not isinstance(i, int) or i >= len(items) or rec.get("genotype") != items[i]["genotype"] \
                    or "score" not in rec:
                raise UserError(f"{path} holds candidates of another search (other seed, space or size); "
                                f"use another --out")
            if rec.get("score_attack", "pgd") != self.cfg.score_attack:
                raise UserError(f"{path} holds candidates scored by {rec.get('score_attack', 'pgd')}, not "
                                f"{self.cfg.score_attack} (score_attack); use another --out")
            done[i] = rec
        return done
