"""Robustness predictors and the harness that measures them against ground truth (issue 28).

A predictor is one registry entry: a function (Arch, seed) -> score, higher meaning "predicted more robust".
Genotype-only predictors read the genotype and the size of the network it builds (through nets/size.py);
network-at-init predictors build the network under torch.manual_seed(seed) and look at it on a few seeded
batches of random images in [0, 1] with random labels, so every score is a pure function of (arch, seed).
The surrogate is not a registry entry: it must be fitted first (`fit_surrogate`) and refuses to score a
genotype it was fitted on.

The harness (`correlate`, `measure`) gives Kendall tau-b and Spearman rho of each predictor's scores against
a table's robust and clean accuracy, each with a percentile bootstrap interval over a seeded resample of rows.

A table is a JSON list in Tiny-RobustBench's format (fyqsama/ZCP): per entry `net` (`genotype`, `depth`,
`width`), `max_test_top1_adv` and `max_test_top1_original` (CIFAR-10, %). Its genotypes spell the reduce
cell's concat `reduce_concate`; `read_table` accepts both spellings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from robustnas.core.errors import UserError
from robustnas.core.registry import Registry
from robustnas.nets.genotypes import build_network
from robustnas.nets.size import count_flops, count_params
from robustnas.nets.spaces.darts import PRIMITIVES, Genotype
from robustnas.robustness.jacobian import jacobian_row_norms

OPS = [p for p in PRIMITIVES if p != "none"]
CELLS = ("normal", "reduce")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------------
# Architectures and tables


@dataclass(frozen=True)
class NetShape:
    """The network a genotype builds for a predictor: Tiny-RobustBench's is CIFAR-10, 8 cells, C=16."""

    C: int = 16
    layers: int = 8
    in_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10


class Arch:
    """One architecture as predictors see it: its genotype, the shape of its network, and (built once, on
    first use) that network, for the predictors that only measure its size."""

    def __init__(self, genotype: Genotype, shape: NetShape = NetShape()):
        self.genotype = genotype
        self.shape = shape
        self._network: Optional[nn.Module] = None

    def build(self) -> nn.Module:
        s = self.shape
        return build_network(self.genotype, s.C, s.layers, s.num_classes, s.in_shape, CIFAR_MEAN, CIFAR_STD)

    def network(self) -> nn.Module:
        if self._network is None:
            self._network = self.build()
        return self._network

    def init_network(self, seed: int) -> nn.Module:
        """A fresh network at initialisation, the same for the same seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()

    def batches(self, seed: int, n: int = 2, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """n batches of uniform random images in [0, 1] with uniform random labels, fixed by the seed."""
        g = torch.Generator().manual_seed(seed)
        return [(torch.rand(size, *self.shape.in_shape, generator=g),
                 torch.randint(self.shape.num_classes, (size,), generator=g)) for _ in range(n)]


@dataclass
class Row:
    """One network of a ground-truth table: its architecture and its measured accuracies (%)."""

    arch: Arch
    robust: float
    clean: float
    source: str  # "file.json[index]"


def _genotype_of(data: dict) -> Genotype:
    data = dict(data)
    for kind in CELLS:  # Tiny-RobustBench writes reduce_concate
        if f"{kind}_concate" in data and f"{kind}_concat" not in data:
            data[f"{kind}_concat"] = data.pop(f"{kind}_concate")
    return Genotype.from_dict(data)


def read_table(path: str | Path) -> list[Row]:
    """The rows of a table in Tiny-RobustBench's format (see the module docstring)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read table {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: expected a non-empty JSON list of networks (Tiny-RobustBench format)")
    rows = []
    for i, e in enumerate(entries):
        where = f"{path.name}[{i}]"
        try:
            net = e["net"]
            shape = NetShape(C=int(net.get("width", 16)), layers=int(net.get("depth", 8)))
            rows.append(Row(Arch(_genotype_of(net["genotype"]), shape), float(e["max_test_top1_adv"]),
                            float(e["max_test_top1_original"]), where))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{where}: not a Tiny-RobustBench entry ({type(err).__name__}: {err})") from None
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    return rows


