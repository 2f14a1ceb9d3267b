"""Data sets to tensors: CIFAR-10 and CIFAR-100 (their python pickles), Fashion-MNIST (its IDX
files) or a user's loader (arrays); the checks; the seeded split; batched augmentation.

Every split carries its `DataInfo` (classes, image shape, statistics). The test split is read
only by `tuner ensemble`.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from tuner import _arrays, _fashion, plugins
from tuner.errors import ConfigError, DataError
from tuner.spec import DataSpec, TrainSpec

FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = 10  # CIFAR-10's
# per-channel statistics of the CIFAR-10 training set, on the 0..255 scale
MEAN = (125.31, 122.95, 113.87)
STD = (62.99, 62.09, 66.70)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))  # the release's names, no others
TEST_FILE = "test_batch"
PIXELS = 3 * 32 * 32  # values per image in a batch's `data` rows (red, green, blue planes)


@dataclass(frozen=True)
class DataInfo:
    """What a network, the normalisation and the augmentation need to know of a data set."""

    name: str  # "cifar10", "cifar100", "fashion-mnist", or a loader's "package.module:function"
    classes: int
    shape: tuple[int, int, int]  # channels, height, width (pixels)
    mean: tuple[float, ...]  # per channel, on the 0..255 scale
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    train_images: int = 0  # in the training split (a release's; a loader's as it returned)


def _numbered(classes: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(classes))


CIFAR10_INFO = DataInfo("cifar10", CLASSES, (3, 32, 32), MEAN, STD,
                        ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                         "truck"), 50_000)  # fmt: skip
# fine class names are read from the release's `meta` where it is there (`describe`)
CIFAR100_INFO = DataInfo("cifar100", 100, (3, 32, 32), (129.30, 124.07, 112.43),
                         (68.17, 65.39, 70.42), _numbered(100), 50_000)  # fmt: skip
FASHION_MNIST_INFO = DataInfo("fashion-mnist", 10, (1, 28, 28), (72.94,), (90.02,),
                              ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                               "Shirt", "Sneaker", "Bag", "Ankle boot"), 60_000)  # fmt: skip
KNOWN = {info.name: info for info in (CIFAR10_INFO, CIFAR100_INFO, FASHION_MNIST_INFO)}


@dataclass(frozen=True)
class Release:
    """A CIFAR python release: where it is downloaded from, and the files it holds."""

    name: str  # for messages
    folder: str  # the folder its archive unpacks to
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_file: str
    train_pattern: str  # the training files, as a message names them
    label_key: bytes  # the labels in each pickled dict
    classes: int


CIFAR10 = Release("CIFAR-10", FOLDER, URL, MD5, TRAIN_FILES, TEST_FILE, "data_batch_N",
                  b"labels", CLASSES)  # fmt: skip
# its fine labels: the 100 classes (the 20 coarse ones are not read)
CIFAR100 = Release("CIFAR-100", "cifar-100-python",
                   "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                   "eb9058c3a382ffc7106e4002c42a8d85", ("train",), "test", "train",
                   b"fine_labels", 100)  # fmt: skip


def default_data_dir(spec: DataSpec | None = None) -> Path:
    """`~/.cache/tuner/<set>` (XDG_CACHE_HOME respected); for a loader, which reads no
    folder, `~/.cache/tuner`."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuner"
    if spec is None:
        return cache / "cifar10"
    return cache / spec.set if spec.set else cache


def resolve_data_dir(
    cli_value: str | os.PathLike[str] | None, spec: DataSpec | None = None
) -> Path:
    """--data-dir, else TUNER_DATA_DIR, else a folder for the data set under the user's cache."""
    chosen = cli_value or os.environ.get("TUNER_DATA_DIR")
    return Path(chosen).expanduser() if chosen else default_data_dir(spec)


def describe(spec: DataSpec, root: Path) -> DataInfo:
    """What the data set is: for a known one without reading its images (CIFAR-100's class
    names come from its small `meta` file where it is there); a loader is called (once a
    process: `load_*` then reuse its checked arrays)."""
    if spec.loader is not None:
        return _loaded(spec.loader).info
    if spec.set == "cifar100":
        meta = batches_dir(root, CIFAR100) / "meta"
        if meta.is_file():
            return replace(CIFAR100_INFO, class_names=_fine_names(meta))
    return KNOWN[str(spec.set)]


