"""Every long command resumes exactly: killed mid-way (core/faults.py: at a file write, so between candidates,
generations, contribution rounds, members, not only at an epoch boundary) and resumed with --resume, it
ends with exactly the numbers of an uninterrupted run. The harness is the `resume_check` fixture
(tests/resume.py); the sizes are the tiny ones of the other tests, on 8x8 digits."""

from __future__ import annotations

import json

import pytest
import yaml

from resume import read_numbers

DIGITS = {"dataset": "digits", "subset": 200}
TRAIN = ["train", "--arch", "cnn", "--width", "0.25", "--dataset", "digits", "--subset", "100", "--epochs", "3",
         "--batch-size", "32", "--adv", "pgd", "--steps", "1", "--eps", "0.1", "--seed", "1"]
RECIPE = {"adv": "pgd", "epochs": 2, "batch_size": 32, "val_n": 32, "val_steps": 1,
          "attack": {"eps": "0.1", "steps": 1}}
EVALUATE = {"attacks": ["fgsm", "pgd20"], "n": 20, "certify": []}
SUPERNET = {"C": 4, "layers": 3, "batch_size": 16, "epochs": 2, "max_batches_per_epoch": 1, "val_n": 16,
            "val_steps": 1}
METHODS = {
    "darts": SUPERNET,
    "arnas": {**SUPERNET, "attack_steps": 1},
    # random projections of the Jacobian and partial channels: the random and stateful parts of DSRNA
    "dsrna": {**SUPERNET, "metric": "jacobian", "partial_channels_k": 2, "metric_n": 4, "val_metric_n": 4},
    "advrush": {**SUPERNET, "reg_warmup_epochs": 1, "h_schedule": "after-warmup", "h_ramp_epochs": 2,
                "val_curvature_n": 4},
    "random": {"n": 3, "layers": 3, "C": 4, "train_n": 64, "chunk": 1,
               "train": {"epochs": 1, "batch_size": 32, "adv": "fgsm-rs", "val_n": 32, "val_steps": 1,
                         "select": "last"}},
}
# a kill during the contribution rounds (tick "item" after each ordering, search/lrnas.py)
LRNAS = {"C": 4, "layers": 3, "partial_channels_k": 1, "batch_size": 32, "epochs": 2, "warmup_epochs": 1,
         "max_batches_per_epoch": 1, "val_n": 16, "val_steps": 1, "orderings": 2, "contrib_batch_size": 4,
         "final_C": 4, "final_layers": 3, "max_params": "5k", "budget_rule": "strict"}
# a kill between generations
TAMNAS = {"epochs": 1, "max_batches_per_epoch": 2, "batch_size": 16, "attack_steps": 1, "val_n": 20, "eval_n": 20,
          "eval_pgd_steps": 1, "recal_batches": 1, "recal_batch_size": 16, "pop_size": 4, "generations": 3}