def genotype_key(genotype: Genotype) -> str:
    """The cells of a genotype as one string: two rows with equal keys are the same architecture."""
    return json.dumps({k: v for k, v in genotype.to_dict().items() if k != "source"}, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# The predictor registry


@dataclass(frozen=True)
class Predictor:
    name: str
    fn: Callable[[Arch, int], float]
    kind: str  # "baseline" (size and op counts), "init" (the network at initialisation)
    doc: str


PREDICTORS: Registry[Predictor] = Registry("predictor")


def predictor(name: str, kind: str, doc: str):
    def register(fn: Callable[[Arch, int], float]) -> Callable[[Arch, int], float]:
        PREDICTORS.add(name, Predictor(name, fn, kind, doc))
        return fn
    return register


def op_counts(genotype: Genotype) -> dict[str, int]:
    """How often each op appears over both cells."""
    counts = dict.fromkeys(OPS, 0)
    for kind in CELLS:
        for op, _ in genotype.cell(kind)[0]:
            if op in counts:
                counts[op] += 1
    return counts


@predictor("params", "baseline", "parameter count of the network the genotype builds")
def _params(arch: Arch, seed: int) -> float:
    return float(count_params(arch.network()))


@predictor("flops", "baseline", "FLOPs of one forward pass on one image")
def _flops(arch: Arch, seed: int) -> float:
    return float(count_flops(arch.network(), arch.shape.in_shape))


@predictor("param_op_count", "baseline", "parametric ops (sep_conv, dil_conv) over both cells")
def _param_op_count(arch: Arch, seed: int) -> float:
    c = op_counts(arch.genotype)
    return float(sum(v for op, v in c.items() if op.startswith(("sep_conv", "dil_conv"))))


@predictor("sep_dil_count", "baseline", "2 x sep_conv + dil_conv over both cells")
def _sep_dil_count(arch: Arch, seed: int) -> float:
    c = op_counts(arch.genotype)
    return float(sum((2 if op.startswith("sep_conv") else 1) * v for op, v in c.items()
                     if op.startswith(("sep_conv", "dil_conv"))))


def _loss_grads(model: nn.Module, batches) -> list[Optional[torch.Tensor]]:
    """Gradients of the summed cross-entropy over the batches (train mode, as at the first training step)."""
    model.train()
    model.zero_grad()
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters()]


@predictor("grad_norm", "init", "sum over parameter tensors of ||dL/dw||_2 at init (2 batches of 16)")
def _grad_norm(arch: Arch, seed: int) -> float:
    model = arch.init_network(seed)
    return float(sum(g.norm() for g in _loss_grads(model, arch.batches(seed)) if g is not None))


@predictor("snip", "init", "sum |w * dL/dw| at init (2 batches of 16)")
def _snip(arch: Arch, seed: int) -> float:
    model = arch.init_network(seed)
    grads = _loss_grads(model, arch.batches(seed))
    return float(sum((p.detach() * g).abs().sum() for p, g in zip(model.parameters(), grads) if g is not None))


@predictor("synflow", "init", "sum |w * dR/dw|, R the output sum of the |w| network on an all-ones image "
                              "(float64, eval mode)")
def _synflow(arch: Arch, seed: int) -> float:
    model = arch.init_network(seed).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    model.zero_grad()
    model(torch.ones(1, *arch.shape.in_shape, dtype=torch.float64)).sum().backward()
    return float(sum((p.detach() * p.grad).abs().sum() for p in model.parameters() if p.grad is not None))


@predictor("jacobian_norm", "init", "minus mean_x sum_k ||d f_k / dx||_1 at init, eval mode (DSRNA's metric "
                                    "without eps; 1 batch of 16)")
def _jacobian_norm(arch: Arch, seed: int) -> float:
    model = arch.init_network(seed).eval()
    x, _ = arch.batches(seed, n=1)[0]
    return -float(jacobian_row_norms(model, x, q=1.0, create_graph=False).sum(1).mean())


@predictor("input_grad_norm", "init", "minus mean ||dL/dx||_1 at init, eval mode (2 batches of 16)")
def _input_grad_norm(arch: Arch, seed: int) -> float:
    model = arch.init_network(seed).eval()
    total = 0.0
    batches = arch.batches(seed)
    for x, y in batches:
        x = x.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
        total += float(g.abs().flatten(1).sum(1).mean())
    return -total / len(batches)


