"""Fashion-MNIST's four IDX files: found (three layouts), downloaded where none are, and parsed
strictly, so that a file that lies about its size is refused before anything is allocated."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tuner.errors import DataError

NAME = "Fashion-MNIST"
FOLDER = "fashion-mnist"  # where tuner downloads it, under the data folder
FILES = {  # (split, kind) → the release's file name; each may also be `NAME.gz`
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # 0x08: uint8; last byte: dimensions
SIDE = 28  # pixels; images are 1×28×28
# the release holds 60,000 + 10,000 images: a header that claims more is refused before its
# data is read, else a gzip of zeros a few MB large could make us inflate gigabytes
MAX_ITEMS = 100_000
CHUNK = 1 << 20  # bytes inflated per read: memory grows only as real data arrives


def candidates(root: Path) -> list[Path]:
    """Where the files are looked for: the folder itself, tuner's download folder, and
    torchvision's layout."""
    return [root, root / FOLDER, root / "FashionMNIST" / "raw"]


def _found(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def ensure(root: Path, *, download: bool = True) -> Path:
    """The folder that holds all four files, downloading the release into `root/fashion-mnist`
    only where no folder holds any of them: a partial copy is named, never downloaded into."""
    for folder in candidates(root):
        held = [name for name in FILES.values() if _found(folder, name)]
        if len(held) == len(FILES):
            return folder
        if held:
            missing = [name for name in FILES.values() if name not in held]
            raise DataError(
                f"{folder} holds {', '.join(held)} but not {', '.join(missing)}: tuner does not "
                "download into a folder that holds part of Fashion-MNIST; add the missing "
                "files (raw or .gz), or remove them for tuner to download the release"
            )
    if not download:
        raise DataError(missing_message(root, "downloading is turned off"))
    return _download(root / FOLDER)


def missing_message(root: Path, why: str) -> str:
    names = ", ".join(FILES.values())
    where = ", ".join(str(c) for c in candidates(root))
    return (
        f"{NAME} is not at {root} and {why}: point tuner at a local copy with --data-dir DIR "
        f"or TUNER_DATA_DIR=DIR, a folder holding {names} (each raw or .gz); looked in {where}"
    )


def _resources() -> tuple[list[str], list[tuple[str, str]]]:
    """torchvision's mirrors and (file, md5) pairs: the checksums are theirs, not copied."""
    from torchvision.datasets import FashionMNIST

    return list(FashionMNIST.mirrors), list(FashionMNIST.resources)


def _download(target: Path) -> Path:
    """All four files into a temporary folder, renamed to `target` once whole: an interrupted
    download leaves no partial copy behind."""
    from torchvision.datasets.utils import download_url

    mirrors, resources = _resources()
    print(f"{NAME} not found; downloading it from {mirrors[0]} into {target} …", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=target.parent))
    try:
        for filename, md5 in resources:
            _download_one(download_url, mirrors, filename, md5, temporary)
        os.replace(temporary, target)
    except Exception as exc:  # offline, proxy, disk full, a bad checksum: one line for all
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(missing_message(target.parent, f"the download failed ({why})")) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def _download_one(download_url, mirrors: list[str], filename: str, md5: str, to: Path) -> None:
    """One file, from the first mirror that gives it whole (torchvision checks the md5)."""
    for i, mirror in enumerate(mirrors):
        try:
            download_url(f"{mirror}{filename}", root=str(to), filename=filename, md5=md5)
            return
        except Exception:
            if i == len(mirrors) - 1:
                raise


def read(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`train` or `t10k`'s images (uint8 N×1×28×28) and labels (int64 N, 0..9), checked."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_path, labels_path = _path(folder, split, "images"), _path(folder, split, "labels")
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels but {images_path.name} holds {len(images)} "
            "images; the two files must come from one release"
        )
    outside = np.flatnonzero(labels > 9)
    if len(outside):
        first = outside[0]
        raise DataError(
            f"{labels_path}: label {labels[first]} (image {first}) is outside 0..9; "
            f"{len(outside)} such labels in all"
        )
    return images.reshape(-1, 1, SIDE, SIDE), labels.astype(np.int64)


def _path(folder: Path, split: str, kind: str) -> Path:
    path = _found(folder, FILES[split, kind])
    if path is None:
        raise DataError(f"{folder}: no {FILES[split, kind]} (raw or .gz)")
    return path


def read_idx(path: Path, kind: str) -> np.ndarray:
    """One IDX file of uint8 `images` (N×28×28) or `labels` (N), raw or gzipped. Its data must
    be exactly as long as its header says; each failure is one `DataError` naming the file."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            dims = _header(f, path, kind)
            claimed = math.prod(dims)  # bytes: one per value
            if path.suffix != ".gz":  # the size is known: refuse a lying header unread
                _check_size(path, 4 + 4 * len(dims), claimed)
            body = _read_at_most(f, claimed + 1)  # one more byte tells a longer file
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable IDX file ({exc})") from None
    if len(body) != claimed:
        held = "more" if len(body) > claimed else f"{len(body):,} bytes"
        raise DataError(
            f"{path}: its header claims {claimed:,} bytes of data ({'×'.join(map(str, dims))}) "
            f"but the file holds {held}; the file is damaged or not from the release"
        )
    return np.frombuffer(bytes(body), np.uint8).reshape(dims)


def _header(f: BinaryIO, path: Path, kind: str) -> tuple[int, ...]:
    """The magic number and the dimensions, checked against what `kind` must be."""
    head = f.read(4)
    expected = MAGIC[kind]
    magic = int.from_bytes(head, "big") if len(head) == 4 else None
    if magic != expected:
        found = f"0x{magic:08x}" if magic is not None else f"{len(head)} bytes"
        raise DataError(
            f"{path}: magic number {found}, expected 0x{expected:08x} (IDX {kind} of uint8); "
            "check that the file is the one its name says"
        )
    ndim = expected & 0xFF
    raw = f.read(4 * ndim)
    if len(raw) != 4 * ndim:
        raise DataError(
            f"{path}: the header ends after {4 + len(raw)} bytes, expected {4 + 4 * ndim}"
        )
    dims = struct.unpack(f">{ndim}I", raw)
    shape = f"N×{SIDE}×{SIDE}" if kind == "images" else "N"
    if kind == "images" and dims[1:] != (SIDE, SIDE):
        raise DataError(f"{path}: images of {dims[1]}×{dims[2]} pixels, expected {shape}")
    if not 0 < dims[0] <= MAX_ITEMS:
        raise DataError(
            f"{path}: its header claims {dims[0]:,} {kind}, expected 1..{MAX_ITEMS:,} "
            f"({NAME} holds 70,000)"
        )
    return dims


def _check_size(path: Path, header: int, claimed: int) -> None:
    held = path.stat().st_size - header
    if held != claimed:
        raise DataError(
            f"{path}: its header claims {claimed:,} bytes of data but the file holds {held:,}; "
            "the file is damaged or not from the release"
        )


def _read_at_most(f: BinaryIO, limit: int) -> bytearray:
    """Up to `limit` bytes, a chunk at a time (a gzip stream is inflated no further)."""
    body = bytearray()
    while len(body) < limit:
        chunk = f.read(min(CHUNK, limit - len(body)))
        if not chunk:
            break
        body += chunk
    return body
