"""Dataset registry and loaders: every dataset comes out as (train, val, test) float tensors in [0,1].

Files are looked for in a fixed order (`search_paths`) and read with plain numpy/scipy, never by
executing a pickle: the CIFAR batches go through a restricted unpickler that can only rebuild numpy
arrays, lists and bytes. Nothing is cached on disk except what `download` is explicitly asked to fetch.

Splits: the official train/test split is kept; the validation split is carved from train with the
seed. `mean`/`std` in the meta are computed exactly (from a pixel histogram) over the final train
split, so they describe precisely the images the model is trained on.

A new dataset is one `DatasetSpec` entry in `DATASETS`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import torch

from robustnas.core.errors import UserError

SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install
ENV_VAR = "ROBUSTNAS_DATA"


# --------------------------------------------------------------------------------------------------
# public data types


@dataclass(frozen=True)
class DatasetMeta:
    name: str
    num_classes: int
    shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, of the train images in [0,1]
    std: tuple[float, ...]
    eps: str  # default Linf epsilon, e.g. "8/255"
    classes: tuple[str, ...]
    source: str  # where the files were found


@dataclass
class Split:
    x: torch.Tensor  # float32 NCHW in [0,1]
    y: torch.Tensor  # int64

    def __len__(self) -> int:
        return len(self.y)

    def head(self, k: int) -> "Split":
        """The first k images: a run that uses only some ships only those to its workers."""
        return Split(self.x[:k], self.y[:k])


@dataclass
class Dataset:
    meta: DatasetMeta
    train: Split
    val: Split
    test: Split


# uint8 NCHW images and int64 labels: (x_train, y_train, x_test, y_test)
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry: what the dataset is, how to find its files, read them and fetch them."""

    name: str
    num_classes: int
    shape: tuple[int, int, int]
    eps: str
    classes: tuple[str, ...]
    sizes: tuple[int, int]  # official (train, test) image counts, for `robustnas datasets`
    wanted: str  # the files looked for, as shown in messages
    how_to_get: str
    find: Callable[[Path], Path | None]  # the folder under a search path that holds the files
    read: Callable[[Path], Arrays]
    pixel_max: int = 255  # stored pixel value that means 1.0
    base_url: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # downloadable file -> "md5:..." or "sha256:..."
    embedded: bool = False  # shipped inside an installed package; no search
    aliases: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not, told by its content) as a numpy array shaped by its header."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path}: {e}; the file is corrupt or truncated, fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number); fetch it again")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path}: IDX header is truncated; fetch the file again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise UserError(f"{path}: IDX header promises {expected} data bytes for shape {dims} but the file "
                        f"has {len(raw) - header}; the file is corrupt or truncated, fetch it again")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):  # uncompressed first: it loads faster
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_finder(subdirs: tuple[str, ...]) -> Callable[[Path], Path | None]:
    def find(root: Path) -> Path | None:
        for sub in ("", *subdirs):
            if all(_idx_file(root / sub, stem) for stem in _IDX_STEMS):
                return root / sub
        return None

    return find


def _read_idx_pair(folder: Path, prefix: str, shape: tuple[int, int, int], num_classes: int):
    img_path = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    lab_path = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    x, y = read_idx(img_path), read_idx(lab_path)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != shape[1:]:
        raise UserError(f"{img_path}: expected uint8 images of {shape[1]}x{shape[2]}, got {x.dtype} {x.shape}")
    if y.dtype != np.uint8 or y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{lab_path}: expected {len(x)} uint8 labels to match {img_path.name}, "
                        f"got {y.dtype} {y.shape}")
    _check_labels(y, num_classes, lab_path)
    return x[:, None], y.astype(np.int64)


def _idx_reader(shape, num_classes):
    def read(folder: Path) -> Arrays:
        return (*_read_idx_pair(folder, "train", shape, num_classes),
                *_read_idx_pair(folder, "t10k", shape, num_classes))

    return read


def _check_labels(y: np.ndarray, num_classes: int, path: Path) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{path}: labels must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}")


# --------------------------------------------------------------------------------------------------
# CIFAR python batches, through a restricted unpickler

