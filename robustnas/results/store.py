"""The results archive: every run and every evaluated architecture in one SQLite file per workspace, so
that results of different runs, methods and machines can be queried together and the Pareto front of
everything tried can be read off. A candidate's key (`candidate_key`) is unique: it is recorded once.

Several processes may write at once: the journal is WAL, a busy timeout makes a writer wait for the
lock instead of failing, and every write is one `BEGIN IMMEDIATE` transaction, so a writer killed
mid-write leaves the previous state and no partial row. The file is $ROBUSTNAS_ARCHIVE, else
./robustnas-archive.sqlite.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from robustnas.evaluation import analysis
from robustnas.core.config import format_eps, parse_eps
from robustnas.core.errors import UserError
from robustnas.core.config import format_count

SCHEMA_VERSION = 1
ENV = "ROBUSTNAS_ARCHIVE"
DEFAULT_NAME = "robustnas-archive.sqlite"
RUN_KINDS = ("train", "search", "run", "study", "benchmark")
RUN_STATUSES = ("running", "done", "failed")
# what of an evaluation's metrics.json is archived (its curves, sanity details and timings stay in the run)
METRIC_KEYS = ("clean_acc", "robust_acc", "autoattack_acc", "worst_case_acc", "certified", "certified_radius",
               "hrs", "hrs_robust_from", "n", "reliable")
CANDIDATE_FIELDS = ("run_id", "key", "name", "space", "genotype", "dataset", "eps", "eps_value", "norm", "recipe",
                    "metrics", "params", "flops", "cost_s", "result", "created")
_JSON_FIELDS = ("genotype", "recipe", "metrics", "result")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(f"'{k}'" for k in RUN_KINDS)})),
    method TEXT,
    config TEXT NOT NULL DEFAULT '{{}}',
    run_dir TEXT,
    created TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(f"'{s}'" for s in RUN_STATUSES)}))
);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    run_id INTEGER REFERENCES runs(id),
    key TEXT UNIQUE,
    name TEXT, space TEXT, genotype TEXT, dataset TEXT, eps TEXT, eps_value REAL, norm TEXT, recipe TEXT,
    metrics TEXT NOT NULL DEFAULT '{{}}',
    params INTEGER, flops INTEGER, cost_s REAL, result TEXT,
    created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS candidates_dataset_eps ON candidates (dataset, eps_value);
CREATE INDEX IF NOT EXISTS candidates_run ON candidates (run_id)
"""


def default_path() -> Path:
    """$ROBUSTNAS_ARCHIVE, else robustnas-archive.sqlite in the working directory (one per workspace)."""
    return Path(os.environ.get(ENV) or DEFAULT_NAME)


