"""CIFAR-10 from its standard python layout to tensors; the seeded split; batched augmentation.

The test split is read only by `tuner ensemble`.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from tuner.errors import ConfigError, DataError
from tuner.spec import DataSpec

FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = 10
# per-channel statistics of the CIFAR-10 training set, on the 0..255 scale
MEAN = (125.31, 122.95, 113.87)
STD = (62.99, 62.09, 66.70)


def default_data_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tuner" / "cifar10"


def resolve_data_dir(cli_value: str | os.PathLike[str] | None) -> Path:
    """--data-dir, else TUNER_DATA_DIR, else a folder under the user's cache."""
    chosen = cli_value or os.environ.get("TUNER_DATA_DIR")
    return Path(chosen).expanduser() if chosen else default_data_dir()


def batches_dir(root: Path) -> Path:
    """Accept both the folder that holds `cifar-10-batches-py` and that folder itself."""
    return root if root.name == FOLDER else root / FOLDER


def ensure_cifar(root: Path, *, download: bool = True) -> Path:
    """Return the `cifar-10-batches-py` folder, downloading the release only where that folder
    does not exist: a partial copy is named, never downloaded into (two copies would mix)."""
    folder = batches_dir(root)
    if folder.exists():
        _check_whole(folder)
        return folder
    if not download:
        raise DataError(_missing_message(folder, "downloading is turned off"))
    print(f"CIFAR-10 not found at {folder}; downloading {URL} …", flush=True)
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(URL, download_root=str(folder.parent), md5=MD5)
    except Exception as exc:  # offline, proxy, disk full: all end the same way for the user
        raise DataError(_missing_message(folder, f"the download failed ({exc})")) from None
    return folder


def _check_whole(folder: Path) -> None:
    """`test_batch` and at least one `data_batch_N` (a development subset may hold fewer than
    the release's five), else one line naming what is missing."""
    train = [name for name in TRAIN_FILES if (folder / name).is_file()]
    test = (folder / TEST_FILE).is_file()
    if train and test:
        return
    if train:
        held = f"holds {_train_names(train)} but not {TEST_FILE}"
    else:
        held = f"holds {TEST_FILE} but no data_batch_N" if test else "holds no CIFAR-10 batch"
    raise DataError(
        f"{folder} {held}: tuner does not download into a folder that exists; add the "
        f"missing files from {URL}, or remove the folder for tuner to download the release"
    )


def _train_names(names: list[str]) -> str:
    """`data_batch_1..5` for a run of three or more, else the names."""
    first = TRAIN_FILES.index(names[0])
    if len(names) > 2 and tuple(names) == TRAIN_FILES[first : first + len(names)]:
        return f"{names[0]}..{names[-1].rsplit('_', 1)[1]}"
    return ", ".join(names)


def _missing_message(folder: Path, why: str) -> str:
    return (
        f"CIFAR-10 is not at {folder} and {why}.\n"
        "Point tuner at a local copy of the python release (the folder that holds "
        f"'{FOLDER}/'), with --data-dir DIR or TUNER_DATA_DIR=DIR, or download "
        f"{URL} and unpack it there."
    )


