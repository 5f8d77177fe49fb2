"""Dataset registry: each loader on tiny fixtures in the official formats, splits, errors, downloads."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import socket
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from robustnas.data import datasets as data
from robustnas.data.datasets import UserError, load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works whether or not tests/ is a package
from fixtures_data import (IDX_NAMES, idx_bytes, write_cifar10, write_cifar100, write_idx,  # noqa: E402
                           write_mnist_like, write_svhn)

WRITERS = {"mnist": write_mnist_like, "fashion-mnist": write_mnist_like, "cifar10": write_cifar10,
           "cifar100": write_cifar100, "svhn": write_svhn}
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the user's data folders, cache or the system datasets unless it asks for them."""
    monkeypatch.delenv("ROBUSTNAS_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", tmp_path / "system")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def match_rows(split, x, y, scale=255):
    """Indices of split's images in the source arrays; checks pixels and labels came through exactly."""
    rows = {x[i].tobytes(): i for i in range(len(x))}
    got = (split.x * scale).round().to(torch.uint8).numpy()
    idx = np.array([rows[g.tobytes()] for g in got], dtype=np.int64)
    assert torch.equal(split.x, torch.from_numpy(x[idx]).float() / scale)
    assert torch.equal(split.y, torch.from_numpy(y[idx]))
    return idx


# --------------------------------------------------------------------------------------------------
# loaders


@pytest.mark.parametrize("name", list(WRITERS))
def test_loader_gives_back_the_fixture_exactly(tmp_path, name):
    x_tr, y_tr, x_te, y_te = WRITERS[name](tmp_path / "d")
    d = load_dataset(name, data_dir=tmp_path / "d", val_size=0.2, seed=3)
    spec = data.DATASETS[name]
    assert d.meta.name == name and d.meta.shape == spec.shape and d.meta.num_classes == len(d.meta.classes)
    for split in (d.train, d.val, d.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == spec.shape
        assert 0.0 <= split.x.min() and split.x.max() <= 1.0
    seen = torch.cat([d.train.x.flatten(), d.val.x.flatten()])
    assert seen.min() == 0.0 and seen.max() == 1.0  # pixel 0 -> 0.0 and 255 -> 1.0
    # test split: all of it, in file order; train + val: a partition of the official train split
    assert torch.equal(d.test.x, torch.from_numpy(x_te).float() / 255)
    assert torch.equal(d.test.y, torch.from_numpy(y_te))
    n_val = round(0.2 * len(x_tr))
    assert len(d.val) == n_val and len(d.train) == len(x_tr) - n_val
    tr, va = match_rows(d.train, x_tr, y_tr), match_rows(d.val, x_tr, y_tr)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(x_tr)))
    assert Path(d.meta.source).is_dir()


def test_idx_plain_and_gzipped_read_the_same(tmp_path):
    write_mnist_like(tmp_path / "gz", gz=True, seed=1)
    write_mnist_like(tmp_path / "raw", gz=False, seed=1)
    a = load_dataset("mnist", data_dir=tmp_path / "gz")
    b = load_dataset("mnist", data_dir=tmp_path / "raw")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


def test_svhn_label_10_is_digit_0(tmp_path):
    x_tr, y_tr, _, _ = write_svhn(tmp_path)
    from scipy.io import loadmat
    assert 10 in loadmat(tmp_path / "train_32x32.mat")["y"] and 0 not in loadmat(tmp_path / "train_32x32.mat")["y"]
    d = load_dataset("svhn", data_dir=tmp_path, val_size=0)
    assert len(d.val) == 0
    assert set(d.train.y.tolist()) == set(range(10))
    match_rows(d.train, x_tr, y_tr)  # label 0 comes from a stored 10, images in NCHW orientation


