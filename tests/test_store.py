"""The results archive: filters, the Pareto query, concurrent writer processes, a writer killed mid-write,
and the `robustnas archive` command."""

import signal
import sqlite3
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from robustnas.app.cli import app
from robustnas.core.errors import UserError
from robustnas.results.store import SCHEMA_VERSION, Archive, candidate_key, default_path, metric_value

# a writer process: opens the archive, says "ready", waits for "go", then writes (see the tests)
WRITER = r"""
import sys
from robustnas.results.store import Archive
path, tag, n, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
archive = Archive(path)
print("ready", flush=True)
sys.stdin.readline()
i = 0
while n < 0 or i < n:
    archive.add_candidates([{"name": f"{tag}-{i}", "key": f"{tag}-{i}-{j}", "dataset": "mnist", "eps": "0.3",
                             "params": j, "metrics": {"clean_acc": 0.5, "pad": "x" * 2000}} for j in range(batch)])
    i += 1
    print(i, flush=True)
"""


def start_writer(path, tag, n, batch=1):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(n), str(batch)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def integrity(path) -> str:
    con = sqlite3.connect(str(path))
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


# --------------------------------------------------------------------------- hand-made rows
def add(archive, name, value=None, params=None, dataset="mnist", eps="0.3", pgd20=None, run_id=None, space="tiny"):
    metrics = {"clean_acc": 0.9, "robust_acc": {}}
    if value is not None:
        metrics["autoattack_acc"] = value
    if pgd20 is not None:
        metrics["robust_acc"]["pgd20"] = pgd20
    return archive.add_candidate(name=name, key=name, dataset=dataset, eps=eps, norm="Linf", params=params,
                                 metrics=metrics, run_id=run_id, space=space)


@pytest.fixture
def archive(tmp_path):
    with Archive(tmp_path / "a.sqlite") as a:
        yield a


def test_pareto_front_of_hand_made_rows(archive):
    add(archive, "A", 0.50, 100)
    add(archive, "B", 0.60, 200)
    add(archive, "C", 0.55, 300)                 # dominated by B (less robust, bigger)
    add(archive, "D", 0.40, 50)
    add(archive, "E", None, 150, pgd20=0.58)      # no AutoAttack: its PGD-20 figure stands in
    add(archive, "F", 0.30, 120, pgd20=0.99)      # AutoAttack present: its PGD-20 is ignored
    add(archive, "G", 0.70, 500, dataset="cifar10", eps="8/255")  # another dataset: not on mnist's front
    add(archive, "H", None, 40)                   # no robust figure at all: not on any front
    front = archive.pareto(dataset="mnist", eps="0.3")
    assert [r["name"] for r in front] == ["D", "A", "E", "B"]
    assert [r["value_from"] for r in front] == ["autoattack_acc", "autoattack_acc", "pgd20", "autoattack_acc"]
    values = [r["value"] for r in front]
    assert values == sorted(values) and [r["params"] for r in front] == sorted(r["params"] for r in front)
    # every archived mnist row with a figure is on the front or beaten on both axes by a front member
    for r in archive.candidates(dataset="mnist"):
        v = metric_value(r["metrics"], "autoattack_acc", ("pgd20",))
        if v is not None and r["name"] not in {f["name"] for f in front}:
            assert any(f["value"] >= v[0] and f["params"] <= r["params"] for f in front)
    assert [r["name"] for r in archive.pareto(dataset="mnist", eps="0.3", metric="pgd20", fallback=())] == ["F"]
    with pytest.raises(UserError, match="--dataset and --eps"):
        archive.pareto()  # two datasets: no single front
    assert [r["name"] for r in archive.pareto(dataset="cifar10", eps="8/255")] == ["G"]


def test_filters(archive):
    search = archive.add_run("search", method="tamnas", config={"pop_size": 4}, run_dir="runs/x")
    train = archive.add_run("train", method="pgd")
    add(archive, "a", 0.5, 100, run_id=search)
    add(archive, "b", 0.5, 300, run_id=search, space="darts")
    add(archive, "c", 0.5, 200, run_id=train, dataset="cifar10", eps=8 / 255)
    names = lambda **f: [r["name"] for r in archive.candidates(**f)]  # noqa: E731
    assert names() == ["a", "b", "c"]
    assert names(method="tamnas") == ["a", "b"] and names(space="darts") == ["b"]
    assert names(eps="8/255") == ["c"] == names(eps=0.0313725490196) and names(eps="0.1") == []
    assert names(min_params=150) == ["b", "c"] and names(max_params=200) == ["a", "c"]
    assert names(dataset="mnist", min_params=101, max_params=299) == []
    row = archive.candidates(dataset="cifar10")[0]
    assert row["eps"] == "8/255" and row["method"] == "pgd" and row["run_kind"] == "train"
    assert archive.candidates(method="tamnas")[0]["run_dir"] == "runs/x"
    with pytest.raises(ValueError):
        archive.add_run("dance")


