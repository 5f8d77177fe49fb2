"""The Trainer on digits: adversarial training helps robustness, resume is exact, the run directory is whole."""

import json
import math

import pytest
import torch

from robustnas.robustness.attacks import accuracy, pgd, robust_accuracy
from robustnas.core.config import TrainCommand, TrainConfig, validate
from robustnas.data.datasets import load_dataset
from robustnas.nets.models import build_model
from robustnas.app.pipeline import train_run
from robustnas.nets.arch import load_model
from robustnas.training.trainer import Trainer, lr_at

EPS = 0.1


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def small_cnn(meta, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", meta.num_classes, meta.shape, meta.mean, meta.std, width=0.5)


def cfg(**kw):
    base = dict(epochs=6, batch_size=64, lr=0.05, adv="pgd", val_n=200, val_steps=5,
                attack={"eps": str(EPS), "steps": 5})
    base.update(kw)
    return TrainConfig.model_validate(base)


def pgd_acc(model, data):
    x, y = data.test.x, data.test.y
    torch.manual_seed(0)
    return robust_accuracy(model, x, y, lambda a, b: pgd(model, a, b, EPS, steps=20))


def test_pgd_training_raises_robust_accuracy_over_standard(digits):
    std = small_cnn(digits.meta)
    Trainer(std, digits, cfg(adv="none", select="last"), EPS, progress=False).fit()
    adv = small_cnn(digits.meta)
    Trainer(adv, digits, cfg(adv="pgd", select="last"), EPS, progress=False).fit()
    assert accuracy(std, digits.test.x, digits.test.y) > 0.8  # standard training learned the task
    assert pgd_acc(adv, digits) > pgd_acc(std, digits) + 0.1


@pytest.mark.parametrize("adv", ["trades", "fgsm-rs"])
def test_other_recipes_learn(digits, adv):
    model = small_cnn(digits.meta)
    result = Trainer(model, digits, cfg(adv=adv, epochs=3), EPS, progress=False).fit()
    assert all(math.isfinite(h.train_loss) for h in result.history)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert accuracy(model, digits.test.x, digits.test.y) > 0.5


class Killed(Exception):
    pass


def test_resume_equals_uninterrupted_run(digits, tmp_path):
    c = cfg(epochs=3, select="robust")
    full = small_cnn(digits.meta)
    r_full = Trainer(full, digits, c, EPS, seed=3, out_dir=tmp_path / "a", progress=False).fit()

    def kill_after_second(log):
        if log.epoch == 1:
            raise Killed

    part = small_cnn(digits.meta)
    with pytest.raises(Killed):
        Trainer(part, digits, c, EPS, seed=3, out_dir=tmp_path / "b", progress=False,
                on_epoch_end=kill_after_second).fit()
    resumed = small_cnn(digits.meta, seed=99)  # fresh process: different init, everything comes from disk
    r_res = Trainer(resumed, digits, c, EPS, seed=3, out_dir=tmp_path / "b", progress=False).fit(resume=True)

    assert [h.train_loss for h in r_res.history] == [h.train_loss for h in r_full.history]
    assert [h.val_robust for h in r_res.history] == [h.val_robust for h in r_full.history]
    assert r_res.best_epoch == r_full.best_epoch
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_lr_schedules():
    c = cfg(lr=0.1, schedule="cosine", warmup_epochs=1)
    lrs = [lr_at(c, i, 100, 10) for i in range(100)]
    assert lrs[0] == pytest.approx(0.01) and max(lrs) == pytest.approx(0.1)
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    p = cfg(lr=0.1, schedule="piecewise")
    assert lr_at(p, 0, 100, 10) == 0.1 and lr_at(p, 60, 100, 10) == pytest.approx(0.01)
    assert lr_at(p, 80, 100, 10) == pytest.approx(0.001)


def test_train_run_writes_a_complete_run_directory(tmp_path):
    cmd = validate(TrainCommand, {
        "out": str(tmp_path / "run"), "data": {"dataset": "digits", "subset": 300},
        "model": {"arch": "cnn", "width": 0.25},
        "train": {"epochs": 1, "batch_size": 64, "val_n": 50, "attack": {"steps": 2}},
        "test_n": 100, "test_pgd_steps": 3})
    m = train_run(cmd, progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "model.safetensors", "model.json", "metrics.json", "train.jsonl"):
        assert (run / name).exists(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["eps"] == "0.1" and 0 <= saved["robust_acc"]["pgd3"] <= saved["clean_acc"]
    model, _ = load_model(run)
    data = load_dataset("digits", subset=300, seed=0)
    assert accuracy(model, data.test.x[:100], data.test.y[:100]) == pytest.approx(m["clean_acc"])


def test_model_selection_defaults_to_clean_accuracy_under_standard_training():
    from robustnas.core.config import TrainConfig

    assert TrainConfig(adv="none").select == "clean"
    assert TrainConfig(adv="pgd").select == "robust"
    assert TrainConfig(adv="none", select="robust").select == "robust"