def test_digits_from_scikit_learn():
    from sklearn.datasets import load_digits

    d = load_dataset("digits", seed=0)
    assert d.meta.shape == (1, 8, 8) and d.meta.source == "scikit-learn (embedded)"
    n = len(d.train) + len(d.val) + len(d.test)
    assert n == 1797 and len(d.test) == 360
    assert torch.equal((d.train.x * 16).round(), d.train.x * 16)  # values are k/16
    # every image is used exactly once across the three splits
    ours = torch.cat([d.train.x, d.val.x, d.test.x]).reshape(n, -1) * 16
    ref = torch.from_numpy(load_digits().data).float()
    assert sorted(map(tuple, ours.int().tolist())) == sorted(map(tuple, ref.int().tolist()))
    # stratified test split: 10 classes of about 36 images each
    counts = torch.bincount(d.test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # the test split does not depend on the run's seed
    assert torch.equal(load_dataset("digits", seed=5).test.x, d.test.x)


def test_mean_std_are_those_of_the_train_split(tmp_path):
    write_cifar10(tmp_path)
    d = load_dataset("cifar10", data_dir=tmp_path, seed=1)
    x = (d.train.x.double() * 255).round() / 255  # the exact pixel values, in float64
    assert d.meta.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert d.meta.std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)


# --------------------------------------------------------------------------------------------------
# splits


def test_seed_determines_the_split(tmp_path):
    write_mnist_like(tmp_path, n_train=80)
    a, b = (load_dataset("mnist", data_dir=tmp_path, seed=7) for _ in range(2))
    c = load_dataset("mnist", data_dir=tmp_path, seed=8)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    assert torch.equal(a.test.x, c.test.x)


@pytest.mark.parametrize("val_size,expected", [(0.25, 15), (7, 7), (7.0, 7), (0, 0), (0.0, 0)])
def test_val_size_as_fraction_or_count(tmp_path, val_size, expected):
    write_mnist_like(tmp_path, n_train=60)
    d = load_dataset("mnist", data_dir=tmp_path, val_size=val_size)
    assert len(d.val) == expected and len(d.train) == 60 - expected


@pytest.mark.parametrize("val_size", [-0.1, 1.5, 60, 100, True, "0.1", None])
def test_bad_val_size_is_a_user_error(tmp_path, val_size):
    write_mnist_like(tmp_path, n_train=60)
    with pytest.raises(UserError, match="val_size"):
        load_dataset("mnist", data_dir=tmp_path, val_size=val_size)


def test_subset_keeps_n_images_from_the_same_split(tmp_path):
    x_tr, y_tr, x_te, y_te = write_mnist_like(tmp_path, n_train=100, n_test=30)
    full = load_dataset("mnist", data_dir=tmp_path, val_size=0.3, seed=4)
    small = load_dataset("mnist", data_dir=tmp_path, val_size=0.3, seed=4, subset=20)
    assert (len(small.train), len(small.val), len(small.test)) == (20, 20, 20)
    assert set(match_rows(small.train, x_tr, y_tr)) <= set(match_rows(full.train, x_tr, y_tr))
    assert set(match_rows(small.val, x_tr, y_tr)) <= set(match_rows(full.val, x_tr, y_tr))
    match_rows(small.test, x_te, y_te)
    other_seed = load_dataset("mnist", data_dir=tmp_path, val_size=0.3, seed=5, subset=20)
    assert torch.equal(other_seed.test.x, small.test.x) and not torch.equal(other_seed.train.x, small.train.x)
    tiny_val = load_dataset("mnist", data_dir=tmp_path, val_size=5, subset=20)
    assert len(tiny_val.val) == 5
    everything = load_dataset("mnist", data_dir=tmp_path, subset=10_000)
    assert len(everything.train) == 90 and len(everything.test) == 30


def test_bad_seed_is_a_user_error():
    with pytest.raises(UserError, match="seed"):
        load_dataset("digits", seed=-1)


@pytest.mark.parametrize("subset", [0, -3, 2.5, True])
def test_bad_subset_is_a_user_error(tmp_path, subset):
    write_mnist_like(tmp_path)
    with pytest.raises(UserError, match="subset"):
        load_dataset("mnist", data_dir=tmp_path, subset=subset)


# --------------------------------------------------------------------------------------------------
# finding files, missing data