def score(rows: Sequence[Row], names: Sequence[str], seed: int = 0) -> dict[str, tuple[np.ndarray, float]]:
    """name -> (score per row, CPU seconds per architecture) for registered predictors."""
    out = {}
    for name in names:
        p = PREDICTORS.lookup(name)
        start = time.process_time()
        values = np.array([p.fn(r.arch, seed) for r in rows], dtype=float)
        out[name] = values, (time.process_time() - start) / max(1, len(rows))
    return out


# --------------------------------------------------------------------------------------------------
# The surrogate: trees on genotype features


def genotype_features(genotype: Genotype) -> np.ndarray:
    """Each op's count in the normal cell, then in the reduce cell (14 numbers). Adding each op's count per
    input state (84 numbers) lowered the leave-one-file-out tau on Tiny-RobustBench from 0.384 to 0.331:
    about 110 rows to fit on do not carry that many features (docs/predictors.md)."""
    feats = np.zeros((len(CELLS), len(OPS)))
    for c, kind in enumerate(CELLS):
        for op, _ in genotype.cell(kind)[0]:
            if op in OPS:
                feats[c, OPS.index(op)] += 1
    return feats.ravel()


class Surrogate:
    """A random forest on genotype features (per-cell op counts), fitted on some rows; it refuses to score any genotype it was
    fitted on, so a score is always out of sample."""

    def __init__(self, rows: Sequence[Row], seed: int = 0):
        from sklearn.ensemble import RandomForestRegressor

        if len(rows) < 5:
            raise UserError(f"the surrogate needs at least 5 rows to fit on, got {len(rows)}")
        self.fitted_on = frozenset(genotype_key(r.arch.genotype) for r in rows)
        self.n = len(rows)
        self.model = RandomForestRegressor(n_estimators=300, min_samples_leaf=3, max_features=0.3,
                                           random_state=seed, n_jobs=1)
        self.model.fit(np.stack([genotype_features(r.arch.genotype) for r in rows]),
                       np.array([r.robust for r in rows]))

    def score(self, rows: Sequence[Row]) -> np.ndarray:
        seen = [r.source for r in rows if genotype_key(r.arch.genotype) in self.fitted_on]
        if seen:
            raise ValueError(f"the surrogate was fitted on {len(seen)} of the rows it is asked to score "
                             f"({', '.join(seen[:3])}...)")
        return self.model.predict(np.stack([genotype_features(r.arch.genotype) for r in rows]))


def fit_surrogate(fit_rows: Sequence[Row], scored: Sequence[Row], seed: int = 0) -> Surrogate:
    """A surrogate fitted on `fit_rows`, leaving out every row whose genotype also appears in `scored`."""
    scored_keys = {genotype_key(r.arch.genotype) for r in scored}
    return Surrogate([r for r in fit_rows if genotype_key(r.arch.genotype) not in scored_keys], seed)


def leave_one_file_out(tables: Sequence[Sequence[Row]], seed: int = 0) -> list[np.ndarray]:
    """Each table's surrogate scores from a surrogate fitted on the other tables."""
    return [fit_surrogate([r for j, t in enumerate(tables) if j != i for r in t], table, seed).score(table)
            for i, table in enumerate(tables)]


# --------------------------------------------------------------------------------------------------
# The harness


@dataclass(frozen=True)
class Corr:
    value: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