def ensure(spec: DataSpec, root: Path) -> Path | str:
    """Where the data set is read from, downloading a known one that is missing: called once
    before workers start, so that they do not all download it at once. A loader is not called
    here (its arrays would stay in this process): its `package.module:function` is returned."""
    if spec.loader is not None:
        return spec.loader
    if spec.set == "fashion-mnist":
        return _fashion.ensure(root)
    return ensure_cifar(root, release=_release(spec))


def _release(spec: DataSpec) -> Release:
    return CIFAR100 if spec.set == "cifar100" else CIFAR10


def batches_dir(root: Path, release: Release = CIFAR10) -> Path:
    """Accept both the folder that holds `cifar-10-batches-py` and that folder itself."""
    return root if root.name == release.folder else root / release.folder


def ensure_cifar(root: Path, *, download: bool = True, release: Release = CIFAR10) -> Path:
    """Return the release's folder (`cifar-10-batches-py`), downloading the release only where
    that folder does not exist: a partial copy is named, never downloaded into (two copies
    would mix)."""
    folder = batches_dir(root, release)
    if folder.exists():
        _check_whole(folder, release)
        return folder
    if not download:
        raise DataError(_missing_message(folder, release, "downloading is turned off"))
    print(f"{release.name} not found at {folder}; downloading {release.url} …", flush=True)
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(release.url, download_root=str(folder.parent),
                                     md5=release.md5)  # fmt: skip
    except Exception as exc:  # offline, proxy, disk full: all end the same way for the user
        why = f"the download failed ({exc})"
        raise DataError(_missing_message(folder, release, why)) from None
    return folder


def _check_whole(folder: Path, release: Release) -> None:
    """The test file and at least one training file (a development subset of CIFAR-10 may
    hold fewer than the release's five batches), else one line naming what is missing."""
    train = [name for name in release.train_files if (folder / name).is_file()]
    test = (folder / release.test_file).is_file()
    if train and test:
        return
    if train:
        held = f"holds {_train_names(train, release)} but not {release.test_file}"
    elif test:
        held = f"holds {release.test_file} but no {release.train_pattern}"
    else:
        held = f"holds no {release.name} batch"
    raise DataError(
        f"{folder} {held}: tuner does not download into a folder that exists; add the "
        f"missing files from {release.url}, or remove the folder for tuner to download the "
        "release"
    )


def _train_names(names: list[str], release: Release) -> str:
    """`data_batch_1..5` for a run of three or more, else the names."""
    first = release.train_files.index(names[0])
    if len(names) > 2 and tuple(names) == release.train_files[first : first + len(names)]:
        return f"{names[0]}..{names[-1].rsplit('_', 1)[1]}"
    return ", ".join(names)