# numpy's own array rebuild functions (protocol <= 4 and protocol 5), whatever module holds them
_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes at pickle protocol <= 2 as _codecs.encode(text, "latin1"); allow only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed with latin1")
    return text.encode("latin1")


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for a global outside the allowed few: it wants to run code, not carry data."""


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds only dicts, lists, bytes and plain numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"global {module}.{name} is not allowed") from None


def safe_unpickle(path: str | Path) -> object:
    """Loads a pickle that may only contain data (never runs code); errors become one-line UserErrors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, encoding="bytes").load()
    except RefusedPickle as e:
        raise UserError(f"{path}: refused to unpickle ({e}); it is not a plain data batch, "
                        f"replace it with the official file") from None
    except Exception as e:  # truncated / garbage input raises anything from EOFError to ValueError
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}; the file is corrupt, fetch it again") from None


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(path)
    if not isinstance(batch, dict):
        raise UserError(f"{path}: expected a dict batch, got {type(batch).__name__}")
    batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: expected b'data' as a uint8 N x 3072 array, got {got}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise UserError(f"{path}: expected {len(data)} labels under {label_key!r}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: labels under {label_key!r} are not integers") from None
    if y.ndim != 1:
        raise UserError(f"{path}: labels under {label_key!r} must be a flat list")
    _check_labels(y, num_classes, path)
    return data.reshape(-1, 3, 32, 32), y  # rows are the R, G, B planes, each 32x32 row-major


def _cifar_finder(subdir: str, names: tuple[str, ...]) -> Callable[[Path], Path | None]:
    def find(root: Path) -> Path | None:
        for folder in (root / subdir, root):
            if all((folder / n).is_file() for n in names):
                return folder
        return None

    return find


def _cifar_reader(train_names, test_names, label_key: bytes, num_classes: int):
    def read(folder: Path) -> Arrays:
        def stack(names):
            parts = [_read_cifar_batch(folder / n, label_key, num_classes) for n in names]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

        return (*stack(train_names), *stack(test_names))

    return read


_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


# --------------------------------------------------------------------------------------------------
# SVHN .mat files


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except Exception as e:  # scipy raises several types for a damaged file
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}; the file is corrupt, fetch it again") from None
    x, y = mat.get("X"), mat.get("y")
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[:3] == (32, 32, 3)):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else "nothing"
        raise UserError(f"{path}: expected X as uint8 32x32x3xN, got {got}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise UserError(f"{path}: expected {x.shape[3]} labels in y")
    y = y.reshape(-1).astype(np.int64)
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise UserError(f"{path}: SVHN labels must lie in 1..10, found {y.min()}..{y.max()}")
    x = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # H W C N -> N C H W
    return x, y % 10  # SVHN stores digit 0 as label 10


def _svhn_find(root: Path) -> Path | None:
    ok = (root / "train_32x32.mat").is_file() and (root / "test_32x32.mat").is_file()
    return root if ok else None


def _read_svhn(folder: Path) -> Arrays:
    return (*_read_svhn_mat(folder / "train_32x32.mat"), *_read_svhn_mat(folder / "test_32x32.mat"))


# --------------------------------------------------------------------------------------------------
# scikit-learn's embedded 8x8 digits


def _digits_file(_root: Path | None = None) -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def _read_digits(_folder: Path) -> Arrays:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # integer counts 0..16
    y = d.target.astype(np.int64)
    # a fixed stratified 80/20 split, so the test set is the same whatever seed a run uses
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return xtr, ytr, xte, yte


# --------------------------------------------------------------------------------------------------
# the registry

_TEN_DIGITS = tuple(str(i) for i in range(10))
_IDX_WANTED = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
               "t10k-labels-idx1-ubyte (.gz or not)")
_CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
assert len(_CIFAR100_CLASSES) == 100