def test_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTNAS_DATA", str(tmp_path / "env"))
    paths = data.search_paths("fashion-mnist", data_dir=tmp_path / "mine")
    assert paths == [tmp_path / "mine" / "fashion-mnist", tmp_path / "mine", tmp_path / "env" / "fashion-mnist",
                     tmp_path / "env", tmp_path / "system" / "fashion-mnist",
                     tmp_path / "cache" / "robustnas" / "fashion-mnist"]
    # the first place that has the files wins
    write_mnist_like(tmp_path / "system" / "mnist", seed=1)
    assert data.locate("mnist") == tmp_path / "system" / "mnist"
    write_mnist_like(tmp_path / "env" / "mnist", seed=2)
    assert data.locate("mnist") == tmp_path / "env" / "mnist"
    write_mnist_like(tmp_path / "mine", seed=3)
    assert data.locate("mnist", data_dir=tmp_path / "mine") == tmp_path / "mine"
    assert load_dataset("mnist").meta.source == str(tmp_path / "env" / "mnist")


def test_torchvision_layout_is_found(tmp_path):
    write_mnist_like(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert data.locate("fashion-mnist", data_dir=tmp_path) == tmp_path / "FashionMNIST" / "raw"


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"])
def test_missing_dataset_names_every_place_searched(tmp_path, monkeypatch, name):
    monkeypatch.setenv("ROBUSTNAS_DATA", str(tmp_path / "env"))
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError) as err:
        load_dataset(name, data_dir=tmp_path / "mine")
    msg = str(err.value)
    assert "\n" not in msg and name in msg
    for p in data.search_paths(name, tmp_path / "mine"):
        assert str(p) in msg
    assert data.DATASETS[name].how_to_get in msg


def test_nonexistent_data_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("mnist", data_dir=tmp_path / "typo")


def test_unknown_name_and_aliases():
    with pytest.raises(UserError, match="unknown dataset 'imagenet'.*cifar10"):
        load_dataset("imagenet")
    assert data.get_spec("FMNIST").name == "fashion-mnist" and data.get_spec("cifar-10").name == "cifar10"


def test_dataset_status(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTNAS_DATA", str(tmp_path))
    write_cifar10(tmp_path / "cifar10")
    rows = {r["name"]: r for r in data.dataset_status()}
    assert set(rows) == set(data.DATASETS)
    assert rows["digits"]["found"] and rows["cifar10"]["found"]
    assert rows["cifar10"]["where"] == str(tmp_path / "cifar10" / "cifar-10-batches-py")
    assert not rows["mnist"]["found"] and rows["mnist"]["where"] is None and "download" in rows["mnist"]["how"]
    assert rows["svhn"]["train"] == 73257 and rows["svhn"]["test"] == 26032


# --------------------------------------------------------------------------------------------------
# corrupt files


def _corrupt(folder: Path, name: str, content: bytes) -> Path:
    for p in folder.glob(name + "*"):
        p.unlink()
    (folder / name).write_bytes(content)
    return folder / name


@pytest.mark.parametrize("case", ["truncated", "trailing", "bad_magic", "bad_gzip", "empty", "header_only"])
def test_corrupt_idx_is_a_user_error_naming_the_file(tmp_path, case):
    x_tr, *_ = write_mnist_like(tmp_path, gz=False)
    good = idx_bytes(x_tr[:, 0])
    content = {"truncated": good[:-100], "trailing": good + b"\0", "bad_magic": b"\x01" + good[1:],
               "bad_gzip": gzip.compress(good)[:500], "empty": b"", "header_only": good[:6]}[case]
    bad = _corrupt(tmp_path, "train-images-idx3-ubyte", content)
    with pytest.raises(UserError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_idx_labels_that_do_not_fit_are_user_errors(tmp_path):
    write_mnist_like(tmp_path, gz=False, n_train=60)
    _corrupt(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.zeros(59, np.uint8)))
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.*60"):
        load_dataset("mnist", data_dir=tmp_path)
    _corrupt(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.full(60, 12, np.uint8)))
    with pytest.raises(UserError, match="0..9"):
        load_dataset("mnist", data_dir=tmp_path)
    _corrupt(tmp_path, "train-images-idx3-ubyte", idx_bytes(np.zeros((60, 27, 28), np.uint8)))
    with pytest.raises(UserError, match="28x28"):
        load_dataset("mnist", data_dir=tmp_path)


