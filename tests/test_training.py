"""The Trainer on digits: adversarial training helps robustness, resume is exact (after an epoch, or killed
mid-epoch by the fault hook), the run directory is whole; the epoch scaffold (training/loop.py) itself."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from robustnas.robustness.attacks import accuracy, pgd, robust_accuracy
from robustnas.core.config import TrainCommand, TrainConfig, validate
from robustnas.data.datasets import load_dataset
from robustnas.nets.models import build_model
from robustnas.app.cli import app
from robustnas.app.pipeline import train_run
from robustnas.core.errors import UserError
from robustnas.nets.arch import load_model
from robustnas.training.loop import EpochLoop
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


# ------------------------------------------------------------------------------------------ the epoch scaffold
def _toy_loop(out, init=100, width=4, stop_after=None, identity=None):
    """A linear model on fixed random data through EpochLoop: 4 SGD steps an epoch, each batch and a noise
    term drawn from the loop's per-epoch seeding; val = a score that peaks at epoch 1 (keep-best)."""
    torch.manual_seed(init)  # the initial weights; the loop reseeds every epoch
    model = torch.nn.Linear(width, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, width, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    loop = EpochLoop(out, "ck", 0, 4, 4, identity or {"config": {"lr": 0.1}}, {"model": model, "opt": opt},
                     select=lambda r: r["val"], log="toy.jsonl")

    def one_epoch(epoch, g):
        order = torch.randperm(32, generator=g)
        for b in range(4):
            idx = order[b * 8:(b + 1) * 8]
            loss = torch.nn.functional.cross_entropy(model(x[idx] + 0.1 * torch.randn(8, width)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loop.step_done()
        return {"epoch": epoch, "loss": loss.item(), "val": -abs(epoch - 1)}

    def after_epoch(record):
        if record["epoch"] == stop_after:
            raise KeyboardInterrupt

    return loop, model, lambda: loop.run(one_epoch, after_epoch)


def test_epoch_loop_resumes_bit_identically_keeps_the_best_and_refuses_another_run(tmp_path):
    full, full_model, run = _toy_loop(tmp_path / "full")
    run()
    assert full.best_epoch == 1 and [h["epoch"] for h in full.history] == [0, 1, 2, 3]

    cut, _, run = _toy_loop(tmp_path / "cut", stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        run()
    # the checkpoint is the JSON and the one tensors file it names; a tensors file a killed save left is not read
    ck = json.loads((tmp_path / "cut" / "ck.json").read_text())
    assert ck["epoch"] == 1 and ck["tensors"] == "ck.e1.safetensors"
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["ck.e1.safetensors", "ck.json", "toy.jsonl"]
    (tmp_path / "cut" / "ck.e2.safetensors").write_bytes(b"half a file")

    resumed, resumed_model, run = _toy_loop(tmp_path / "cut", init=7)  # weights, momentum: all from disk
    assert resumed.resume() and resumed.start_epoch == 2
    run()
    assert resumed.history == full.history and resumed.best_epoch == 1
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["ck.e3.safetensors", "ck.json", "toy.jsonl"]
    lines = (tmp_path / "cut" / "toy.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == full.history

    # keep-best: the weights after epoch 1, not the last ones
    resumed.restore_best()
    best = load_file(str(tmp_path / "cut" / "ck.e3.safetensors"))
    assert torch.equal(resumed_model.weight, best["best.weight"])
    assert not torch.equal(resumed_model.weight, full_model.weight)

    with pytest.raises(UserError, match=r"other settings \(config.lr\)"):
        _toy_loop(tmp_path / "cut", identity={"config": {"lr": 0.2}})[0].resume()
    with pytest.raises(UserError, match="another network"):
        _toy_loop(tmp_path / "cut", width=5)[0].resume()
    assert not _toy_loop(tmp_path / "none")[0].resume()  # nothing to resume: a fresh start


def test_a_checkpoint_of_the_old_trainer_format_resumes_exactly(digits, tmp_path):
    """Before issue 15 the Trainer wrote checkpoint.json {"epoch", "result"} + checkpoint.safetensors with
    `opt.<i>` momentum buffers; such a run continues and ends as an uninterrupted one."""
    c = cfg(epochs=3, select="robust", val_n=100, val_steps=2, attack={"eps": str(EPS), "steps": 2})
    full = small_cnn(digits.meta)
    r_full = Trainer(full, digits, c, EPS, seed=3, progress=False).fit()

    def stop(log):
        if log.epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        Trainer(small_cnn(digits.meta), digits, c, EPS, seed=3, out_dir=tmp_path, progress=False,
                on_epoch_end=stop).fit()
    # rewrite the checkpoint as the old Trainer wrote it
    ck = json.loads((tmp_path / "checkpoint.json").read_text())
    tensors = load_file(str(tmp_path / ck["tensors"]))
    old = {k.removesuffix(".momentum_buffer"): v for k, v in tensors.items()}
    save_file(old, str(tmp_path / "checkpoint.safetensors"))
    (tmp_path / ck["tensors"]).unlink()
    best = next(h for h in ck["history"] if h["epoch"] == ck["best_epoch"])
    (tmp_path / "checkpoint.json").write_text(json.dumps({"epoch": 1, "result": {
        "history": ck["history"], "best_epoch": best["epoch"], "best_val_clean": best["val_clean"],
        "best_val_robust": best["val_robust"]}}))

    resumed = small_cnn(digits.meta, seed=99)
    r_res = Trainer(resumed, digits, c, EPS, seed=3, out_dir=tmp_path, progress=False).fit(resume=True)
    assert [h.train_loss for h in r_res.history] == [h.train_loss for h in r_full.history]
    assert r_res.best_epoch == r_full.best_epoch
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert "format" in json.loads((tmp_path / "checkpoint.json").read_text())  # now in the current format
    assert not (tmp_path / "checkpoint.safetensors").exists()


# ------------------------------------------------------------------------------------------ killed mid-epoch
ROOT = Path(__file__).resolve().parents[1]


def _crash(args, at, cwd):
    """`robustnas <args>` in a fresh process, killed by the fault hook at `at` (core/faults.py)."""
    env = {**os.environ, "ROBUSTNAS_CRASH_AT": at, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "robustnas.app.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 75, p.stdout + p.stderr  # os._exit(75): killed where asked, not finished or failed


def _cli(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_a_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    # 200 training images, batches of 50: 4 steps an epoch; step 6 is in the middle of the second epoch
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "data": {"dataset": "digits", "subset": 200}, "model": {"arch": "cnn", "width": 0.25},
        "train": {"epochs": 3, "batch_size": 50, "val_n": 40, "val_steps": 2, "attack": {"steps": 2}},
        "test_n": 60, "test_pgd_steps": 3}))
    args = ["train", "--config", str(tmp_path / "c.yaml"), "--no-progress", "--out"]
    _cli(args + [str(tmp_path / "full")])
    _crash(args + [str(tmp_path / "cut")], "step:6", tmp_path)
    ck = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert ck["epoch"] == 0 and not (tmp_path / "cut" / "metrics.json").exists()
    _cli(args + [str(tmp_path / "cut"), "--resume"])

    full, cut = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "cut")]
    assert [m["train"].pop("sessions") for m in metrics] == [1, 2]  # the resumed training's time spans both
    for m in metrics:
        m["train"].pop("seconds")
    assert metrics[0] == metrics[1]
    logs = [[{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
             for line in (tmp_path / d / "train.jsonl").read_text().splitlines()] for d in ("full", "cut")]
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_a_darts_search_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    # 2 bilevel steps an epoch; step 3 is in the middle of the second epoch
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "method": "darts", "data": {"dataset": "digits", "subset": 200},
        "search": {"C": 4, "layers": 3, "epochs": 2, "batch_size": 16, "max_batches_per_epoch": 2,
                   "val_n": 10, "val_steps": 2}}))
    args = ["search", "--config", str(tmp_path / "s.yaml"), "--no-progress", "--out"]
    _cli(args + [str(tmp_path / "full")])
    _crash(args + [str(tmp_path / "cut")], "step:3", tmp_path)
    assert json.loads((tmp_path / "cut" / "search_checkpoint.json").read_text())["epoch"] == 0
    _cli(args + [str(tmp_path / "cut"), "--resume"])

    assert (tmp_path / "cut" / "genotype.json").read_text() == (tmp_path / "full" / "genotype.json").read_text()
    logs = [[{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
             for line in (tmp_path / d / "search.jsonl").read_text().splitlines()] for d in ("full", "cut")]
    assert logs[0] == logs[1] and len(logs[0]) == 2  # the alphas (softmax) of every epoch among them
    raw = []
    for d in ("full", "cut"):
        ck = json.loads((tmp_path / d / "search_checkpoint.json").read_text())
        raw.append({k: v for k, v in load_file(str(tmp_path / d / ck["tensors"])).items() if ".alpha" in k})
    assert raw[0] and raw[0].keys() == raw[1].keys() and all(torch.equal(raw[0][k], raw[1][k]) for k in raw[0])