def _spec(**kw) -> DatasetSpec:
    return DatasetSpec(**kw)


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        _spec(name="digits", num_classes=10, shape=(1, 8, 8), eps="0.1", classes=_TEN_DIGITS, sizes=(1437, 360),
              wanted="sklearn/datasets/data/digits.csv.gz", how_to_get="pip install scikit-learn",
              find=_digits_file, read=_read_digits, pixel_max=16, embedded=True),
        _spec(name="fashion-mnist", num_classes=10, shape=(1, 28, 28), eps="0.1",
              classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                       "Bag", "Ankle boot"),
              sizes=(60000, 10000), wanted=_IDX_WANTED,
              how_to_get="`apt-get install dataset-fashion-mnist`, or `robustnas datasets --download fashion-mnist`, "
                         "or put the four IDX files in $ROBUSTNAS_DATA/fashion-mnist",
              find=_idx_finder(("FashionMNIST/raw",)), read=_idx_reader((1, 28, 28), 10),
              base_url="https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
              files=(("train-images-idx3-ubyte.gz", "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                     ("train-labels-idx1-ubyte.gz", "md5:25c81989df183df01b3e8a0aad5dffbe"),
                     ("t10k-images-idx3-ubyte.gz", "md5:bef4ecab320f06d8554ea6380940ec79"),
                     ("t10k-labels-idx1-ubyte.gz", "md5:bb300cfdad3c16e7a12a480ee83cd310")),
              aliases=("fashion_mnist", "fmnist", "fashionmnist")),
        _spec(name="mnist", num_classes=10, shape=(1, 28, 28), eps="0.3", classes=_TEN_DIGITS,
              sizes=(60000, 10000), wanted=_IDX_WANTED,
              how_to_get="`robustnas datasets --download mnist`, or put the four IDX files in $ROBUSTNAS_DATA/mnist",
              find=_idx_finder(("MNIST/raw",)), read=_idx_reader((1, 28, 28), 10),
              base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
              files=(("train-images-idx3-ubyte.gz", "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                     ("train-labels-idx1-ubyte.gz", "md5:d53e105ee54ea40749a09fcbcd1e9432"),
                     ("t10k-images-idx3-ubyte.gz", "md5:9fb629c4189551a2d022fa330f9573f3"),
                     ("t10k-labels-idx1-ubyte.gz", "md5:ec29112dd5afa0611ce80d1b7f02629c"))),
        _spec(name="cifar10", num_classes=10, shape=(3, 32, 32), eps="8/255",
              classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
              sizes=(50000, 10000), wanted="cifar-10-batches-py/data_batch_1..5 and test_batch",
              how_to_get="`robustnas datasets --download cifar10`, or unpack cifar-10-python.tar.gz "
                         "into $ROBUSTNAS_DATA/cifar10",
              find=_cifar_finder("cifar-10-batches-py", _CIFAR10_TRAIN + ("test_batch",)),
              read=_cifar_reader(_CIFAR10_TRAIN, ("test_batch",), b"labels", 10),
              base_url="https://www.cs.toronto.edu/~kriz/",
              files=(("cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a"),),
              aliases=("cifar-10",)),
        _spec(name="cifar100", num_classes=100, shape=(3, 32, 32), eps="8/255", classes=_CIFAR100_CLASSES,
              sizes=(50000, 10000), wanted="cifar-100-python/train and test",
              how_to_get="`robustnas datasets --download cifar100`, or unpack cifar-100-python.tar.gz "
                         "into $ROBUSTNAS_DATA/cifar100",
              find=_cifar_finder("cifar-100-python", ("train", "test")),
              read=_cifar_reader(("train",), ("test",), b"fine_labels", 100),
              base_url="https://www.cs.toronto.edu/~kriz/",
              files=(("cifar-100-python.tar.gz", "md5:eb9058c3a382ffc7106e4002c42a8d85"),),
              aliases=("cifar-100",)),
        _spec(name="svhn", num_classes=10, shape=(3, 32, 32), eps="8/255", classes=_TEN_DIGITS,
              sizes=(73257, 26032), wanted="train_32x32.mat and test_32x32.mat",
              how_to_get="`robustnas datasets --download svhn`, or put train_32x32.mat and test_32x32.mat "
                         "in $ROBUSTNAS_DATA/svhn",
              find=_svhn_find, read=_read_svhn,
              base_url="http://ufldl.stanford.edu/housenumbers/",
              files=(("train_32x32.mat", "md5:e26dedcc434d2e4c54c9b2d4a06d8373"),
                     ("test_32x32.mat", "md5:eb5a983be6a315427106f1b164d9cef3"))),
    ]
}


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for a name or alias (case-insensitive)."""
    key = str(name).strip().lower()
    for spec in DATASETS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise UserError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------------
# finding files


def cache_dir() -> Path:
    """Where `download` puts datasets by default: ~/.cache/robustnas (or $XDG_CACHE_HOME/robustnas)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robustnas"


