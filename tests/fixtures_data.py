"""Tiny datasets written in each official on-disk format, for tests (always into a tmp dir).

Every writer returns the canonical arrays it encoded: uint8 NCHW images and int64 labels 0..K-1, as
(x_train, y_train, x_test, y_test), so a test can check the loader gives back exactly those.
Images are random, hence distinct, so a loaded image identifies its source row.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def random_arrays(n_train, n_test, shape, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    x_tr = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
    x_te = rng.integers(0, 256, (n_test, *shape), dtype=np.uint8)
    x_tr[0] = 0  # make sure both ends of the pixel range occur
    x_tr[1] = 255
    y_tr = rng.permutation(np.arange(n_train) % num_classes).astype(np.int64)
    y_te = rng.permutation(np.arange(n_test) % num_classes).astype(np.int64)
    return x_tr, y_tr, x_te, y_te


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX (ubyte) file's content for a uint8 array."""
    assert arr.dtype == np.uint8
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    raw = idx_bytes(arr)
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def write_mnist_like(folder: Path, n_train=60, n_test=20, gz=True, seed=0):
    """The four MNIST/Fashion-MNIST IDX files (28x28) in folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = random_arrays(n_train, n_test, (1, 28, 28), 10, seed)
    for name, arr in zip(IDX_NAMES, (x_tr[:, 0], y_tr.astype(np.uint8), x_te[:, 0], y_te.astype(np.uint8))):
        write_idx(folder / name, arr, gz)
    return x_tr, y_tr, x_te, y_te


def _cifar_batch(path: Path, x: np.ndarray, y: np.ndarray, label_key: bytes) -> None:
    # the official layout: rows of 3072 = R, G, B planes; Python-2 style bytes keys; protocol 2
    batch = {b"batch_label": b"fixture batch", label_key: [int(v) for v in y],
             b"data": x.reshape(len(x), 3072), b"filenames": [b"img_%d.png" % i for i in range(len(x))]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) // 5 for v in y]
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_cifar10(folder: Path, n_per_batch=6, n_test=10, seed=0):
    """cifar-10-batches-py/data_batch_1..5 and test_batch under folder."""
    d = Path(folder) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = random_arrays(5 * n_per_batch, n_test, (3, 32, 32), 10, seed)
    for i in range(5):
        sl = slice(i * n_per_batch, (i + 1) * n_per_batch)
        _cifar_batch(d / f"data_batch_{i + 1}", x_tr[sl], y_tr[sl], b"labels")
    _cifar_batch(d / "test_batch", x_te, y_te, b"labels")
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))
    return x_tr, y_tr, x_te, y_te


def write_cifar100(folder: Path, n_train=40, n_test=20, seed=0):
    """cifar-100-python/train and test under folder."""
    d = Path(folder) / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = random_arrays(n_train, n_test, (3, 32, 32), 100, seed)
    y_tr[-1] = 99  # the top label occurs
    _cifar_batch(d / "train", x_tr, y_tr, b"fine_labels")
    _cifar_batch(d / "test", x_te, y_te, b"fine_labels")
    return x_tr, y_tr, x_te, y_te


def write_svhn(folder: Path, n_train=30, n_test=12, seed=0):
    """train_32x32.mat / test_32x32.mat: X is 32x32x3xN, y is Nx1 in 1..10 with 10 meaning digit 0."""
    from scipy.io import savemat

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = random_arrays(n_train, n_test, (3, 32, 32), 10, seed)
    for name, x, y in (("train_32x32.mat", x_tr, y_tr), ("test_32x32.mat", x_te, y_te)):
        native_y = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        savemat(folder / name, {"X": x.transpose(2, 3, 1, 0), "y": native_y})  # N C H W -> H W C N
    return x_tr, y_tr, x_te, y_te
