"""`score_attack`: random search's proxy scorer and TAM-NAS's subnet scorer rank candidates by PGD (default)
or by aa-rank (AutoAttack-rank, not standard AA), measured on the images the PGD score uses, on the
BatchNorm-folded copy, seeded from the candidate; the records and the report name the attack."""

import dataclasses
import json
import pickle

import pytest
import torch

from robustnas.core.errors import UserError
from robustnas.evaluation.analysis import hrs
from robustnas.evaluation.evaluate import attacked_copy
from robustnas.nets.spaces.tiny import recalibrate_bn
from robustnas.robustness.attacks import AA_RANK_TARGETS, AA_RANK_TITLE, accuracy, run_autoattack
from robustnas.search import SearchContext, build_strategy
from robustnas.search.tiny_supernet import encoding_seed

EPS = 0.05  # small enough that briefly trained digits networks keep some robust images
SEED = 0


def aa_rank_direct(model, x, y, seed):
    """aa-rank's robust accuracy, run here with pyautoattack through run_autoattack, on the folded copy."""
    return run_autoattack(attacked_copy(model), x, y, EPS, version="custom", attacks=["apgd-ce", "apgd-t"],
                          seed=seed, n_target_classes=AA_RANK_TARGETS).accuracy


def without_seconds(rec):
    return {k: v for k, v in rec.items() if k != "seconds"}


# ------------------------------------------------------------------------------------------- random search
RANDOM = {"n": 2, "layers": 1, "C": 4, "train_n": 200, "score_attack": "aa-rank",
          "train": {"epochs": 2, "batch_size": 16, "adv": "none", "lr": 0.1, "val_n": 60, "val_steps": 5,
                    "select": "last"}}


@pytest.fixture(scope="module")
def proxy(data):
    """The aa-rank proxy scorer of a random search, its second draw, and that draw's record."""
    strategy = build_strategy("random", RANDOM)
    ctx = SearchContext(data, eps=EPS, seed=SEED, progress=False)
    scorer, item = strategy.scorer(ctx), strategy.candidates(ctx)[1]
    return scorer, item, scorer(item)


def test_random_aa_rank_score_is_aa_rank_on_the_proxy_validation_images(proxy, data):
    scorer, item, rec = proxy
    trainer, _ = scorer.fit(item)  # the same training again: deterministic in the candidate's seed
    x, y = data.val.x[:60], data.val.y[:60]  # the Trainer's validation images (train.val_n)
    assert accuracy(trainer.model, x, y) == rec["val_clean"]
    direct = aa_rank_direct(trainer.model, x, y, item["seed"])
    assert rec["score_attack"] == "aa-rank"
    assert rec["val_aa_rank"] == direct
    assert rec["score"] == hrs(rec["val_clean"], direct)
    # the attack broke some images and left some: the equality above is not that of two empty results
    assert 0 < rec["val_aa_rank"] < rec["val_clean"]


def test_random_pgd_scorer_keeps_its_keys_and_aa_rank_leaves_the_pgd_number_alone(proxy):
    scorer, item, rec = proxy
    pgd_rec = dataclasses.replace(scorer, score_attack="pgd")(item)
    assert pgd_rec["score_attack"] == "pgd" and "val_aa_rank" not in pgd_rec
    assert pgd_rec["score"] == hrs(pgd_rec["val_clean"], pgd_rec["val_robust"])
    # val_clean and val_robust (the Trainer's PGD) are the same numbers whichever attack scores
    assert (pgd_rec["val_clean"], pgd_rec["val_robust"]) == (rec["val_clean"], rec["val_robust"])


def test_random_aa_rank_scorer_is_deterministic_and_picklable(proxy):
    scorer, item, rec = proxy
    again = pickle.loads(pickle.dumps(scorer))
    assert again.score_attack == "aa-rank"
    assert without_seconds(again(item)) == without_seconds(rec)


def test_random_search_resumes_only_records_scored_by_its_own_attack(data, tmp_path):
    """search.jsonl written before score_attack existed (records name no attack) holds PGD scores: a pgd
    search resumes it, an aa-rank search refuses it instead of ranking PGD and aa-rank numbers together."""
    settings = {**RANDOM, "n": 1}
    ctx = SearchContext(data, eps=EPS, seed=SEED, out_dir=tmp_path, progress=False)
    item = build_strategy("random", settings).candidates(ctx)[0]
    old = {"index": 0, "genotype": item["genotype"], "C": item["C"], "layers": 1, "params": 1, "val_clean": 0.5,
           "val_robust": 0.25, "score": hrs(0.5, 0.25), "seconds": 1.0}
    (tmp_path / "search.jsonl").write_text(json.dumps(old) + "\n")
    with pytest.raises(UserError, match="scored by pgd, not aa-rank"):
        build_strategy("random", settings).search(ctx, resume=True)
    result = build_strategy("random", {**settings, "score_attack": "pgd"}).search(ctx, resume=True)
    assert result.history == [old]  # nothing left to train