def _config(tmp_path, cfg: dict, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _search(tmp_path, method: str, settings: dict) -> list[str]:
    cfg = _config(tmp_path, {"data": DIGITS, "search": settings})
    return ["search", "--method", method, "--eps", "0.1", "--seed", "3", "--config", cfg]


def search_numbers(out):
    return read_numbers(out, "search.jsonl", "genotype.json", "decision.json")


def run_numbers(out, *members: str):
    files = ["metrics.json", "per_image.csv", "model.safetensors", "train.jsonl", "genotype.json", "search.jsonl"]
    return read_numbers(out, *files, *(f"{m}/{f}" for m in members for f in ("metrics.json", "per_image.csv",
                                                                                "model.safetensors")))


def search_clock(search_dir, checkpoint: str = "search_checkpoint.json") -> dict:
    """The search time a search directory has recorded ({"seconds", "sessions"}): its epoch loop's checkpoint
    (training/loop.py), else random search's search_clock.json."""
    checkpoint = search_dir / checkpoint
    if checkpoint.exists():
        return json.loads(checkpoint.read_text())["elapsed"]
    return json.loads((search_dir / "search_clock.json").read_text())


class KilledClocks:
    """`after_kill` for the harness: the search time each killed run had recorded in `sub` of its directory."""

    def __init__(self, sub: str = "", checkpoint: str = "search_checkpoint.json"):
        self.sub, self.checkpoint, self.seen, self.out = sub, checkpoint, [], None

    def __call__(self, out) -> None:
        self.out = out
        self.seen.append(search_clock(out / self.sub, self.checkpoint))

    def assert_carried(self, seconds: float, sessions: int) -> None:
        """The resumed search's time covers the killed runs' (up to their last checkpoints), over `sessions`."""
        assert sessions == len(self.seen) + 1
        assert seconds >= max(c["seconds"] for c in self.seen) > 0


# ------------------------------------------------------------------------------------------ train
def test_train_resumes_exactly(resume_check, tmp_path):
    cfg = _config(tmp_path, {"train": {"val_n": 32, "val_steps": 1}, "test_n": 30, "test_pgd_steps": 2})
    killed = KilledClocks(checkpoint="checkpoint.json")  # the Trainer's epoch loop checkpoints its time too
    numbers = resume_check([*TRAIN, "--config", cfg],
                           lambda out: read_numbers(out, "metrics.json", "train.jsonl", "model.safetensors"), kind="*",
                           after_kill=killed)
    assert len(numbers["train.jsonl"]) == 3 and numbers["metrics.json"]["n"] == 30
    train = json.loads((killed.out / "metrics.json").read_text())["train"]
    killed.assert_carried(train["seconds"], train["sessions"])


# ------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("method", sorted(METHODS))
def test_search_resumes_exactly(resume_check, tmp_path, method):
    killed = KilledClocks()
    numbers = resume_check(_search(tmp_path, method, METHODS[method]), search_numbers, kind="*", after_kill=killed)
    assert len(numbers["search.jsonl"]) == METHODS[method].get("epochs", METHODS[method].get("n"))
    if method == "random":  # random search keeps its time beside its scored candidates, not in an epoch loop
        final = search_clock(killed.out)
        killed.assert_carried(final["seconds"], final["sessions"])


def test_lrnas_search_resumes_exactly_when_killed_inside_a_contribution_round(resume_check, tmp_path):
    # one round of two orderings: killed between them
    killed = KilledClocks()
    numbers = resume_check(_search(tmp_path, "lrnas", LRNAS), search_numbers, kind="item", at=(0.5,),
                           after_kill=killed)
    rounds = [r for r in numbers["search.jsonl"] if r["stage"] == "contributions"]
    assert len(rounds) == 1 and all(len(r["contributions"]["value"]) == 224 for r in rounds)
    final = search_clock(killed.out)  # the round's checkpoint, written by the resumed run
    killed.assert_carried(final["seconds"], final["sessions"])


def test_tamnas_search_resumes_exactly_when_killed_between_generations(resume_check, tmp_path):
    # of 17 writes: the second generation's checkpoint (the first one's is on disk)
    killed = KilledClocks()
    numbers = resume_check(_search(tmp_path, "tamnas", TAMNAS), search_numbers, at=(0.5,), after_kill=killed)
    assert [r["generation"] for r in numbers["search.jsonl"] if r["phase"] == "nsga2"] == [0, 1, 2]
    final = search_clock(killed.out)  # the last generation's progress, written by the resumed run
    killed.assert_carried(final["seconds"], final["sessions"])


# ------------------------------------------------------------------------------------------ run, study, benchmark
def test_run_resumes_exactly_after_two_kills(resume_check, tmp_path):
    cfg = _config(tmp_path, {"name": "tiny", "seed": 0, "data": DIGITS, "method": "darts",
                             "search": SUPERNET, "final": {"C": 4, "layers": 3},
                             "train": RECIPE, "evaluate": EVALUATE, "baseline": {"arch": "cnn"}})
    # of 43 writes: the first kill lands in the search's second epoch, the second (in the resumed run) in the
    # baseline's second epoch, after the searched network was trained and evaluated
    killed = KilledClocks("search")
    numbers = resume_check(["run", "--config", cfg], lambda out: run_numbers(out, "baseline"), at=(0.15, 0.58),
                           after_kill=killed)
    assert numbers["metrics.json"]["n"] == 20 and numbers["baseline/metrics.json"]["n"] == 20
    # the search ran in the first two sessions and was reloaded in the third: its time is theirs summed
    metrics = json.loads((killed.out / "metrics.json").read_text())
    killed.assert_carried(metrics["search_seconds"], metrics["search_sessions"])


def test_study_resumes_exactly(resume_check, tmp_path):
    cfg = _config(tmp_path, {
        "device": "cpu", "data": {"dataset": "digits", "subset": 200}, "params": "8k", "layers": 3, "random": 2,
        "published": [], "handcrafted": ["cnn"],
        "train": {"adv": "none", "epochs": 2, "batch_size": 32, "lr": 0.1, "val_n": 50, "val_steps": 1},
        "attacks": ["fgsm", "pgd20"], "eps": ["0.05", "0.2"], "n": 20, "batch_size": 20,
        "ensembles": {"feature": [], "budget": ["unmatched"], "random": [2]}})
    # of 34 writes: after the second job's training, before its attacks and result.json
    numbers = resume_check(["study", "--config", cfg], lambda out: read_numbers(
        out, "study.json", "table.csv", *(f"models/{m}/model.safetensors" for m in ("random-0", "random-1", "cnn"))))
    assert [m["name"] for m in numbers["study.json"]["models"]] == ["random-0", "random-1", "cnn"]


def test_benchmark_resumes_exactly_after_two_kills(resume_check, tmp_path):
    # two members: a searched one (random search's first draw: the search itself is cheap) and a baseline
    cfg = _config(tmp_path, {"name": "bench", "seed": 0, "data": DIGITS, "budget": "10k", "layers": 3,
                             "reduction_layers": [0, 1], "methods": {"random": {"n": 2, "select": "first"}},
                             "baselines": ["cnn"], "train": RECIPE, "evaluate": EVALUATE})
    numbers = resume_check(["benchmark", "--config", cfg],
                           lambda out: {**run_numbers(out / "random"), **read_numbers(
                               out, "compare.json", *(f"baseline-cnn/{f}" for f in (
                                   "metrics.json", "per_image.csv", "model.safetensors")))},
                           at=(0.15, 0.68))  # of 40 writes: after the first member's search, then in the
    # second member's second epoch
    assert [e["label"] for e in numbers["compare.json"]["entries"]] == ["random", "cnn (hand-crafted)"]


# ------------------------------------------------------------------------------------------ torn checkpoints
# A checkpoint is two files (training/loop.py): <name>.e<epoch>.safetensors, then <name>.json naming it. Killed
# between the two, the JSON still names the previous epoch's tensors, so --resume repeats exactly that epoch.
def test_train_resumes_exactly_when_killed_between_the_two_checkpoint_files(resume_check, tmp_path):
    cfg = _config(tmp_path, {"train": {"val_n": 32, "val_steps": 1}, "test_n": 30, "test_pgd_steps": 2})
    # writes: config.yaml, then per epoch checkpoint.safetensors, checkpoint.json: 5 is epoch 1's JSON
    resume_check([*TRAIN, "--config", cfg], lambda out: read_numbers(out, "metrics.json", "train.jsonl"), at=(5,))


def test_search_resumes_exactly_when_killed_between_the_two_checkpoint_files(resume_check, tmp_path):
    # writes: config.yaml, then per epoch search_checkpoint.safetensors, .json, search.jsonl, genotype.json
    resume_check(_search(tmp_path, "darts", SUPERNET), search_numbers, at=(7,))
