"""aa-rank (AutoAttack-rank, not standard AA): a cheaper subset of standard AutoAttack that can only miss
breaks, image by image, and is never reported as `autoattack`."""

import sys
from pathlib import Path

import pytest
import torch

from robustnas.robustness.attacks import (AA_RANK_TARGETS, AA_RANK_TITLE, aa_rank, build_autoattack, get_attack,
                               run_autoattack)
from robustnas.data.datasets import load_dataset
from robustnas.evaluation.evaluate import evaluate_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works whether or not tests/ is a package
from trained import fit_small_cnn  # noqa: E402

EPS = 0.1


@pytest.fixture(scope="module")
def setting():
    """A 9k-parameter CNN, PGD-5 adversarially trained on digits for 3 epochs, and 60 test images."""
    data = load_dataset("digits", seed=0)
    model = fit_small_cnn(data, adversarial=True, seed=0, epochs=3)
    return model, data.test.x[:60], data.test.y[:60]


def correct(model, x, y, x_adv):
    with torch.no_grad():
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


def test_aa_rank_only_misses_breaks_of_standard_autoattack(setting):
    model, x, y = setting
    std = run_autoattack(model, x, y, EPS, seed=0)
    rank = correct(model, x, y, aa_rank(model, x, y, EPS, seed=0))
    full_targets = run_autoattack(model, x, y, EPS, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0,
                                  n_target_classes=9)
    # with all 9 targets the ranking mode is standard AutoAttack's APGD stage, step for step
    assert full_targets.components == {k: std.components[k] for k in ("clean", "apgd-ce", "apgd-t")}
    # per image: whatever aa-rank breaks, standard AutoAttack breaks
    s = correct(model, x, y, std.x_adv)
    assert not (s & ~rank).any()
    assert rank.sum() >= s.sum()
    # the attack did something: it breaks images the clean model gets right
    assert rank.sum() < correct(model, x, y, x).sum()


def test_aa_rank_aims_at_fewer_targets(setting):
    model, _, _ = setting
    assert build_autoattack(model, EPS).apgd_targeted.n_target_classes == 9  # standard
    aa = build_autoattack(model, EPS, version="custom", attacks=["apgd-ce", "apgd-t"], num_classes=10,
                          n_target_classes=AA_RANK_TARGETS)
    assert aa.apgd_targeted.n_target_classes == AA_RANK_TARGETS < 9
    assert aa.apgd.n_restarts == aa.apgd_targeted.n_restarts == 1 and aa.apgd.n_iter == 100
    # never more targets than other classes
    assert build_autoattack(model, EPS, version="custom", attacks=["apgd-t"], num_classes=3,
                            n_target_classes=AA_RANK_TARGETS).apgd_targeted.n_target_classes == 2
    assert get_attack("aa-rank") is aa_rank


def test_aa_rank_is_never_reported_as_autoattack(setting):
    model, x, y = setting
    m = evaluate_model(model, x[:40], y[:40], EPS, attacks=["fgsm", "pgd20", "aa-rank"], progress=False,
                       sanity_n=20)
    assert "aa-rank" in m["robust_acc"]
    assert "autoattack" not in m["robust_acc"]
    assert "autoattack_acc" not in m and "autoattack" not in m
    assert m["aa_rank"]["title"] == AA_RANK_TITLE and "not standard" in AA_RANK_TITLE
    assert m["aa_rank"]["n_target_classes"] == 3
    assert set(m["aa_rank"]["components"]) == {"clean", "apgd-ce", "apgd-t"}
    assert m["hrs_robust_from"] != "autoattack"
