"""`robustnas.evaluate` on a user's own nn.Module (the README's example, run as written)."""

import re
from pathlib import Path

import torch
from torch import nn

import robustnas
from robustnas.evaluation.evaluate import read_per_image
from robustnas.results.compare import load_entry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example_runs_and_writes_a_comparable_run_directory(tmp_path, monkeypatch):
    code = re.search(r"## From Python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert isinstance(result, robustnas.Evaluation)
    m = result.metrics
    assert m["n"] == 100 and m["dataset"] == "digits" and set(result.robust_acc) == {"fgsm", "pgd20"}
    # per-image results are the accuracies, image by image; an image robust to an attack is right clean
    assert int(result.per_image["clean"].sum()) == round(result.clean_acc * 100)
    for a in ("fgsm", "pgd20"):
        assert int(result.per_image[a].sum()) == round(result.robust_acc[a] * 100)
        assert not (result.per_image[a] & ~result.per_image["clean"]).any()
        lo, hi = result.intervals["robust_acc"][a]
        assert lo <= result.robust_acc[a] <= hi
    run = tmp_path / "runs" / "mine"
    table = read_per_image(run)
    assert table["pgd20"].tolist() == result.per_image["pgd20"].tolist()
    assert load_entry(run)["robust"] == result.robust_acc["pgd20"]


def test_a_trained_model_loses_accuracy_under_attack_and_keeps_its_mode(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(data.train.x), data.train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.train()
    result = robustnas.evaluate(model, data, eps=0.1, attacks=("pgd20",), n=100)
    assert result.clean_acc > 0.5 and result.robust_acc["pgd20"] < result.clean_acc
    assert model.training  # the caller's mode is given back
    same = robustnas.evaluate(model, (data.test.x, data.test.y), eps=0.1, attacks=("pgd20",), n=100)
    assert same.robust_acc == result.robust_acc and same.run_dir is None