def candidate_key(*parts: Any) -> str:
    """A stable key for a candidate from JSON data (space, genotype, dataset, eps, recipe, ...): equal
    parts give equal keys in every process and on every machine."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dumps(value: Any) -> Optional[str]:
    return None if value is None else json.dumps(value, sort_keys=True)


class Archive:
    """One archive file, opened for reading and writing (create=False: it must exist already)."""

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True, timeout: float = 60.0):
        self.path = Path(path) if path is not None else default_path()
        if not create and not self.path.is_file():
            raise UserError(f"no results archive at {self.path}: pass --db PATH or set ${ENV}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: no implicit transactions; _write() opens each one explicitly
            self._con = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self._con.row_factory = sqlite3.Row
            self._con.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._con.execute("PRAGMA journal_mode = WAL")
            self._con.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across a killed process
            self._con.execute("PRAGMA foreign_keys = ON")
            self._init_schema()
        except sqlite3.DatabaseError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise
            raise UserError(f"{self.path} is not a usable robustnas archive ({e}); pass another --db") from None

    def _version(self) -> Optional[int]:
        try:
            row = self._con.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return None
            raise
        return row[0]

    def _init_schema(self) -> None:
        if self._version() == SCHEMA_VERSION:
            return
        with self._write() as con:
            for statement in _SCHEMA.split(";"):
                con.execute(statement)
            version = self._version()
            if version is None:
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise UserError(f"{self.path} was written by a newer robustnas (archive schema {version}, this one "
                                f"reads {SCHEMA_VERSION}): upgrade robustnas")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the lock is taken up front (waiting up to the busy timeout), and
        anything raised inside rolls it back."""
        self._con.execute("BEGIN IMMEDIATE")
        try:
            yield self._con
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        self._con.execute("COMMIT")

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ runs
    def add_run(self, kind: str, method: Optional[str] = None, config: Optional[dict] = None,
                run_dir: Optional[str | os.PathLike] = None, status: str = "running") -> int:
        """Record a run (train / search / run / study / benchmark); returns its id."""
        if kind not in RUN_KINDS or status not in RUN_STATUSES:
            raise ValueError(f"run kind must be one of {RUN_KINDS} and status one of {RUN_STATUSES}")
        with self._write() as con:
            cur = con.execute("INSERT INTO runs (kind, method, config, run_dir, created, status) VALUES (?,?,?,?,?,?)",
                              (kind, method, json.dumps(config or {}, sort_keys=True, default=str),
                               None if run_dir is None else str(run_dir), _now(), status))
        return int(cur.lastrowid)

    # ------------------------------------------------------------------------------------------ candidates
    def add_candidate(self, *, run_id: Optional[int] = None, key: Optional[str] = None, name: Optional[str] = None,
                      space: Optional[str] = None, genotype: Any = None, dataset: Optional[str] = None,
                      eps: str | float | None = None, norm: Optional[str] = None, recipe: Optional[dict] = None,
                      metrics: Optional[dict] = None, params: Optional[int] = None, flops: Optional[int] = None,
                      cost_s: Optional[float] = None, result: Any = None) -> Optional[int]:
        """Record one evaluated architecture; returns its id, or None when `key` is archived already."""
        return self.add_candidates([dict(run_id=run_id, key=key, name=name, space=space, genotype=genotype,
                                         dataset=dataset, eps=eps, norm=norm, recipe=recipe, metrics=metrics,
                                         params=params, flops=flops, cost_s=cost_s, result=result)])[0]

    def add_candidates(self, rows: Iterable[dict]) -> list[Optional[int]]:
        """Record many candidates (add_candidate's fields) in one transaction: all of them or none."""
        values = [_candidate_values(**row) for row in rows]
        sql = (f"INSERT INTO candidates ({', '.join(CANDIDATE_FIELDS)}) VALUES ({', '.join('?' * len(CANDIDATE_FIELDS))}) "
               "ON CONFLICT (key) DO NOTHING")
        ids: list[Optional[int]] = []
        with self._write() as con:
            for v in values:
                cur = con.execute(sql, v)
                ids.append(int(cur.lastrowid) if cur.rowcount else None)
        return ids

    def add_evaluation(self, metrics: dict, *, run_id: Optional[int] = None, key: Optional[str] = None,
                       name: Optional[str] = None, space: Optional[str] = None, genotype: Any = None,
                       recipe: Optional[dict] = None, cost_s: Optional[float] = None) -> Optional[int]:
        """Record an evaluation's metrics.json (robustnas/evaluate.py): dataset, eps, norm, params and
        flops are read from it, the accuracy figures (METRIC_KEYS) archived."""
        return self.add_candidate(run_id=run_id, key=key, name=name, space=space, genotype=genotype,
                                  dataset=metrics.get("dataset"), eps=metrics.get("eps"), norm=metrics.get("norm"),
                                  recipe=recipe, metrics={k: metrics[k] for k in METRIC_KEYS if k in metrics},
                                  params=metrics.get("params"), flops=metrics.get("flops"), cost_s=cost_s)

    def candidates(self, *, dataset: Optional[str] = None, eps: str | float | None = None,
                   space: Optional[str] = None, method: Optional[str] = None, min_params: Optional[int] = None,
                   max_params: Optional[int] = None, run_id: Optional[int] = None) -> list[dict]:
        """The archived architectures matching every given filter, oldest first, with their run's method."""
        eps_value = None if eps is None else parse_eps(eps)
        where, args = _where({"c.dataset = ?": dataset, "abs(c.eps_value - ?) < 1e-9": eps_value,
                              "c.space = ?": space, "r.method = ?": method, "c.params >= ?": min_params,
                              "c.params <= ?": max_params, "c.run_id = ?": run_id})
        rows = self._con.execute("SELECT c.*, r.method AS method, r.kind AS run_kind, r.run_dir AS run_dir "
                                 f"FROM candidates c LEFT JOIN runs r ON r.id = c.run_id {where} ORDER BY c.id",
                                 args).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for f in _JSON_FIELDS:
                d[f] = None if d[f] is None else json.loads(d[f])
            out.append(d)
        return out

    def pareto(self, *, metric: str = "autoattack_acc", fallback: Sequence[str] = ("pgd20",),
               **filters: Any) -> list[dict]:
        """The candidates (candidates' filters) that no other beats on both `metric` (maximised; where a
        candidate lacks it, the first of `fallback` it has) and parameters (minimised), fewest parameters
        first, each with `value` and `value_from` added. One dataset, eps and norm at a time."""
        scored = []
        for row in self.candidates(**filters):
            found = metric_value(row["metrics"], metric, fallback)
            if found is not None and row["params"] is not None:
                scored.append({**row, "value": found[0], "value_from": found[1]})
        groups = sorted({(str(r["dataset"]), str(r["eps"]), str(r["norm"])) for r in scored})
        if len(groups) > 1:
            shown = ", ".join("/".join(g) for g in groups[:4])
            raise UserError(f"a Pareto front compares one dataset, eps and norm, and these rows hold {len(groups)} "
                            f"({shown}): pass --dataset and --eps")
        front = analysis.pareto_front([(r["value"], r["params"]) for r in scored], maximize=(True, False))
        return sorted((scored[i] for i in front), key=lambda r: (r["params"], -r["value"], r["id"]))