# ------------------------------------------------------------------------------------------- TAM-NAS
TAMNAS = {"eval_n": 40, "recal_batches": 2, "recal_batch_size": 32, "adv": "none", "score_attack": "aa-rank"}


@pytest.fixture(scope="module")
def subnet(data):
    """A TAM-NAS strategy set up for aa-rank scoring whose smallest subnet was trained clean for 60 steps
    (an untrained subnet is at chance, with no robust image to tell attacks apart), its scorer, the
    subnet's encoding and its score."""
    strategy = build_strategy("tamnas", TAMNAS)
    strategy.setup(SearchContext(data, eps=EPS, seed=SEED, progress=False))
    enc = strategy.space.smallest()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(data.train), (32,), generator=g)
        strategy.trainer.train_step(data.train.x[idx], data.train.y[idx], [enc], 0.1, 0.0)
    scorer = strategy.scorer()
    return strategy, scorer, enc, scorer(enc)


def test_tamnas_aa_rank_error_is_aa_rank_on_the_recalibrated_subnet(subnet, data):
    strategy, scorer, enc, rec = subnet
    net = recalibrate_bn(strategy.net.extract(enc), strategy.recal_x.split(TAMNAS["recal_batch_size"]))
    x, y = data.val.x[:40], data.val.y[:40]  # the first eval_n validation images
    assert accuracy(net, x, y) == 1.0 - rec["clean_err"]
    direct = aa_rank_direct(net, x, y, encoding_seed(SEED, enc))
    assert rec["score_attack"] == "aa-rank" and "pgd_err" not in rec
    assert rec["aa_rank_err"] == 1.0 - direct
    assert rec["clean_err"] < rec["aa_rank_err"] < 1.0  # some images broken, some left
    pgd_rec = strategy.scorer(attack="pgd")(enc)
    assert pgd_rec["score_attack"] == "pgd" and "aa_rank_err" not in pgd_rec
    assert pgd_rec["clean_err"] == rec["clean_err"]  # the attack changes the robust error only


def test_tamnas_aa_rank_scorer_is_deterministic_and_picklable(subnet):
    _, scorer, enc, rec = subnet
    assert scorer(enc) == rec
    assert pickle.loads(pickle.dumps(scorer))(enc) == rec


@pytest.mark.parametrize("attack", ["pgd", "aa-rank"])
def test_tamnas_search_names_the_scoring_attack_in_front_and_report(data, tmp_path, attack):
    settings = {**TAMNAS, "score_attack": attack, "eval_n": 16, "epochs": 1, "max_batches_per_epoch": 1,
                "batch_size": 16, "val_n": 0, "pop_size": 2, "generations": 1, "max_params": "20k"}
    strategy = build_strategy("tamnas", settings)
    result = strategy.search(SearchContext(data, eps=EPS, seed=SEED, out_dir=tmp_path, progress=False))
    key, other = ("pgd_err", "aa_rank_err") if attack == "pgd" else ("aa_rank_err", "pgd_err")
    front = result.extra["front"]
    assert front and all(s["score_attack"] == attack and key in s and other not in s for s in front)
    assert result.extra["score_attack"] == attack
    assert result.extra["objectives"] == ["clean_err", key, "size"]
    lines = strategy.report_sections(result, tmp_path)
    header = next(line for line in lines if line.startswith("| params | clean err"))
    if attack == "pgd":
        assert header == "| params | clean err | PGD err |"
        assert not any("aa-rank" in line or "AutoAttack" in line for line in lines)
    else:
        assert header == "| params | clean err | aa-rank err |"
        assert any(AA_RANK_TITLE in line for line in lines)
        assert not any("PGD" in line for line in lines)


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("method", ["random", "tamnas"])
@pytest.mark.parametrize("name", ["autoattack", "pgd20", "AA-RANK"])
def test_an_unknown_score_attack_is_refused(method, name):
    with pytest.raises(UserError, match="score_attack"):
        build_strategy(method, {"score_attack": name})
    assert build_strategy(method, {"score_attack": "aa-rank"}).cfg.score_attack == "aa-rank"
    assert build_strategy(method, {}).cfg.score_attack == "pgd"