LATIN_1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}  # protocol 2 writes latin1
_NDARRAY = object()  # stands for numpy.ndarray in a CIFAR pickle, for `_reconstruct` alone


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR pickles hold dicts of numpy arrays; refuse any other global (no code runs),
    and any array larger than the file: numpy pickles an array's bytes whole, so a larger one
    is a forgery that a few KB could make take gigabytes."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),  # the original release, pickled by numpy 1
        ("_codecs", "encode"),
    }

    def __init__(self, file: BinaryIO, size: int) -> None:
        super().__init__(file, encoding="bytes")
        self.size = size  # bytes in the file

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        if name == "_reconstruct":
            return self._reconstruct
        if name == "ndarray":
            return _NDARRAY  # not the class: called, it would allocate any shape it is given
        if name == "encode":
            return self._encode
        return super().find_class(module, name)

    def _encode(self, text: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        """`_codecs.encode` as pickle protocol 2 uses it (bytes as latin-1 text) and only so:
        other codecs grow their input (`hex` doubles it), and nested calls would build
        gigabytes from a few hundred bytes."""
        if not isinstance(text, str) or encoding.lower().replace("_", "-") not in LATIN_1:
            raise pickle.UnpicklingError(f"refusing _codecs.encode of a {type(text).__name__} "
                                         f"as {encoding!r}")  # fmt: skip
        return text.encode("latin-1", errors)

    def _reconstruct(self, subtype: object, shape: tuple[int, ...], dtype: object) -> np.ndarray:
        """numpy's `_reconstruct`, bounded: the array that the pickle then fills with bytes
        of its own (numpy checks that they are as many as the shape needs)."""
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError(f"refusing to build an array of type {subtype!r}")
        claimed = math.prod(shape) * np.dtype(dtype).itemsize
        if claimed > self.size:
            raise pickle.UnpicklingError(
                f"it claims an array of shape {shape} ({claimed:,} bytes) that the file "
                f"cannot hold ({self.size:,} bytes)"
            )
        return np.ndarray(shape, dtype)


TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))  # the release's names, no others
TEST_FILE = "test_batch"
PIXELS = 3 * 32 * 32  # values per image in a batch's `data` rows (red, green, blue planes)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file, checked: uint8 pixels N×3072, integer labels in 0..9, as many as images.
    Each failure is one `DataError` naming the file and the check."""
    try:
        with path.open("rb") as f:
            batch = _ArraysOnly(f, os.fstat(f.fileno()).st_size).load()
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 batch (no 'data' and 'labels' entries)")
    images, labels = _check_pixels(path, batch[b"data"]), _check_labels(path, batch[b"labels"])
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _check_pixels(path: Path, data: object) -> np.ndarray:
    if not isinstance(data, np.ndarray):  # lists of shared rows would be built whole
        raise DataError(
            f"{path}: data is a {type(data).__name__}, expected a numpy array of uint8 pixels, "
            f"N×{PIXELS} (as the release holds)"
        )
    if data.ndim != 2 or data.shape[1] != PIXELS:
        raise DataError(
            f"{path}: data has shape {data.shape}, expected N×{PIXELS} (3×32×32 per image)"
        )
    if len(data) == 0:
        raise DataError(f"{path}: holds no images")
    if data.dtype.kind == "f":
        low, high = float(data.min()), float(data.max())
        scaled = 0 <= low and high <= 1
        found = "in [0, 1]" if scaled else f"from {low:g} to {high:g}"
        hint = " (images scaled to [0, 1] would train as black: save them as uint8)"
        raise DataError(
            f"{path}: pixels are {data.dtype} {found}, expected uint8 in 0..255"
            + (hint if scaled else "")
        )
    if data.dtype.kind not in "iu":
        raise DataError(f"{path}: pixels are {data.dtype}, expected uint8 in 0..255")
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise DataError(
            f"{path}: pixel values run from {data.min()} to {data.max()}, expected 0..255"
        )
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)


def _check_labels(path: Path, raw: object) -> np.ndarray:
    """A list of ints (as the release holds) or an array; numbers only, checked before numpy
    builds them: a list of shared lists would be built whole."""
    expected = f"expected integers 0..{CLASSES - 1}"
    if isinstance(raw, list):
        for label in raw:
            if not isinstance(label, int | float):
                raise DataError(f"{path}: labels hold a {type(label).__name__}, {expected}")
    elif not isinstance(raw, np.ndarray):
        raise DataError(f"{path}: labels are a {type(raw).__name__}, {expected} in a list")
    labels = np.asarray(raw)
    if labels.ndim != 1:
        raise DataError(f"{path}: labels have shape {labels.shape}, expected one per image")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels are {labels.dtype}, expected integers 0..{CLASSES - 1}")
    outside = np.flatnonzero((labels < 0) | (labels >= CLASSES))
    if len(outside):
        first = outside[0]
        raise DataError(
            f"{path}: label {labels[first]} (image {first}) is outside 0..{CLASSES - 1}; "
            f"{len(outside)} such labels in all"
        )
    return labels.astype(np.int64, copy=False)


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`data_batch_1..5` (train) or `test_batch` (test): uint8 N×3×32×32 and int64 N. Only
    those names are read: a stray `data_batch_1.bak` would leak copies into the split."""
    if split == "train":
        paths = [folder / name for name in TRAIN_FILES if (folder / name).is_file()]
    elif split == "test":
        paths = [folder / TEST_FILE] if (folder / TEST_FILE).is_file() else []
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not paths:
        raise DataError(f"{folder}: no {split} batches found (expected data_batch_N, test_batch)")
    parts = [_read_batch(p) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_classes(
    folder: Path, split: str, labels: np.ndarray, carve: int | None, key: str
) -> None:
    """Every class has images enough for a stratified split that carves `carve` images out
    (the study file's `key`)."""
    counts = np.bincount(labels, minlength=CLASSES)
    where = f"{folder}: the {split} batches"
    if counts.min() < 2:
        cls = int(counts.argmin())
        raise DataError(
            f"{where} hold {counts[cls]} image(s) of class {cls}; a stratified split needs at "
            f"least 2 of each of the {CLASSES} classes (counts: {counts.tolist()})"
        )
    if carve is not None and carve < min(len(labels), CLASSES):
        raise ConfigError(
            f"{key}={carve} cannot hold one image of each of the {CLASSES} classes; "
            f"raise {key} in the study file"
        )


def split_indices(
    labels: np.ndarray, val_size: int, train_size: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded: `val_size` images to validate, the rest (or `train_size`) to train."""
    n = len(labels)
    if val_size >= n:
        raise ConfigError(
            f"data.val_size={val_size} leaves no training images: the data set has {n}; "
            "lower data.val_size in the study file"
        )
    index = np.arange(n)
    train, val = stratified_split(index, labels, n - val_size, val_size, seed)
    if train_size is not None and train_size < len(train):
        train, _ = stratified_split(
            train, labels[train], train_size, len(train) - train_size, seed
        )
    return np.sort(train), np.sort(val)


def subsample(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A stratified subset of `size` indices (all when size is None or too large)."""
    index = np.arange(len(labels))
    if size is None or size >= len(labels):
        return index
    chosen, _ = stratified_split(index, labels, size, len(labels) - size, seed)
    return np.sort(chosen)


def stratified_split(
    items: np.ndarray, labels: np.ndarray, n_train: int, n_test: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's `train_test_split(items, train_size=n_train, test_size=n_test,
    stratify=labels, random_state=seed)`, draw for draw (its `StratifiedShuffleSplit` and
    `_approximate_mode`): the same split, which every study made so far is bound to (a test
    compares the two), without importing scikit-learn (1.6 s, paid by every worker before its
    first trial)."""
    rng = np.random.RandomState(seed)
    classes, y_indices, class_counts = np.unique(labels, return_inverse=True,
                                                 return_counts=True)  # fmt: skip
    if class_counts.min() < 2 or min(n_train, n_test) < len(classes):
        raise ConfigError(
            f"a stratified split of {len(labels)} images into {n_train} and {n_test} needs "
            f"at least 2 images of each of the {len(classes)} classes and {len(classes)} on "
            "each side: change data.val_size, data.train_size or data.test_size in the study file"
        )
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        shuffled = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(shuffled[: n_i[i]])
        test.extend(shuffled[n_i[i] : n_i[i] + t_i[i]])
    return items[rng.permutation(train)], items[rng.permutation(test)]


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    """How many of `n_draws` come from each class (scikit-learn's, ties broken by `rng`)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


@dataclass(frozen=True)
class Split:
    """Images stay uint8 on the training device (4× smaller than float); labels are int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TrainVal:
    train: Split
    val: Split
    source: Path

    def merged(self) -> TrainVal:
        """Train on both, hold nothing out (a refit: the configuration is chosen already)."""
        images = torch.cat([self.train.images, self.val.images])
        labels = torch.cat([self.train.labels, self.val.labels])
        empty = Split(images[:0], labels[:0])
        return TrainVal(Split(images, labels), empty, self.source)


def _to_split(images: np.ndarray, labels: np.ndarray, device: torch.device) -> Split:
    return Split(torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device))


def load_train_val(root: Path, spec: DataSpec, seed: int, device: torch.device) -> TrainVal:
    folder, images, labels, train, val = _split_training(root, spec, seed)
    return TrainVal(
        train=_to_split(images[train], labels[train], device),
        val=_to_split(images[val], labels[val], device),
        source=folder,
    )


def load_val(root: Path, spec: DataSpec, seed: int, device: torch.device) -> Split:
    """The validation split alone (the same images as `load_train_val`'s): the training
    images are not copied to the device."""
    _, images, labels, _, val = _split_training(root, spec, seed)
    return _to_split(images[val], labels[val], device)


def _split_training(
    root: Path, spec: DataSpec, seed: int
) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training batches, checked, and the indices of the seeded, stratified split."""
    folder = ensure_cifar(root)
    images, labels = read_split(folder, "train")
    check_classes(folder, "train", labels, spec.val_size, "data.val_size")
    check_classes(folder, "train", labels, spec.train_size, "data.train_size")
    train, val = split_indices(labels, spec.val_size, spec.train_size, seed)
    return folder, images, labels, train, val


def load_test(root: Path, spec: DataSpec, seed: int, device: torch.device) -> Split:
    folder = ensure_cifar(root)
    images, labels = read_split(folder, "test")
    check_classes(folder, "test", labels, spec.test_size, "data.test_size")
    keep = subsample(labels, spec.test_size, seed)
    return _to_split(images[keep], labels[keep], device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W → float, standardized per channel."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


AUGMENT_CHUNK = 8192  # images augmented per batched op: bounds the index tensors (64 MB)


def augment(
    images: torch.Tensor,
    kind: str,
    *,
    padding: int,
    cutout: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batched augmentation of uint8 images on their own device; no per-image Python.

    Called once per epoch on the whole (shuffled) training set: a few tensor ops per chunk.
    """
    if kind == "none":
        return images
    if len(images) > AUGMENT_CHUNK:
        chunks = images.split(AUGMENT_CHUNK)
        return torch.cat([augment(c, kind, padding=padding, cutout=cutout, generator=generator)
                          for c in chunks])  # fmt: skip
    n, _, h, w = images.shape
    device = images.device

    def rand(*shape: int, high: int) -> torch.Tensor:
        return torch.randint(0, high, shape, device=device, generator=generator)

    if kind.startswith("crop") and padding > 0:
        images = _random_crop(images, padding, rand(n, high=2 * padding + 1),
                              rand(n, high=2 * padding + 1))  # fmt: skip
    flip = rand(n, high=2).bool().view(n, 1, 1, 1)
    images = torch.where(flip, images.flip(3), images)
    if kind.endswith("cutout"):
        images = _cutout(images, cutout, rand(n, high=h), rand(n, high=w))
    return images


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Where position `index` of a reflect-padded axis reads from (-1 → 1, size → size-2)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _random_crop(
    images: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor
) -> torch.Tensor:
    """Reflect-pad by `padding`, then cut each image's H×W window at its own offset (dy, dx).

    The padded image is never built: each output pixel's source is computed and gathered.
    """
    n, c, h, w = images.shape
    rows = _reflect(
        dy.view(n, 1, 1) - padding + torch.arange(h, device=images.device).view(1, h, 1), h
    )
    cols = _reflect(
        dx.view(n, 1, 1) - padding + torch.arange(w, device=images.device).view(1, 1, w), w
    )
    flat = (rows * w + cols).view(n, 1, h * w).expand(n, c, h * w)
    return images.flatten(2).gather(2, flat).view(n, c, h, w)


def _cutout(images: torch.Tensor, size: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Zero a size×size square centred at (cy, cx) in each image (clipped at the border)."""
    n, _, h, w = images.shape
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    top, left = (cy - size // 2).view(n, 1, 1), (cx - size // 2).view(n, 1, 1)
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images.masked_fill(inside.unsqueeze(1), 0)