def test_corrupt_svhn_mat_is_a_user_error(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, but not really")
    with pytest.raises(UserError, match="test_32x32.mat"):
        load_dataset("svhn", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# the restricted unpickler


class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": _RunsCommand(marker)}, protocol=2))
    with pytest.raises(UserError, match=r"data_batch_3.*(posix|os)\.system"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()
    with pytest.raises(data.RefusedPickle):  # sanity: the payload does reach for os.system
        data._SafeUnpickler(io.BytesIO(batch.read_bytes())).load()


@pytest.mark.parametrize("payload", [
    {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},     # not uint8
    {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},        # not N x 3072
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},          # labels missing
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},      # label out of range
    [np.zeros((2, 3072), np.uint8)],                                   # not a dict
])
def test_wrong_cifar_batch_content_is_a_user_error(tmp_path, payload):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_truncated_pickle_is_a_user_error(tmp_path):
    write_cifar100(tmp_path)
    f = tmp_path / "cifar-100-python" / "train"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt"):
        load_dataset("cifar100", data_dir=tmp_path)


def test_safe_unpickler_still_reads_plain_data(tmp_path):
    obj = {b"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [1, 2.5, b"x", "y"], b"c": (None, True)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (tmp_path / "p").write_bytes(pickle.dumps(obj, protocol=protocol))
        got = data.safe_unpickle(tmp_path / "p")
        assert np.array_equal(got[b"a"], obj[b"a"]) and got["b"] == obj["b"] and got[b"c"] == obj[b"c"]


# --------------------------------------------------------------------------------------------------
# downloads, against a local HTTP server


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1 at a free port; records the paths requested."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            requests.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/files", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _serve(monkeypatch, name, served: Path, base_url: str, checksums: dict[str, str] | None = None):
    """Points the registry entry at the local server, with the checksums of the served files."""
    files = tuple((p.name, (checksums or {}).get(p.name) or "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest())
                  for p in sorted((served / "files").iterdir()))
    spec = dataclasses.replace(data.DATASETS[name], base_url=base_url, files=files)
    monkeypatch.setitem(data.DATASETS, name, spec)


def test_download_verifies_and_loads(tmp_path, monkeypatch, server):
    served, url, requests = server
    x_tr, y_tr, x_te, y_te = write_mnist_like(served / "files", seed=9)
    _serve(monkeypatch, "mnist", served, url)
    root = tmp_path / "dl"
    assert data.download("mnist", root=root) == root
    assert sorted(p.name for p in root.iterdir()) == sorted(n + ".gz" for n in IDX_NAMES)
    assert len(requests) == 4
    d = load_dataset("mnist", data_dir=root, val_size=0)
    match_rows(d.train, x_tr, y_tr)
    assert torch.equal(d.test.y, torch.from_numpy(y_te))
    data.download("mnist", root=root)  # already there: nothing fetched again
    assert len(requests) == 4


def test_md5_checksums_are_accepted(tmp_path, monkeypatch, server):
    served, url, _ = server
    write_mnist_like(served / "files")
    md5 = {p.name: "md5:" + hashlib.md5(p.read_bytes()).hexdigest() for p in (served / "files").iterdir()}
    _serve(monkeypatch, "fashion-mnist", served, url, md5)
    assert data.download("fashion-mnist", root=tmp_path / "dl") == tmp_path / "dl"


def test_wrong_checksum_is_rejected_and_leaves_nothing(tmp_path, monkeypatch, server):
    served, url, _ = server
    write_mnist_like(served / "files")
    _serve(monkeypatch, "mnist", served, url, {"t10k-images-idx3-ubyte.gz": "sha256:" + "0" * 64})
    root = tmp_path / "dl"
    with pytest.raises(UserError, match="checksum mismatch.*t10k-images-idx3-ubyte.gz"):
        data.download("mnist", root=root)
    assert not (root / "t10k-images-idx3-ubyte.gz").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".") or p.suffix == ".part"]
    assert data.locate("mnist", data_dir=root) is None


def test_download_errors_are_user_errors(tmp_path, monkeypatch, server):
    served, url, _ = server
    write_mnist_like(served / "files")
    _serve(monkeypatch, "mnist", served, url)
    with pytest.raises(UserError, match="could not download .*404"):
        data.download("mnist", root=tmp_path / "a", base_url=url + "/nowhere")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    with pytest.raises(UserError, match="could not download"):
        data.download("mnist", root=tmp_path / "b", base_url=closed, timeout=5)
    with pytest.raises(UserError, match="nothing to download"):
        data.download("digits")
    for root in (tmp_path / "a", tmp_path / "b"):
        assert not list(root.iterdir())


def test_load_dataset_download_goes_to_the_cache(tmp_path, monkeypatch, server):
    served, url, _ = server
    write_mnist_like(served / "files")
    _serve(monkeypatch, "mnist", served, url)
    with pytest.raises(UserError, match="not found"):
        load_dataset("mnist")
    d = load_dataset("mnist", download=True)
    assert d.meta.source == str(tmp_path / "cache" / "robustnas" / "mnist")
    assert data.locate("mnist") == tmp_path / "cache" / "robustnas" / "mnist"


def _tar_gz(path: Path, folder: Path, arcname: str, extra: tarfile.TarInfo | None = None) -> None:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size))