def search_paths(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Folders searched, in order: data_dir/<name>, data_dir, $ROBUSTNAS_DATA/<name>, $ROBUSTNAS_DATA,
    /usr/share/datasets/<name>, ~/.cache/robustnas/<name>. A flat folder should hold one dataset only:
    MNIST and Fashion-MNIST use the same file names."""
    name = get_spec(name).name
    paths: list[Path] = []
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        paths += [d / name, d]
    if os.environ.get(ENV_VAR):
        d = Path(os.environ[ENV_VAR]).expanduser()
        paths += [d / name, d]
    paths += [SYSTEM_DATA_DIR / name, cache_dir() / name]
    return paths


def locate(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The folder (or, for embedded data, the file) the dataset is read from; None when it is nowhere."""
    spec = get_spec(name)
    if spec.embedded:
        return spec.find(Path("."))
    for root in search_paths(spec.name, data_dir):
        if root.is_dir():
            found = spec.find(root)
            if found is not None:
                return found
    return None


def _not_found(spec: DatasetSpec, data_dir) -> UserError:
    if spec.embedded:
        return UserError(f"dataset '{spec.name}' not found: {spec.wanted} is missing; get it with {spec.how_to_get}")
    where = ", ".join(str(p) for p in search_paths(spec.name, data_dir))
    return UserError(f"dataset '{spec.name}' not found: looked for {spec.wanted} in {where}; "
                     f"get it with {spec.how_to_get}")


def dataset_status(data_dir: str | Path | None = None) -> list[dict]:
    """One row per dataset for `robustnas datasets`: found or not, where, official sizes, how to get it."""
    rows = []
    for spec in DATASETS.values():
        where = locate(spec.name, data_dir)
        rows.append({
            "name": spec.name,
            "found": where is not None,
            "where": ("scikit-learn (embedded)" if spec.embedded else str(where)) if where is not None else None,
            "train": spec.sizes[0],
            "test": spec.sizes[1],
            "sizes": {"train": spec.sizes[0], "test": spec.sizes[1]},
            "shape": spec.shape,
            "eps": spec.eps,
            "how": spec.how_to_get,
            "searched": [] if spec.embedded else [str(p) for p in search_paths(spec.name, data_dir)],
        })
    return rows


# --------------------------------------------------------------------------------------------------
# loading and splitting


def _val_count(val_size: int | float, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise UserError(f"val_size must be a fraction in [0, 1) or an image count, got {val_size!r}")
    if isinstance(val_size, (float, np.floating)) and 0 <= val_size < 1:
        count = int(round(float(val_size) * n))
    elif float(val_size) >= 0 and float(val_size).is_integer():
        count = int(val_size)
    else:
        raise UserError(f"val_size must be a fraction in [0, 1) or an image count, got {val_size!r}")
    if count >= n:
        raise UserError(f"val_size={val_size!r} leaves no training images out of {n}; use a smaller val_size")
    return count


def _pixel_stats(x: np.ndarray, pixel_max: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Exact per-channel mean/std from a value histogram: fast, no float copy, same result on any machine.
    mean, std = [], []
    values = np.arange(256, dtype=np.float64) / pixel_max
    for c in range(x.shape[1]):
        channel = torch.from_numpy(np.ascontiguousarray(x[:, c])).reshape(-1)
        counts = torch.bincount(channel, minlength=256).numpy()[:256].astype(np.float64)  # uint8: no copy
        total = counts.sum()
        m = float((counts * values).sum() / total)
        var = float((counts * (values - m) ** 2).sum() / total)
        mean.append(m)
        std.append(max(var, 0.0) ** 0.5 or 1.0)  # a constant channel gets std 1: Normalize never divides by 0
    return tuple(mean), tuple(std)


def _to_split(x: np.ndarray, y: np.ndarray, pixel_max: int) -> Split:
    xs = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(pixel_max)
    return Split(xs, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


def load_dataset(name: str, data_dir: str | Path | None = None, val_size: int | float = 0.1,
                 subset: int | None = None, seed: int = 0, download: bool = False) -> Dataset:
    """Loads a dataset as float [0,1] NCHW tensors with a seeded validation split carved from train.

    val_size: a fraction of the training images, or a count. subset=N keeps N training images (seeded)
    and at most N validation and N test images, for quick runs; the test images kept are the same for
    every seed. The same (name, val_size, subset, seed) always gives the same splits.
    """
    spec = get_spec(name)
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1):
        raise UserError(f"subset must be a positive number of images, got {subset!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if data_dir is not None and not spec.embedded and not Path(data_dir).expanduser().is_dir():
        raise UserError(f"data folder {data_dir} does not exist; fix the path, or leave it out to search "
                        f"{', '.join(str(p) for p in search_paths(spec.name))}")
    where = locate(spec.name, data_dir)
    if where is None and download and not spec.embedded:
        _download(spec, None, None, 30)
        where = locate(spec.name, data_dir)
    if where is None:
        raise _not_found(spec, data_dir)

    x_tr, y_tr, x_te, y_te = spec.read(where)
    n_val = _val_count(val_size, len(x_tr))
    perm = np.random.default_rng(seed).permutation(len(x_tr))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    test_idx = np.arange(len(x_te))
    if subset is not None:
        train_idx, val_idx = train_idx[:subset], val_idx[:subset]
        test_idx = np.random.default_rng(0).permutation(len(x_te))[:subset]

    train_idx, val_idx, test_idx = np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)  # file order
    x_train = x_tr[train_idx]
    mean, std = _pixel_stats(x_train, spec.pixel_max)
    meta = DatasetMeta(name=spec.name, num_classes=spec.num_classes, shape=spec.shape, mean=mean, std=std,
                       eps=spec.eps, classes=spec.classes,
                       source="scikit-learn (embedded)" if spec.embedded else str(where))
    return Dataset(meta=meta,
                   train=_to_split(x_train, y_tr[train_idx], spec.pixel_max),
                   val=_to_split(x_tr[val_idx], y_tr[val_idx], spec.pixel_max),
                   test=_to_split(x_te[test_idx], y_te[test_idx], spec.pixel_max))


# --------------------------------------------------------------------------------------------------
# downloading (for users with internet)


def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algo, _, digest = checksum.partition(":")
    if algo not in ("md5", "sha256") or not digest:
        raise ValueError(f"checksum must read 'md5:<hex>' or 'sha256:<hex>', got {checksum!r}")
    return algo, digest.lower()


def _fetch(url: str, dest: Path, checksum: str, timeout: float) -> None:
    """Streams url to a temporary file beside dest, verifies it, then renames it into place."""
    algo, expected = _parse_checksum(checksum)
    h = hashlib.new(algo)
    tmp: str | None = None
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "robustnas"})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    h.update(chunk)
                    f.write(chunk)
        if h.hexdigest() != expected:
            raise UserError(f"checksum mismatch for {url}: expected {algo} {expected}, got {h.hexdigest()}; "
                            f"the download was discarded, retry or check the base URL")
        os.replace(tmp, dest)
        tmp = None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise UserError(f"could not download {url}: {reason}; check the network, or put the file "
                        f"in {dest.parent} yourself") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _extract_tar(archive: Path, root: Path) -> None:
    """Unpacks a verified archive, refusing links and paths that would land outside root."""
    tmpdir = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if PurePosixPath(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
                    raise UserError(f"{archive}: refusing unsafe archive member {m.name!r}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmpdir, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters; members were checked above
                tar.extractall(tmpdir, members=members)
        for entry in tmpdir.iterdir():
            target = root / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot unpack {archive}: {e}; delete it and download again") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def download(name: str, root: Path | None = None, base_url: str | None = None, timeout: float = 30) -> Path:
    """Fetches the official files into root (default ~/.cache/robustnas/<name>), each verified against
    its known checksum and written atomically; returns the folder `load_dataset` will read."""
    return _download(get_spec(name), root, base_url, timeout)


def _download(spec: DatasetSpec, root: Path | None, base_url: str | None, timeout: float) -> Path:
    if spec.embedded:
        raise UserError(f"'{spec.name}' ships with scikit-learn; there is nothing to download")
    if not spec.files or not (base_url or spec.base_url):
        raise UserError(f"no download source is known for '{spec.name}'; get it with {spec.how_to_get}")
    root = Path(root).expanduser() if root is not None else cache_dir() / spec.name
    found = spec.find(root) if root.is_dir() else None
    if found is not None:
        return found
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {root}: {e}; pass another download folder") from None
    base = base_url or spec.base_url
    base = base if base.endswith("/") else base + "/"
    for fname, checksum in spec.files:
        dest, (algo, digest) = root / fname, _parse_checksum(checksum)
        if dest.is_file() and _hash_file(dest, algo) == digest:
            continue  # already here and intact
        _fetch(base + fname, dest, checksum, timeout)
        if fname.endswith((".tar.gz", ".tgz")):
            _extract_tar(dest, root)
            dest.unlink()  # the unpacked folder is what gets found; don't keep two copies
    found = spec.find(root)
    if found is None:
        raise UserError(f"downloaded {spec.name} into {root} but did not find {spec.wanted} there")
    return found