def test_keys_are_unique(archive):
    key = candidate_key("tiny", [1, 2, 3], "mnist", "0.3")
    assert key == candidate_key("tiny", [1, 2, 3], "mnist", "0.3") != candidate_key("tiny", [1, 2, 4], "mnist", "0.3")
    assert archive.add_candidate(key=key, name="first", params=10) is not None
    assert archive.add_candidate(key=key, name="second", params=20) is None  # never stored twice
    assert [(r["key"], r["name"], r["params"]) for r in archive.candidates()] == [(key, "first", 10)]


def test_add_evaluation_reads_metrics_json(archive):
    metrics = {"dataset": "fashion-mnist", "eps": "0.1", "norm": "Linf", "clean_acc": 0.8,
               "robust_acc": {"pgd20": 0.6, "autoattack": 0.55}, "autoattack_acc": 0.55, "hrs": 0.65,
               "params": 12345, "flops": 67890, "robustness_curve": [[0, 0.8]], "sanity": {}}
    archive.add_evaluation(metrics, name="net", space="tiny", genotype={"space": "tiny", "layers": []},
                           recipe={"adv": "pgd"})
    row = archive.candidates(dataset="fashion-mnist", eps=0.1)[0]
    assert (row["params"], row["flops"], row["norm"]) == (12345, 67890, "Linf")
    assert "robustness_curve" not in row["metrics"] and row["metrics"]["autoattack_acc"] == 0.55
    assert row["genotype"] == {"space": "tiny", "layers": []} and row["recipe"] == {"adv": "pgd"}


def test_bad_files_are_user_errors(tmp_path, monkeypatch):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="not a usable robustnas archive"):
        Archive(junk)
    with pytest.raises(UserError, match="no results archive"):
        Archive(tmp_path / "missing.sqlite", create=False)
    newer = tmp_path / "newer.sqlite"
    Archive(newer).close()
    con = sqlite3.connect(str(newer))
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(UserError, match="newer robustnas"):
        Archive(newer)
    monkeypatch.setenv("ROBUSTNAS_ARCHIVE", str(tmp_path / "env.sqlite"))
    assert default_path() == tmp_path / "env.sqlite"
    monkeypatch.delenv("ROBUSTNAS_ARCHIVE")
    assert default_path().name == "robustnas-archive.sqlite"


# --------------------------------------------------------------------------- several processes
def test_two_concurrent_writers_both_succeed(tmp_path):
    path = tmp_path / "shared.sqlite"  # created by the writers themselves, at the same time
    n = 150
    procs = [start_writer(path, tag, n) for tag in ("p", "q")]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, _ = p.communicate()
        assert p.returncode == 0
        assert out.split()[-1] == str(n)
    with Archive(path) as archive:
        names = [r["name"] for r in archive.candidates()]
    assert sorted(names) == sorted(f"{t}-{i}" for t in "pq" for i in range(n))
    assert integrity(path) == "ok"


def test_writer_killed_mid_write_leaves_a_consistent_archive(tmp_path):
    path = tmp_path / "killed.sqlite"
    batch = 40
    proc = start_writer(path, "k", -1, batch)  # writes batches of 40 rows, one transaction each, forever
    proc.stdin.write("go\n")
    proc.stdin.flush()
    for _ in range(5):
        assert proc.stdout.readline().strip()  # 5 transactions committed, more under way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert integrity(path) == "ok"
    with Archive(path) as archive:
        rows = archive.candidates()
        per_batch = {}
        for r in rows:
            per_batch[r["name"]] = per_batch.get(r["name"], 0) + 1
            assert r["metrics"]["pad"] == "x" * 2000  # no row half-written
        assert len(per_batch) >= 5 and set(per_batch.values()) == {batch}  # whole transactions only
        archive.add_candidate(name="after", key="after")  # still writable
    assert integrity(path) == "ok"


# --------------------------------------------------------------------------- the command
def test_cli_archive_lists_and_fronts(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich would shorten the names in a narrow table
    db = tmp_path / "cli.sqlite"
    with Archive(db) as archive:
        run = archive.add_run("search", method="tamnas")
        add(archive, "small", 0.40, 50, run_id=run)
        add(archive, "big", 0.60, 200, run_id=run)
        add(archive, "worse", 0.30, 300, run_id=run)
        add(archive, "other", 0.70, 90, dataset="cifar10", eps="8/255")
    runner = CliRunner()
    result = runner.invoke(app, ["archive", "--db", str(db)])
    assert result.exit_code == 0, result.output
    for name in ("small", "big", "worse", "other"):
        assert name in result.output
    result = runner.invoke(app, ["archive", "--db", str(db), "--pareto", "--dataset", "mnist", "--eps", "0.3"])
    assert result.exit_code == 0, result.output
    assert "small" in result.output and "big" in result.output and "worse" not in result.output
    assert "other" not in result.output
    result = runner.invoke(app, ["archive", "--db", str(db), "--method", "tamnas"])
    assert "worse" in result.output and "other" not in result.output
    result = runner.invoke(app, ["archive", "--db", str(db), "--pareto"])
    assert result.exit_code == 2 and "--dataset" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["archive", "--db", str(tmp_path / "none.sqlite")])
    assert result.exit_code == 2 and "no results archive" in result.output
    assert not (tmp_path / "none.sqlite").exists()
