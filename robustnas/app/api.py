"""The Python entry points: `robustnas.evaluate(model, dataset, eps)` for any nn.Module.

    import robustnas
    result = robustnas.evaluate(my_model, "fashion-mnist", eps=0.1, attacks=("pgd20", "autoattack"), n=500)
    print(result.clean_acc, result.robust_acc, result.reliable)

The same evaluation as `robustnas evaluate RUN_DIR` (evaluation.evaluate.evaluate_model: the attacks, the
sanity checks that flag gradient masking, 95% intervals, per-image results), on a model that was not trained
here. Inputs are pixels in [0,1]: the model normalizes inside. Give `out` to also write a run directory
(metrics.json, per_image.csv, report.md), which `robustnas compare` pairs with any other run on its images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from robustnas.core.errors import UserError
from robustnas.data.datasets import Dataset, load_dataset
from robustnas.evaluation.evaluate import DEFAULT_ATTACKS, evaluate_model, write_evaluation
from robustnas.training.trainer import resolve_device


@dataclass
class Evaluation:
    """What `evaluate` returns: the metrics (metrics.json's content, RobustBench-shaped) and each image's
    correctness (clean and per attack, bool tensors over the evaluated images)."""

    metrics: dict[str, Any]
    per_image: dict[str, Tensor] = field(repr=False)
    run_dir: Optional[Path] = None

    @property
    def clean_acc(self) -> float:
        return self.metrics["clean_acc"]

    @property
    def robust_acc(self) -> dict[str, float]:
        """Accuracy under each asked attack (AutoAttack's is also `autoattack_acc`)."""
        return self.metrics["robust_acc"]

    @property
    def autoattack_acc(self) -> Optional[float]:
        return self.metrics.get("autoattack_acc")

    @property
    def intervals(self) -> dict[str, Any]:
        """95% interval [low, high] of every accuracy, keyed like the accuracies."""
        return self.metrics["intervals"]

    @property
    def reliable(self) -> bool:
        """False when a sanity check failed (the robust accuracies are then not to be trusted)."""
        return self.metrics["reliable"]


def evaluate(model: nn.Module, dataset: str | Dataset | tuple[Tensor, Tensor], eps: Optional[float | str] = None,
             attacks: Sequence[str] = DEFAULT_ATTACKS, n: int = 1000, norm: str = "Linf", device: str = "auto",
             seed: int = 0, batch_size: int = 256, out: Optional[str | Path] = None, progress: bool = False,
             **options: Any) -> Evaluation:
    """Attack `model` on the first `n` test images of `dataset` (a registered name, a loaded Dataset, or
    (x, y) tensors of pixels in [0,1]) at radius `eps` (default: the dataset's usual one). `options` go to
    evaluate_model (certify, attack_options, interval, fold_bn, ...)."""
    if isinstance(dataset, tuple):
        if eps is None:
            raise UserError("give eps when the dataset is a pair of tensors")
        x, y = dataset
        meta = None
    else:
        data = load_dataset(dataset) if isinstance(dataset, str) else dataset
        x, y, meta = data.test.x, data.test.y, data.meta
        eps = data.meta.eps if eps is None else eps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"n must be a positive number of test images, got {n!r}")
    x, y = x[:n], y[:n]
    per_image: dict[str, Tensor] = {}
    log: list[str] = []
    was_training = model.training
    metrics = evaluate_model(model.eval(), x, y, eps, attacks=attacks, norm=norm, batch_size=batch_size,
                             device=resolve_device(device), seed=seed, progress=progress, dataset_meta=meta,
                             log=log, per_image=per_image, **options)
    model.train(was_training)
    if meta is not None:
        metrics["dataset"] = meta.name
    run_dir = None
    if out is not None:
        run_dir = Path(out)
        metrics = write_evaluation(run_dir, metrics, y, per_image, log)
    return Evaluation(metrics, {k: v.cpu() for k, v in per_image.items()}, run_dir)


__all__ = ["Evaluation", "evaluate"]