def metric_value(metrics: Optional[dict], metric: str, fallback: Sequence[str] = ()) -> Optional[tuple[float, str]]:
    """(value, name) of the first of `metric`, *fallback that `metrics` holds, either at the top level
    (clean_acc, autoattack_acc, hrs) or among robust_acc's attacks (pgd20, autoattack, ...)."""
    metrics = metrics or {}
    robust = metrics.get("robust_acc") or {}
    for name in (metric, *fallback):
        for value in (metrics.get(name), robust.get(name), robust.get(name.removesuffix("_acc"))):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value), name
    return None


def _candidate_values(*, run_id: Optional[int] = None, key: Optional[str] = None, name: Optional[str] = None,
                      space: Optional[str] = None, genotype: Any = None, dataset: Optional[str] = None,
                      eps: str | float | None = None, norm: Optional[str] = None, recipe: Optional[dict] = None,
                      metrics: Optional[dict] = None, params: Optional[int] = None, flops: Optional[int] = None,
                      cost_s: Optional[float] = None, result: Any = None) -> tuple:
    eps_value = None if eps is None else parse_eps(eps)
    row = {"run_id": run_id, "key": key, "name": name, "space": space, "genotype": _dumps(genotype),
           "dataset": dataset, "eps": None if eps_value is None else format_eps(eps_value), "eps_value": eps_value,
           "norm": norm, "recipe": _dumps(recipe), "metrics": json.dumps(metrics or {}, sort_keys=True),
           "params": None if params is None else int(params), "flops": None if flops is None else int(flops),
           "cost_s": None if cost_s is None else float(cost_s), "result": _dumps(result), "created": _now()}
    return tuple(row[f] for f in CANDIDATE_FIELDS)


def _where(conditions: dict[str, Any]) -> tuple[str, list]:
    used = [(sql, v) for sql, v in conditions.items() if v is not None]
    return ("WHERE " + " AND ".join(sql for sql, _ in used) if used else ""), [v for _, v in used]


# ------------------------------------------------------------------------------------------ the CLI's view
def table(db: str | os.PathLike | None = None, *, pareto: bool = False, metric: str = "autoattack_acc",
          dataset: Optional[str] = None, eps: Optional[str] = None, space: Optional[str] = None,
          method: Optional[str] = None) -> tuple[str, list[str], list[list[str]]]:
    """(title, headers, rows of text) for `robustnas archive`: the matching candidates or their front."""
    with Archive(db, create=False) as archive:
        filters = {"dataset": dataset, "eps": eps, "space": space, "method": method}
        if pareto:
            rows = archive.pareto(metric=metric, **filters)
        else:
            rows = archive.candidates(**filters)
            for r in rows:
                found = metric_value(r["metrics"], metric, ("pgd20",))
                r["value"], r["value_from"] = found if found is not None else (None, None)
        path = archive.path
    headers = ["id", "name", "space", "method", "dataset", "eps", "clean", "robust", "params", "flops", "cost s"]
    text = []
    for r in rows:
        clean = (r["metrics"] or {}).get("clean_acc")
        value = "" if r["value"] is None else f"{r['value']:.3f}" + ("" if r["value_from"] == metric else "*")
        text.append([str(r["id"]), r["name"] or "", r["space"] or "", r["method"] or "", r["dataset"] or "",
                     r["eps"] or "", "" if clean is None else f"{clean:.3f}", value, _count(r["params"]),
                     _count(r["flops"]), "" if r["cost_s"] is None else f"{r['cost_s']:.1f}"])
    what = "on the Pareto front" if pareto else "archived"
    return (f"{path}: {len(text)} {what}; robust = {metric} (* pgd20 where it is absent)", headers, text)


def _count(n: Optional[int]) -> str:
    return "" if n is None else format_count(n)
