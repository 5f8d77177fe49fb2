"""NSGA-II (pymoo, ask/tell) over the tiny-block encoding, as TAM-NAS uses it.

Our own sampling, uniform layer-wise crossover and per-gene mutation, all returning canonical encodings
(spaces/tiny.py). A candidate's score is a dict {"encoding", "clean_err", "pgd_err", "params", ...}, or with
{"score_attack": "aa-rank"} "aa_rank_err" in place of "pgd_err" (`ROBUST_ERR`); the objectives, all
minimised, are clean error, that robust error and params / `params_scale`; an optional
ceiling `max_params` is a constraint. A generation's new encodings go to one `executor.map` call and
every score is remembered, so a subnet is scored once. Resume is exact: the state handed to
`on_generation` holds the population, rank and crowding, pymoo's random state and every score so far.

Each generation's record holds the non-dominated front of everything scored so far and its hypervolume
for the fixed reference point `hv_ref` (normalised objectives), so the logged hypervolume never
decreases; `population_hv` is that of the current population's first front.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.crossover import Crossover
from pymoo.core.evaluator import Evaluator
from pymoo.core.mutation import Mutation
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.indicators.hv import HV
from pymoo.problems.static import StaticProblem

from robustnas.evaluation import analysis
from robustnas.core.executor import Executor
from robustnas.nets.spaces.tiny import TinySpace

ROBUST_ERR = {"pgd": "pgd_err", "aa-rank": "aa_rank_err"}  # a score's robust-error key, by its score_attack


def objective_names(score_attack: str = "pgd") -> tuple[str, str, str]:
    """The objectives' names for scores made under `score_attack`; size = params / params_scale."""
    return ("clean_err", ROBUST_ERR[score_attack], "size")


def robust_err(score: dict[str, Any]) -> float:
    """A score's robust error under the attack that scored it (`score_attack`; PGD when the score names none)."""
    return score[ROBUST_ERR[score.get("score_attack", "pgd")]]


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
    return [score["clean_err"], robust_err(score), score["params"] / params_scale]


def pareto_front(scores: Sequence[dict[str, Any]], params_scale: float,
                 max_params: Optional[int] = None) -> list[dict[str, Any]]:
    """The non-dominated scores among the feasible ones, smallest first."""
    feasible = [s for s in scores if max_params is None or s["params"] <= max_params]
    idx = analysis.pareto_front([objectives(s, params_scale) for s in feasible], maximize=(False, False, False))
    return sorted((feasible[i] for i in idx), key=lambda s: (s["params"], robust_err(s), s["clean_err"]))


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
    """NSGA-II by ask/tell. `fn(encoding)` scores one subnet ({"clean_err", "pgd_err" or another ROBUST_ERR,
    "params", ...}); the generation's new encodings go to `executor.map(fn, ...)` at once. `state` (from a
    previous on_generation call) resumes after its generation. `count(encoding)` (parameters without building the
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