def test_cifar_archive_is_downloaded_and_unpacked(tmp_path, monkeypatch, server):
    served, url, _ = server
    x_tr, y_tr, x_te, y_te = write_cifar10(tmp_path / "src")
    (served / "files").mkdir()
    _tar_gz(served / "files" / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py",
            "cifar-10-batches-py")
    _serve(monkeypatch, "cifar10", served, url)
    root = tmp_path / "dl"
    assert data.download("cifar10", root=root) == root / "cifar-10-batches-py"
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # archive removed, no temp dirs
    d = load_dataset("cifar10", data_dir=root)
    assert torch.equal(d.test.y, torch.from_numpy(y_te))


def test_archive_escaping_its_folder_is_refused(tmp_path, monkeypatch, server):
    served, url, _ = server
    write_cifar10(tmp_path / "src")
    (served / "files").mkdir()
    evil = tarfile.TarInfo("../escaped")
    evil.size = 3
    _tar_gz(served / "files" / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py",
            "cifar-10-batches-py", extra=evil)
    _serve(monkeypatch, "cifar10", served, url)
    with pytest.raises(UserError, match="unsafe archive member"):
        data.download("cifar10", root=tmp_path / "dl")
    assert not (tmp_path / "escaped").exists()
    assert data.locate("cifar10", data_dir=tmp_path / "dl") is None


def test_official_checksums_are_well_formed():
    for spec in data.DATASETS.values():
        for fname, checksum in spec.files:
            algo, digest = data._parse_checksum(checksum)
            assert len(digest) == {"md5": 32, "sha256": 64}[algo] and int(digest, 16) >= 0, fname


# --------------------------------------------------------------------------------------------------
# the real Fashion-MNIST (Debian's dataset-fashion-mnist), when installed


@pytest.mark.skipif(not all((REAL_FASHION / f"{n}.gz").exists() for n in IDX_NAMES),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", REAL_FASHION.parent)
    d = load_dataset("fashion-mnist", seed=0)
    assert d.meta.source == str(REAL_FASHION) and d.meta.eps == "0.1"
    assert (len(d.train), len(d.val), len(d.test)) == (54000, 6000, 10000)
    assert d.train.x.shape[1:] == (1, 28, 28)
    assert torch.bincount(d.test.y).tolist() == [1000] * 10  # the official test set is balanced
    assert d.meta.mean[0] == pytest.approx(0.286, abs=0.002)  # the published Fashion-MNIST mean
    assert d.meta.std[0] == pytest.approx(0.353, abs=0.002)