def _missing_message(folder: Path, release: Release, why: str) -> str:
    return (
        f"{release.name} is not at {folder} and {why}.\n"
        "Point tuner at a local copy of the python release (the folder that holds "
        f"'{release.folder}/'), with --data-dir DIR or TUNER_DATA_DIR=DIR, or download "
        f"{release.url} and unpack it there."
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


def _unpickle(path: Path, what: str) -> object:
    """A CIFAR pickle through `_ArraysOnly`; `what` names it in the message (`CIFAR-10 batch`)."""
    try:
        with path.open("rb") as f:
            return _ArraysOnly(f, os.fstat(f.fileno()).st_size).load()
    except Exception as exc:
        raise DataError(f"{path}: not a readable {what} ({exc})") from None


def _read_batch(path: Path, release: Release = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    """One batch file, checked: uint8 pixels N×3072, integer labels in 0..classes-1, as many
    as images. Each failure is one `DataError` naming the file and the check."""
    batch = _unpickle(path, f"{release.name} batch")
    key = release.label_key
    if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
        raise DataError(
            f"{path}: not a {release.name} batch (no 'data' and '{key.decode()}' entries)"
        )
    images = _check_pixels(path, batch[b"data"])
    labels = _check_labels(path, batch[key], release.classes)
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
    return _arrays.to_uint8(str(path), data).reshape(-1, 3, 32, 32)


def _check_labels(path: Path, raw: object, classes: int = CLASSES) -> np.ndarray:
    """A list of ints (as the release holds) or an array; numbers only, checked before numpy
    builds them: a list of shared lists would be built whole."""
    expected = f"expected integers 0..{classes - 1}"
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
        raise DataError(f"{path}: labels are {labels.dtype}, {expected}")
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(outside):
        first = outside[0]
        raise DataError(
            f"{path}: label {labels[first]} (image {first}) is outside 0..{classes - 1}; "
            f"{len(outside)} such labels in all"
        )
    return labels.astype(np.int64, copy=False)


def read_split(
    folder: Path, split: str, release: Release = CIFAR10
) -> tuple[np.ndarray, np.ndarray]:
    """`data_batch_1..5` (train) or `test_batch` (test), or CIFAR-100's `train` or `test`:
    uint8 N×3×32×32 and int64 N. Only those names are read: a stray `data_batch_1.bak` would
    leak copies into the split."""
    if split == "train":
        paths = [folder / name for name in release.train_files if (folder / name).is_file()]
    elif split == "test":
        test = folder / release.test_file
        paths = [test] if test.is_file() else []
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not paths:
        raise DataError(
            f"{folder}: no {split} batches found "
            f"(expected {release.train_pattern}, {release.test_file})"
        )
    parts = [_read_batch(p, release) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _fine_names(path: Path) -> tuple[str, ...]:
    """CIFAR-100's 100 fine class names, from its `meta` file."""
    meta = _unpickle(path, "CIFAR-100 meta file")
    names = meta.get(b"fine_label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == CIFAR100.classes
            and all(isinstance(n, bytes | str) for n in names)):  # fmt: skip
        raise DataError(
            f"{path}: not CIFAR-100's meta file (no list of 100 fine_label_names); replace it "
            f"with the release's ({CIFAR100.url}) or remove it"
        )
    return tuple(n.decode("latin-1") if isinstance(n, bytes) else n for n in names)


@dataclass(frozen=True)
class _Loaded:
    info: DataInfo
    arrays: _arrays.Arrays


# a user's loader's checked arrays, per process, by `package.module:function`: `describe`
# calls it and the `load_*` that follow reuse what it returned (a loader may take minutes)
_LOADED: dict[str, _Loaded] = {}


def _loaded(target: str) -> _Loaded:
    """The loader `target` called (once a process), and what it returned, checked."""
    if target not in _LOADED:
        function = plugins.load(target, "data.loader")
        where = f"data.loader {target!r}"
        try:
            returned = function()
        except Exception as exc:  # the user's code: whatever it raises is one line
            why = " ".join(str(exc).split())
            raise DataError(f"{where}: it raised {type(exc).__name__}: {why}") from None
        arrays = _arrays.from_loader(where, returned)
        mean, std = _arrays.channel_stats(arrays.train_images)
        # a channel of one value (std 0) would be divided by zero: it is only centred
        std = tuple(s if s > 0 else 1.0 for s in std)
        c, h, w = arrays.train_images.shape[1:]
        info = DataInfo(target, arrays.classes, (c, h, w), mean, std, _numbered(arrays.classes),
                        len(arrays.train_labels))  # fmt: skip
        _LOADED[target] = _Loaded(info, arrays)
    return _LOADED[target]


def check_classes(
    where: str, labels: np.ndarray, carve: int | None, key: str, classes: int
) -> None:
    """Every one of the `classes` has images enough for a stratified split that carves `carve`
    images out (the study file's `key`); `where` names the images (`FOLDER: the train
    batches`)."""
    counts = np.bincount(labels, minlength=classes)
    if counts.min() < 2:
        cls = int(counts.argmin())
        raise DataError(
            f"{where} hold {counts[cls]} image(s) of class {cls}; a stratified split needs at "
            f"least 2 of each of the {classes} classes (counts: {_counts(counts)})"
        )
    if carve is not None and carve < min(len(labels), classes):
        raise ConfigError(
            f"{key}={carve} cannot hold one image of each of the {classes} classes; "
            f"raise {key} in the study file"
        )


def _counts(counts: np.ndarray) -> str:
    """The counts per class for a message; cut after 20 classes (CIFAR-100 has 100)."""
    shown = counts.tolist()
    return str(shown) if len(shown) <= 20 else f"{str(shown[:20])[:-1]}, … ({len(shown)} classes)]"


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
    info: DataInfo = CIFAR10_INFO

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TrainVal:
    train: Split
    val: Split
    source: Path | str  # the folder read, or a loader's "package.module:function"

    @property
    def info(self) -> DataInfo:
        return self.train.info

    def merged(self) -> TrainVal:
        """Train on both, hold nothing out (a refit: the configuration is chosen already)."""
        images = torch.cat([self.train.images, self.val.images])
        labels = torch.cat([self.train.labels, self.val.labels])
        empty = Split(images[:0], labels[:0], self.info)
        return TrainVal(Split(images, labels, self.info), empty, self.source)


@dataclass(frozen=True)
class _Part:
    """One split of a data set as read, checked, on the host."""

    source: Path | str  # the folder, or the loader
    where: str  # the images, for messages: "FOLDER: the train batches"
    images: np.ndarray  # uint8 N×C×H×W
    labels: np.ndarray  # int64 N
    info: DataInfo

    def to(self, index: np.ndarray, device: torch.device) -> Split:
        images, labels = torch.from_numpy(self.images[index]), torch.from_numpy(self.labels[index])
        return Split(images.to(device), labels.to(device), self.info)


def _read(root: Path, spec: DataSpec, split: str) -> _Part:
    """The `train` or `test` split of the data set `spec` names, checked."""
    if spec.loader is not None:
        loaded = _loaded(spec.loader)
        a = loaded.arrays
        images, labels = (a.train_images, a.train_labels) if split == "train" else (
            a.test_images, a.test_labels)  # fmt: skip
        where = f"data.loader {spec.loader!r}: the {split} arrays"
        return _Part(spec.loader, where, images, labels, loaded.info)
    if spec.set == "fashion-mnist":
        folder = _fashion.ensure(root)
        images, labels = _fashion.read(folder, split)
        return _Part(folder, f"{folder}: the {split} files", images, labels, FASHION_MNIST_INFO)
    release = _release(spec)
    folder = ensure_cifar(root, release=release)
    images, labels = read_split(folder, split, release)
    info = describe(spec, folder)
    return _Part(folder, f"{folder}: the {split} batches", images, labels, info)


def load_train_val(root: Path, spec: DataSpec, seed: int, device: torch.device) -> TrainVal:
    part, train, val = _split_training(root, spec, seed)
    return TrainVal(train=part.to(train, device), val=part.to(val, device), source=part.source)


def load_val(root: Path, spec: DataSpec, seed: int, device: torch.device) -> Split:
    """The validation split alone (the same images as `load_train_val`'s): the training
    images are not copied to the device."""
    part, _, val = _split_training(root, spec, seed)
    return part.to(val, device)


def _split_training(root: Path, spec: DataSpec, seed: int) -> tuple[_Part, np.ndarray, np.ndarray]:
    """The training images, checked, and the indices of the seeded, stratified split."""
    part = _read(root, spec, "train")
    classes = part.info.classes
    check_classes(part.where, part.labels, spec.val_size, "data.val_size", classes)
    check_classes(part.where, part.labels, spec.train_size, "data.train_size", classes)
    train, val = split_indices(part.labels, spec.val_size, spec.train_size, seed)
    return part, train, val


def load_test(root: Path, spec: DataSpec, seed: int, device: torch.device) -> Split:
    part = _read(root, spec, "test")
    if spec.test_size is not None and spec.test_size < len(part.labels):  # a stratified subset
        check_classes(part.where, part.labels, spec.test_size, "data.test_size",
                      part.info.classes)  # fmt: skip
    return part.to(subsample(part.labels, spec.test_size, seed), device)


def normalize(images: torch.Tensor, info: DataInfo = CIFAR10_INFO) -> torch.Tensor:
    """uint8 N×C×H×W → float, standardized per channel with the data set's statistics."""
    c = len(info.mean)
    if images.shape[1] != c:  # broadcasting would turn one channel into three silently
        raise ValueError(f"images have {images.shape[1]} channels but {info.name} has {c}")
    mean = torch.tensor(info.mean, device=images.device).view(1, c, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, c, 1, 1)
    return (images.float() - mean) / std


def check_augment(train: TrainSpec, augments: Iterable[str], info: DataInfo) -> None:
    """Each augmentation in `augments` fits the images: a crop reflect-pads by
    `train.crop_padding`, which needs padding below the image's side; a cutout square must fit
    in the image. A `ConfigError` names the key, the value, the images and the fix."""
    side = min(info.shape[1:])
    images = f"{info.name}'s images ({info.shape[1]}×{info.shape[2]} pixels)"
    for kind in dict.fromkeys(augments):
        if kind.startswith("crop") and train.crop_padding >= side:
            raise ConfigError(
                f"train.crop_padding={train.crop_padding} does not fit {images}: augment "
                f"{kind!r} pads by reflection, which needs padding below {side}; lower "
                f"train.crop_padding in the study file, or leave {kind} out of space.augment"
            )
        if kind.endswith("cutout") and train.cutout_size > side:
            raise ConfigError(
                f"train.cutout_size={train.cutout_size} is larger than {images}; lower "
                f"train.cutout_size to {side} or less in the study file, or leave {kind} out "
                "of space.augment"
            )


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
