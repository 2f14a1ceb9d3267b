"""Images and labels checked and brought to tuner's layout (uint8 N×C×H×W, int64 N): the pixel
check a CIFAR batch and a user's loader share, and the contract of a user's loader, which
returns what `keras.datasets.*.load_data()` returns. Each failure is one `DataError` line that
starts with `where` (a file, or the loader)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tuner.errors import DataError

CHANNELS = (1, 3, 4)  # grayscale, RGB, RGBA
RETURNS = "((x_train, y_train), (x_test, y_test)), as keras.datasets' load_data() returns"


def to_uint8(where: str, data: np.ndarray) -> np.ndarray:
    """Pixels as uint8: integers within 0..255 are taken, floats refused (with the hint that
    catches images scaled to [0, 1])."""
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{where}: pixels are {data.dtype} holding NaN or infinite values, "
                        "expected uint8 in 0..255")  # fmt: skip
    if data.dtype.kind == "f":
        low, high = float(data.min()), float(data.max())
        scaled = 0 <= low and high <= 1
        found = "in [0, 1]" if scaled else f"from {low:g} to {high:g}"
        hint = " (images scaled to [0, 1] would train as black: save them as uint8)"
        raise DataError(
            f"{where}: pixels are {data.dtype} {found}, expected uint8 in 0..255"
            + (hint if scaled else "")
        )
    if data.dtype.kind not in "iu":
        raise DataError(f"{where}: pixels are {data.dtype}, expected uint8 in 0..255")
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise DataError(
            f"{where}: pixel values run from {data.min()} to {data.max()}, expected 0..255"
        )
    return data.astype(np.uint8, copy=False)


@dataclass(frozen=True)
class Arrays:
    """A loader's data, checked: uint8 N×C×H×W images, int64 labels in 0..classes-1."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: int


def from_loader(where: str, returned: object) -> Arrays:
    """What a loader returned, checked against its contract."""
    if not (_pair(returned) and all(_pair(part) for part in returned)):
        raise DataError(f"{where}: returned a {type(returned).__name__}, expected {RETURNS}")
    (x_train, y_train), (x_test, y_test) = returned
    train_images = _images(f"{where}: x_train", x_train)
    test_images = _images(f"{where}: x_test", x_test)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{where}: training images are {_shape(train_images)} but test images are "
            f"{_shape(test_images)} (channels×height×width); they must be alike"
        )
    train_labels = _labels(f"{where}: y_train", y_train, len(train_images))
    test_labels = _labels(f"{where}: y_test", y_test, len(test_images))
    classes = _classes(where, train_labels, test_labels)
    return Arrays(train_images, train_labels, test_images, test_labels, classes)


def _pair(value: object) -> bool:
    return isinstance(value, tuple | list) and len(value) == 2


def _shape(images: np.ndarray) -> str:
    return "×".join(map(str, images.shape[1:]))


def _array(where: str, value: object, expected: str) -> np.ndarray:
    """A numpy array, or a torch tensor's values as one (lists are refused: nested lists of
    shared rows would be built whole)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise DataError(f"{where} is a {type(value).__name__}, expected a numpy array {expected}")
    return value


def _images(where: str, value: object) -> np.ndarray:
    """N×H×W (grayscale), N×H×W×C (channels last) or N×C×H×W with C in 1, 3, 4 → N×C×H×W."""
    layouts = "N×H×W, N×H×W×C or N×C×H×W with C in 1, 3 or 4"
    images = _array(where, value, f"of uint8 images, {layouts}")
    if images.ndim == 4 and images.shape[1] in CHANNELS and images.shape[3] in CHANNELS:
        raise DataError(
            f"{where} has shape {images.shape}: channels first or last cannot be told apart "
            "(both could be channels); give images larger than 4 pixels a side"
        )
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[3] in CHANNELS:
        images = images.transpose(0, 3, 1, 2)
    elif not (images.ndim == 4 and images.shape[1] in CHANNELS and images.shape[3] > 4):
        raise DataError(f"{where} has shape {images.shape}, expected {layouts}")
    if len(images) == 0 or images.size == 0:
        raise DataError(f"{where} has shape {images.shape}: it holds no pixels")
    return np.ascontiguousarray(to_uint8(where, images))


def _labels(where: str, value: object, n: int) -> np.ndarray:
    """Integers, one per image: a vector, or an N×1 column (as some loaders return)."""
    labels = _array(where, value, "of integer labels, one per image")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{where} has shape {labels.shape}, expected N or N×1 (one per image)")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where} are {labels.dtype}, expected integers (class numbers)")
    if len(labels) != n:
        raise DataError(f"{where} holds {len(labels)} labels for {n} images; give one per image")
    return labels.astype(np.int64)


def _classes(where: str, train: np.ndarray, test: np.ndarray) -> int:
    """K = the largest training label + 1; every label in 0..K-1, every class trained on."""
    if train.min() < 0 or test.min() < 0:
        raise DataError(
            f"{where}: labels run from {min(train.min(), test.min())}, expected 0..K-1"
        )
    classes = int(train.max()) + 1
    if classes > len(train):  # before counting them: a label of 10**9 would count 8 GB
        raise DataError(
            f"{where}: y_train holds label {classes - 1} for {len(train)} images; every class "
            f"0..K-1 needs a training image: number the classes 0..K-1 with none left out"
        )
    if classes < 2:
        raise DataError(f"{where}: y_train holds class 0 alone; a classifier needs 2 or more")
    if test.max() >= classes:
        raise DataError(
            f"{where}: y_test holds label {test.max()} but y_train's largest is {classes - 1}; "
            f"labels must be 0..{classes - 1}, each present in y_train"
        )
    counts = np.bincount(train, minlength=classes)
    absent = np.flatnonzero(counts == 0)
    if len(absent):
        raise DataError(
            f"{where}: y_train has no image of class {absent[0]} (of 0..{classes - 1}; "
            f"{len(absent)} absent in all); number the classes 0..K-1 with none left out"
        )
    return classes


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation on the 0..255 scale, in float64, from each
    channel's histogram of 256 values (no float copy of the images: 50,000 CIFAR-sized
    images would take 1.2 GB as float64)."""
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        n = counts.sum()
        mean = counts @ values / n
        means.append(float(mean))
        stds.append(float(np.sqrt(max(counts @ (values - mean) ** 2 / n, 0.0))))
    return tuple(means), tuple(stds)
