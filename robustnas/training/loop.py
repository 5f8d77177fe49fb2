"""The one epoch scaffold: the Trainer, every DARTS-space supernet search and TAM-NAS's supernet run their
epochs through `EpochLoop`, which seeds, checkpoints, resumes and keeps the best epoch for them.

    loop = EpochLoop(out_dir, "checkpoint", seed, epochs, steps_per_epoch, identity,
                     state={"model": model, "opt": optimizer})
    if resume:
        loop.resume()
    loop.run(one_epoch)   # one_epoch(epoch, g) trains one epoch (calling loop.step_done() after every
                          # optimisation step), validates, and returns the epoch's record (a JSON dict)

A user supplies its per-epoch work and the state it owns (modules, optimizers, or anything else with
`state_dict` / `load_state_dict` of tensors); the loop does the rest:
- Seeding. Before epoch e, torch's global RNG (every device) and the generator `g` handed to the epoch (for
  its data order) are seeded from epoch_seed(seed, e). Nothing random is carried across an epoch boundary.
- The learning rate is the user's pure function of the iteration (`cosine_lr`, trainer.lr_at): no
  scheduler object is stepped, so there is nothing to restore.
- A checkpoint after every epoch, in one format: `<name>.e<epoch>.safetensors` holds the tensors (`<state
  name>.<key>` of each module's state dict, `<optimizer name>.<param id>.<key>` of each optimizer's state,
  `best.<key>` the best weights); `<name>.json` beside it holds the identity, epoch, history, best epoch,
  the optimizers' non-tensor state and the user's JSON state (`extra`), and names its tensors file. The
  JSON is written last and is the commit: a process killed anywhere leaves a JSON that names a complete
  tensors file of the same epoch (the older tensors file is removed only after the new JSON is written).
- Resume loads that checkpoint (refusing, in one line, a checkpoint made with another identity or holding
  other shapes) and continues with the next epoch; the run ends bit-identical to an uninterrupted one on CPU.
- Keep-best: with `select` (record -> key, larger is better), the weights of `state[best_of]` at the best
  epoch are kept and checkpointed; `restore_best()` loads them.
- `log`: a JSONL file of the history, rewritten after every checkpoint (search.jsonl).
- `clock` (a `SessionClock`): the wall time of the work so far, summed over the sessions (the first run and
  every resume) that made it; each checkpoint records it and a resume carries it on, so a resumed search
  reports the time of all its parts (up to each killed session's last checkpoint), not only the last one.
Checkpoints written before this scaffold (<name>.json without "format", <name>.safetensors) are read by one
function, `_old_format` at the end of this file, and rewritten in the current format when `run` starts.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch import Tensor, nn

from robustnas.core.errors import UserError
from robustnas.core.faults import tick
from robustnas.core.rundir import atomic_write_text, save_tensors

FORMAT = 1  # the "format" field of <name>.json; a JSON without it is a checkpoint of the old formats


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


def cosine_lr(lr: float, lr_min: float, t: float) -> float:
    """Cosine annealing from lr at t = 0 to lr_min at t = 1: the one schedule of training and search."""
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t)) / 2


def progress_bar(enabled: bool) -> Progress:
    """The progress bar of every training and search (a context manager; disabled: does nothing)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


def epoch_steps(images: int, batch_size: int, max_batches: Optional[int] = None) -> int:
    """Optimisation steps of an epoch over `images` images in batches of `batch_size`, at most `max_batches`
    (a CPU budget; None: all). The Trainer and every epoch-based search count their epochs' steps with this."""
    whole = math.ceil(images / batch_size)
    return min(whole, max_batches or whole)


class SessionClock:
    """Wall time of one piece of work summed over the sessions that made it: started when created, it adds
    what earlier sessions recorded (`resumed`, from a checkpoint's `state()`). `sessions` counts the processes
    that ran it, this one included. The time a killed session spent after its last checkpoint is lost."""

    def __init__(self):
        self.carried, self.sessions, self._t0 = 0.0, 1, time.perf_counter()

    def seconds(self) -> float:
        return self.carried + time.perf_counter() - self._t0

    def state(self) -> dict[str, Any]:
        return {"seconds": self.seconds(), "sessions": self.sessions}

    def resumed(self, state: Optional[dict[str, Any]]) -> None:
        """Carry on from a checkpoint's `state()` (None: a checkpoint that recorded none, nothing carried)."""
        if state:
            self.carried, self.sessions = float(state["seconds"]), int(state["sessions"]) + 1