def _kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall tau-b of each row pair of x and y, shape (B, n): concordant minus discordant pairs over the
    square root of the untied pairs in x times those in y (ties count in neither; scipy's kendalltau)."""
    dx = np.sign(x[:, :, None] - x[:, None, :])
    dy = np.sign(y[:, :, None] - y[:, None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (dx * dy).sum((1, 2)) / np.sqrt((dx * dx).sum((1, 2)) * (dy * dy).sum((1, 2)))


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair: the Pearson correlation of the (tie-averaged) ranks."""
    rx = rankdata(x, axis=1)
    ry = rankdata(y, axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))


CORRELATIONS = {"tau": _kendall, "rho": _spearman}


def correlate(scores, truth, which: str = "tau", n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Corr:
    """Kendall tau-b ("tau") or Spearman rho ("rho") of scores against truth, with a percentile bootstrap
    interval over n_boot resamples of the rows drawn by a generator seeded with `seed` (resamples on which
    either side is constant have no correlation and are left out)."""
    x = np.asarray(scores, dtype=float)
    y = np.asarray(truth, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"need two equal-length 1-d arrays of at least 3 values, got {x.shape} and {y.shape}")
    fn = CORRELATIONS[which]
    value = float(fn(x[None], y[None])[0])
    idx = np.random.default_rng(seed).integers(len(x), size=(n_boot, len(x)))
    boot = np.concatenate([fn(x[chunk], y[chunk]) for chunk in np.array_split(idx, max(1, n_boot // 50))])
    boot = boot[np.isfinite(boot)]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha]) if len(boot) else (np.nan, np.nan)
    return Corr(value, float(lo), float(hi), len(x))


def measure(rows: Sequence[Row], scores: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Corr]:
    """tau and rho of one predictor's scores against the rows' robust and clean accuracy."""
    robust = [r.robust for r in rows]
    clean = [r.clean for r in rows]
    return {f"{which}_{target}": correlate(scores, truth, which, n_boot, seed)
            for target, truth in (("robust", robust), ("clean", clean)) for which in ("tau", "rho")}


GENOTYPE_PREDICTORS = ("params", "flops", "param_op_count", "sep_dil_count")
INIT_PREDICTORS = ("grad_norm", "snip", "synflow", "jacobian_norm", "input_grad_norm")


def run_predictors(tables: Sequence[str | Path], fit_on: Sequence[str | Path] = (), init: bool = False,
                   n_boot: int = 1000, seed: int = 0) -> dict:
    """`robustnas predictors`: score every row of the tables with the genotype-only predictors (and the
    at-init ones with `init`) and the surrogate, and measure each against the rows' accuracies.

    The surrogate is fitted on the --fit-on tables (minus any genotype also in a scored table); with no
    --fit-on and several tables, each table is scored by a surrogate fitted on the others (leave one file
    out); with one table and no --fit-on there is no surrogate.
    """
    if not tables:
        raise UserError("give at least one --table")
    scored_paths = {Path(t).resolve() for t in tables}
    both = [str(f) for f in fit_on if Path(f).resolve() in scored_paths]
    if both:
        raise UserError(f"{', '.join(both)} is both scored (--table) and fitted on (--fit-on)")
    per_table = [read_table(t) for t in tables]
    rows = [r for t in per_table for r in t]
    names = GENOTYPE_PREDICTORS + (INIT_PREDICTORS if init else ())
    scored = score(rows, names, seed)
    notes = []
    start = time.process_time()
    if fit_on:
        fit_rows = [r for f in fit_on for r in read_table(f)]
        surrogate = fit_surrogate(fit_rows, rows, seed)
        surrogate_scores = surrogate.score(rows)
        notes.append(f"surrogate: a random forest fitted on {surrogate.n} rows of {len(fit_on)} --fit-on file(s) "
                     f"({len(fit_rows) - surrogate.n} left out: their genotype is among the scored rows)")
    elif len(per_table) > 1:
        surrogate_scores = np.concatenate(leave_one_file_out(per_table, seed))
        notes.append(f"surrogate: each of the {len(per_table)} tables scored by a random forest fitted on the others")
    else:
        surrogate_scores = None
        notes.append("no surrogate: give --fit-on files (or several --table files to cross-validate it)")
    if surrogate_scores is not None:
        scored["surrogate"] = surrogate_scores, (time.process_time() - start) / len(rows)
    results = []
    for name, (values, cost) in scored.items():
        kind = "surrogate" if name == "surrogate" else PREDICTORS[name].kind
        results.append({"name": name, "kind": kind, "seconds": cost, **measure(rows, values, n_boot, seed)})
    reference = {"name": "clean accuracy (measured)", "kind": "reference",
                 **{k: v for k, v in measure(rows, [r.clean for r in rows], n_boot, seed).items()
                    if k.endswith("robust")}}
    return {"n": len(rows), "tables": [str(t) for t in tables], "results": results, "reference": reference,
            "notes": notes}