class EpochLoop:
    """Runs epochs start_epoch..epochs-1 of `one_epoch`, checkpointing into out_dir/name.* after each."""

    def __init__(self, out_dir: Optional[Path], name: str, seed: int, epochs: int, steps_per_epoch: int,
                 identity: dict[str, Any], state: dict[str, Any], select: Optional[Callable[[dict], Any]] = None,
                 best_of: str = "model", log: Optional[str] = None, progress: bool = False,
                 description: str = "train", clock: Optional[SessionClock] = None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.name, self.seed, self.epochs, self.steps_per_epoch = name, seed, epochs, steps_per_epoch
        self.identity, self.state, self.select, self.best_of, self.log = identity, state, select, best_of, log
        self.progress, self.description = progress, description
        self.clock = clock if clock is not None else SessionClock()  # checkpointed as "elapsed"
        self.history: list[dict] = []       # one record per epoch (users may append others: TAM-NAS generations)
        self.extra: dict[str, Any] = {}     # the user's JSON state, checkpointed with the history
        self.start_epoch = 0                # the first epoch `run` trains
        self.best_epoch = -1
        self.best_state: Optional[dict[str, Tensor]] = None
        self._tensors: Optional[str] = None  # the tensors file the checkpoint names
        self._old = False                    # resumed from a checkpoint of the old format
        self._epoch, self._step = 0, 0       # where `step_done` is
        self._bar: Optional[Progress] = None

    # ------------------------------------------------------------------------------------ the loop
    def run(self, one_epoch: Callable[[int, torch.Generator], dict],
            after_epoch: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Train the remaining epochs; `after_epoch(record)` is called after each epoch's checkpoint (a raise
        there stops the run, which `resume` continues). Returns the history."""
        if self._old:
            self.save()  # a checkpoint of the old format, rewritten in the current one (the log with it)
            self._old = False
        elif self.history:
            self.write_log()  # a kill between a checkpoint and the log left the log one record short
        total = self.epochs * self.steps_per_epoch
        with progress_bar(self.progress) as bar:
            self._bar = bar
            self._task = bar.add_task(self.description, total=total, info="",
                                      completed=self.start_epoch * self.steps_per_epoch)
            try:
                for epoch in range(self.start_epoch, self.epochs):
                    self._epoch, self._step = epoch, 0
                    torch.manual_seed(epoch_seed(self.seed, epoch))
                    g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
                    record = one_epoch(epoch, g)
                    self.history.append(record)
                    if self.select is not None and (self.best_epoch < 0 or
                                                    self.select(record) > self.select(self.best_record())):
                        self.best_epoch = epoch
                        self.best_state = {k: v.detach().clone() for k, v in self.state[self.best_of].state_dict().items()}
                    self.start_epoch = epoch + 1
                    self.save()
                    bar.update(self._task, info=f"ep {epoch + 1}/{self.epochs} " + " ".join(
                        f"{k} {v:.3f}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float)))
                    if after_epoch is not None:
                        after_epoch(record)
            finally:
                self._bar = None
        return self.history

    def step_done(self, info: Optional[Callable[[], str]] = None) -> None:
        """Called by the epoch after every optimisation step: the fault hook (core/faults.py) and the progress
        bar (`info()`, e.g. the running loss, is formatted only when the bar shows it)."""
        tick("step")
        self._step += 1
        b, n = self._step, self.steps_per_epoch
        if self._bar is not None and self.progress and (b % 5 == 1 or b == n):
            text = f"ep {self._epoch + 1}/{self.epochs}" + (f" {info()}" if info is not None else "")
            self._bar.update(self._task, completed=self._epoch * n + b, info=text)

    def best_record(self) -> Optional[dict]:
        return next((h for h in self.history if h.get("epoch") == self.best_epoch), None)

    def restore_best(self) -> None:
        """Load the kept best weights into state[best_of] (nothing when none were kept)."""
        if self.best_state is not None:
            self.state[self.best_of].load_state_dict(self.best_state)

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """The checkpoint of the last finished epoch: its tensors file, then the JSON that names it."""
        if self.out_dir is None:
            return
        tensors: dict[str, Tensor] = {}
        for sname, obj in self.state.items():
            if isinstance(obj, torch.optim.Optimizer):
                for pid, st in obj.state_dict()["state"].items():
                    tensors.update({f"{sname}.{pid}.{k}": v for k, v in st.items() if isinstance(v, Tensor)})
            else:
                tensors.update({f"{sname}.{k}": v for k, v in obj.state_dict().items()})
        tensors.update({f"best.{k}": v for k, v in (self.best_state or {}).items()})
        self._tensors = f"{self.name}.e{self.start_epoch - 1}.safetensors"
        save_tensors(self.out_dir / self._tensors, tensors)
        self.save_progress()

    def save_progress(self) -> None:
        """Only the JSON (history, extra), beside the last tensors file: for progress after the last epoch
        that changes no tensor (TAM-NAS's generations)."""
        if self.out_dir is None:
            return
        optimizers = {sname: {str(pid): {k: v for k, v in st.items() if not isinstance(v, Tensor) and v is not None}
                              for pid, st in obj.state_dict()["state"].items()}
                      for sname, obj in self.state.items() if isinstance(obj, torch.optim.Optimizer)}
        meta = {"format": FORMAT, "epoch": self.start_epoch - 1, "tensors": self._tensors, "identity": self.identity,
                "history": self.history, "best_epoch": self.best_epoch, "optimizers": optimizers, "extra": self.extra,
                "elapsed": self.clock.state()}
        atomic_write_text(self.out_dir / f"{self.name}.json", json.dumps(meta))
        for f in [*self.out_dir.glob(f"{self.name}.e*.safetensors"), self.out_dir / f"{self.name}.safetensors"]:
            if f.name != self._tensors:
                f.unlink(missing_ok=True)  # superseded: the JSON just written names another
        self.write_log()

    def write_log(self) -> None:
        if self.out_dir is not None and self.log is not None:
            atomic_write_text(self.out_dir / self.log, "".join(json.dumps(h) + "\n" for h in self.history))

    def resume(self) -> bool:
        """Load the checkpoint in out_dir, if there is one (False: none, start from scratch); `run` continues
        with the epoch after it. Reads only: the first write is `run`'s."""
        if self.out_dir is None or not (self.out_dir / f"{self.name}.json").exists():
            return False
        meta = json.loads((self.out_dir / f"{self.name}.json").read_text())
        old = meta.get("format") != FORMAT
        if old:
            meta, tensors = _old_format(meta, self.out_dir / f"{self.name}.safetensors")
        else:
            tensors = load_file(str(self.out_dir / meta["tensors"]), device="cpu")
        self._check(meta.get("identity"), tensors)
        for sname, obj in self.state.items():
            mine = {k[len(sname) + 1:]: v for k, v in tensors.items() if k.startswith(sname + ".")}
            if isinstance(obj, torch.optim.Optimizer):
                sd = obj.state_dict()
                st: dict[int, dict[str, Any]] = {}
                for key, v in mine.items():
                    pid, k = key.split(".", 1)
                    st.setdefault(int(pid), {})[k] = v.clone()
                for pid, plain in meta["optimizers"].get(sname, {}).items():
                    st.setdefault(int(pid), {}).update(plain)
                sd["state"] = st
                obj.load_state_dict(sd)
            else:
                obj.load_state_dict(mine)
        self.best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        self.history, self.best_epoch, self.extra = meta["history"], meta["best_epoch"], meta["extra"]
        self.clock.resumed(meta.get("elapsed"))
        self.start_epoch = meta["epoch"] + 1
        self._tensors, self._old = meta.get("tensors"), old
        return True

    def _check(self, identity: Optional[dict], tensors: dict[str, Tensor]) -> None:
        """Refuse, in one line, a checkpoint made with other settings or holding other shapes."""
        where = self.out_dir / f"{self.name}.json"
        if identity is not None and identity != self.identity:
            diff = [k for k in self.identity if identity.get(k) != self.identity[k]]
            if "config" in diff:
                old, new = identity.get("config") or {}, self.identity["config"]
                diff = [f"config.{k}" for k in new if old.get(k) != new[k]] + [d for d in diff if d != "config"]
            raise UserError(f"cannot resume from {where}: it was made with other settings ({', '.join(diff)}); "
                            f"use the same settings or another output folder")
        for sname, obj in self.state.items():
            if not isinstance(obj, nn.Module):
                continue
            want = {k: tuple(v.shape) for k, v in obj.state_dict().items()}
            have = {k[len(sname) + 1:]: tuple(v.shape) for k, v in tensors.items() if k.startswith(sname + ".")}
            if want != have:
                bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
                raise UserError(f"cannot resume from {where}: its {sname} is another network ({len(bad)} tensors "
                                f"differ, e.g. {bad[0]}); use the same settings or another output folder")


# ================================================================================ OLD FORMAT (read only)
def _old_format(meta: dict, path: Path) -> tuple[dict, dict[str, Tensor]]:
    """A checkpoint written before the one scaffold (issue 15), as the current format: <name>.json without
    "format", tensors in <name>.safetensors. The Trainer's JSON was {"epoch", "result": {"history",
    "best_epoch", ...}} and its SGD buffers `opt.<i>`; TAM-NAS's JSON had "nsga2" and its buffers `opt.<i>`;
    the supernet searches' keys (`net.*`, `w_opt.<id>.<key>`, `a_opt.*`, `extra.*`) are the current ones."""
    if not path.exists():
        raise UserError(f"cannot resume from {path.with_suffix('.json')}: {path.name} is missing")
    tensors = {re.sub(r"^opt\.(\d+)$", r"opt.\1.momentum_buffer", k): v
               for k, v in load_file(str(path), device="cpu").items()}
    result = meta.get("result", {})
    return {"epoch": meta["epoch"], "identity": meta.get("identity"),  # the Trainer's had none: not checked
            "history": meta.get("history", result.get("history")), "best_epoch": result.get("best_epoch", -1),
            "optimizers": meta.get("optimizers", {}),
            "extra": {"nsga2": meta["nsga2"]} if meta.get("nsga2") is not None else {}}, tensors
