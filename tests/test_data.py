from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tuner import data
from tuner.errors import ConfigError, DataError
from tuner.spec import DataSpec

from .helpers import offline


def test_reads_the_standard_layout(fake_cifar: Path) -> None:
    folder = data.ensure_cifar(fake_cifar, download=False)
    images, labels = data.read_split(folder, "train")
    assert images.shape == (300, 3, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (300,) and set(labels) == set(range(10))
    test_images, _ = data.read_split(folder, "test")
    assert len(test_images) == 100
    # the batches folder itself is accepted too
    assert data.ensure_cifar(folder, download=False) == folder


def test_pixels_are_in_channel_major_order(tmp_path: Path) -> None:
    """CIFAR rows are 1024 red, 1024 green, then 1024 blue values."""
    folder = tmp_path / data.FOLDER
    folder.mkdir()
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)])
    with (folder / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": row[None].astype(np.uint8), b"labels": [3]}, f)
    images, labels = data.read_split(folder, "train")
    assert images[0, :, 5, 7].tolist() == [10, 20, 30] and labels.tolist() == [3]


def test_split_is_stratified_seeded_and_disjoint() -> None:
    labels = np.repeat(np.arange(10), 50)
    train, val = data.split_indices(labels, val_size=100, train_size=None, seed=1)
    assert len(val) == 100 and len(train) == 400
    assert not set(train) & set(val)
    assert set(Counter(labels[val]).values()) == {10}, "each class equally represented"
    again, _ = data.split_indices(labels, val_size=100, train_size=None, seed=1)
    other, _ = data.split_indices(labels, val_size=100, train_size=None, seed=2)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_train_size_caps_the_training_set_stratified() -> None:
    labels = np.repeat(np.arange(10), 50)
    train, val = data.split_indices(labels, val_size=100, train_size=200, seed=0)
    assert len(train) == 200 and set(Counter(labels[train]).values()) == {20}
    assert not set(train) & set(val)


def test_validation_larger_than_the_data_is_explained() -> None:
    with pytest.raises(ConfigError, match="val_size=5000 leaves no training images.*has 300"):
        data.split_indices(np.arange(300) % 10, val_size=5000, train_size=None, seed=0)


def test_load_train_val_puts_uint8_on_the_device(fake_cifar: Path) -> None:
    tv = data.load_train_val(fake_cifar, DataSpec(val_size=50), 0, torch.device("cpu"))
    assert len(tv.train) == 250 and len(tv.val) == 50
    assert tv.train.images.dtype == torch.uint8 and tv.train.labels.dtype == torch.int64


def test_test_split_is_separate_and_capped(fake_cifar: Path) -> None:
    test = data.load_test(fake_cifar, DataSpec(test_size=40), 0, torch.device("cpu"))
    assert len(test) == 40 and set(test.labels.tolist()) == set(range(10))


def test_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    folder = tmp_path / data.FOLDER
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with (folder / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"data_batch_1.*refusing to load builtins\.print"):
        data.read_split(folder, "train")


def test_offline_without_data_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as info:
        data.ensure_cifar(tmp_path / "nowhere")
    message = str(info.value)
    assert "download failed" in message and "name resolution" in message
    assert "--data-dir" in message and "TUNER_DATA_DIR" in message


@pytest.mark.parametrize(
    ("removed", "said"),
    [
        (["test_batch"], "holds data_batch_1, data_batch_2 but not test_batch"),
        (["data_batch_1", "data_batch_2"], "holds test_batch but no data_batch_N"),
    ],
)
def test_a_partial_copy_is_named_and_never_downloaded_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, removed: list[str], said: str
) -> None:
    """A folder that holds part of the release says which files it lacks; downloading the
    release into it would mix two copies (or overwrite the user's)."""
    import torchvision.datasets.utils as tv_utils

    from .conftest import write_fake_cifar

    folder = write_fake_cifar(tmp_path / "data") / data.FOLDER
    for name in removed:
        (folder / name).unlink()
    downloads = []

    def download(*args, **kwargs):
        downloads.append(args)
        raise OSError("this test is offline")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", download)
    monkeypatch.setattr(data, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    before = sorted(p.name for p in (tmp_path / "data").rglob("*"))
    with pytest.raises(DataError) as info:
        data.ensure_cifar(tmp_path / "data")
    message = str(info.value)
    assert "\n" not in message and f"{folder} {said}" in message
    assert not downloads, "a download was started into a partial copy"
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == before


def test_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNER_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert data.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("TUNER_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.resolve_data_dir(None) == tmp_path / "cache" / "tuner" / "cifar10"


def _images(n: int = 6) -> torch.Tensor:
    return torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8)


@pytest.mark.parametrize("kind", ["none", "flip", "crop_flip", "crop_flip_cutout"])
def test_augment_keeps_shape_and_dtype(kind: str) -> None:
    x = _images()
    out = data.augment(x, kind, padding=4, cutout=8, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_flip_mirrors_some_images_and_keeps_the_rest() -> None:
    x = _images(64)
    out = data.augment(x, "flip", padding=4, cutout=8, generator=torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, i.flip(2))) for o, i in zip(out, x, strict=True)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_crop_shifts_by_its_offset() -> None:
    x = _images(2)
    centre = torch.tensor([4, 4])
    assert torch.equal(data._random_crop(x, 4, centre, centre), x)
    shifted = data._random_crop(x, 4, torch.tensor([6, 6]), torch.tensor([4, 4]))
    assert torch.equal(shifted[:, :, :30], x[:, :, 2:])  # two rows down in the padded image


def test_cutout_zeroes_one_square() -> None:
    x = _images(2)
    out = data._cutout(x, 8, torch.tensor([16, 0]), torch.tensor([16, 0]))
    assert (out[0] == 0).all(0).sum() == 64  # a full 8×8 square inside the image
    assert (out[1] == 0).all(0).sum() == 16  # clipped at the corner: 4×4
    assert torch.equal(out[0, :, :12], x[0, :, :12])


def test_crop_matches_reflect_padding_then_slicing() -> None:
    x = _images(16)
    generator = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 9, (16,), generator=generator), torch.randint(0, 9, (16,))
    padded = torch.nn.functional.pad(x.float(), (4,) * 4, mode="reflect").to(torch.uint8)
    windows = zip(padded, dy, dx, strict=True)
    expected = torch.stack([p[:, y : y + 32, x_ : x_ + 32] for p, y, x_ in windows])
    assert torch.equal(data._random_crop(x, 4, dy, dx), expected)


def test_a_whole_epoch_is_augmented_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "AUGMENT_CHUNK", 5)
    x = _images(12)
    out = data.augment(x, "crop_flip_cutout", padding=4, cutout=8,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.shape == x.shape and not torch.equal(out, x)


class _Claims:
    """Pickles as numpy's own `_reconstruct` of an array this large, with none of its bytes."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __reduce__(self) -> tuple:
        return np._core.multiarray._reconstruct, (np.ndarray, self.shape, b"B")


class _Grows:
    """Pickles as `_codecs.encode(inner, "hex")`: each nesting doubles the bytes built."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __reduce__(self) -> tuple:
        import codecs

        return codecs.encode, (self.inner, "hex")


FORGED = ("pixels as shared lists", "an array larger than its file", "labels as shared lists",
          "bytes grown by a codec")  # fmt: skip


def forged_batch(kind: str, n: int) -> dict:
    """A batch of `n` images whose pickle is small (shared references, a claimed shape) but
    whose arrays, once built, take n × 3072 values or more."""
    if kind == "pixels as shared lists":  # the pickle holds the one row and n references to it
        row = [0] * data.PIXELS
        return {b"data": [row] * n, b"labels": [0] * n}
    if kind == "an array larger than its file":
        return {b"data": _Claims((n, data.PIXELS)), b"labels": [0] * n}
    if kind == "bytes grown by a codec":  # 64 bytes hex-encoded n times: 64 × 2**n bytes
        grown: object = b"a" * 64
        for _ in range(n):
            grown = _Grows(grown)
        return {b"data": grown, b"labels": [0]}
    labels = [0] * n  # n rows of n labels, n references to one list
    return {b"data": np.zeros((1, data.PIXELS), np.uint8), b"labels": [labels] * n}


def _bad_folder(tmp_path: Path, damage: str) -> Path:
    """The fake release, then one batch file damaged as `damage` says."""
    from .conftest import write_batch, write_fake_cifar

    root = write_fake_cifar(tmp_path / "bad")
    folder = root / data.FOLDER
    rng = np.random.default_rng(1)
    labels = np.arange(150) % 10
    images = rng.integers(0, 256, size=(150, 3, 32, 32)).astype(np.uint8)
    target = folder / "data_batch_2"
    if damage == "float pixels in [0, 1]":
        write_batch(target, images.astype(np.float32) / 255, labels)
    elif damage == "float labels":
        write_batch(target, images, labels.astype(np.float64) + 0.5)
    elif damage == "label 10":
        write_batch(target, images, np.where(labels == 3, 10, labels))
    elif damage == "empty batch":
        with target.open("wb") as f:
            pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, f)
    elif damage == "fewer labels than images":
        write_batch(target, images, labels[:-1])
    elif damage == "wrong image size":
        batch = {b"data": rng.integers(0, 256, size=(150, 3 * 28 * 28)).astype(np.uint8),
                 b"labels": labels.tolist()}  # fmt: skip
        with target.open("wb") as f:
            pickle.dump(batch, f)
    elif damage in FORGED:
        with target.open("wb") as f:
            # 150 images; a codec grows its bytes 2**n-fold: 8 (16 KB) says as much
            pickle.dump(forged_batch(damage, 8 if damage == FORGED[3] else 150), f)
    elif damage == "a class with one image":
        for name in ("data_batch_1", "data_batch_2"):
            kept = np.where(labels == 7, 8, labels)
            write_batch(folder / name, images, kept)
        write_batch(target, images[:1], np.array([7]))
    return root


BAD_DATA = {  # damage → the check the one-line message names
    "float pixels in [0, 1]": ("data_batch_2", "pixels are float32 in [0, 1], expected uint8"),
    "float labels": ("data_batch_2", "labels are float64, expected integers 0..9"),
    "label 10": ("data_batch_2", "label 10 (image 3) is outside 0..9; 15 such labels"),
    "empty batch": ("data_batch_2", "holds no images"),
    "fewer labels than images": ("data_batch_2", "150 images but 149 labels"),
    "wrong image size": ("data_batch_2", "data has shape (150, 2352), expected N×3072"),
    "a class with one image": ("cifar-10-batches-py", "hold 1 image(s) of class 7"),
    "pixels as shared lists": ("data_batch_2", "data is a list, expected a numpy array"),
    "an array larger than its file": ("data_batch_2", "that the file cannot hold"),
    "labels as shared lists": ("data_batch_2", "labels hold a list, expected integers 0..9"),
    "bytes grown by a codec": ("data_batch_2", "refusing _codecs.encode of a bytes as 'hex'"),
}


@pytest.mark.parametrize("damage", BAD_DATA, ids=list(BAD_DATA))
def test_bad_data_is_one_line_naming_the_file_and_the_check(tmp_path: Path, damage: str) -> None:
    root = _bad_folder(tmp_path, damage)
    name, check = BAD_DATA[damage]
    with pytest.raises(DataError) as info:
        data.load_train_val(root, DataSpec(val_size=50), 0, torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert name in message and check in message


def test_only_the_release_file_names_are_read(tmp_path: Path, fake_cifar: Path) -> None:
    """A stray copy of a batch would put copies of training images into validation."""
    import shutil

    folder = tmp_path / data.FOLDER
    shutil.copytree(fake_cifar / data.FOLDER, folder)
    shutil.copy(folder / "data_batch_1", folder / "data_batch_1.bak")
    shutil.copy(folder / "data_batch_2", folder / "data_batch_2~")
    images, _ = data.read_split(folder, "train")
    assert len(images) == 300
    tv = data.load_train_val(tmp_path, DataSpec(val_size=60), 0, torch.device("cpu"))
    train = {bytes(x) for x in tv.train.images.numpy()}
    assert not any(bytes(x) in train for x in tv.val.images.numpy()), "validation leaked"


@pytest.mark.parametrize(("key", "size"), [("val_size", 5), ("test_size", 3)])
def test_a_split_too_small_for_every_class_names_the_key(
    fake_cifar: Path, key: str, size: int
) -> None:
    spec = DataSpec(**{key: size})
    with pytest.raises(ConfigError, match=f"data.{key}={size} cannot hold one image of each"):
        if key == "test_size":
            data.load_test(fake_cifar, spec, 0, torch.device("cpu"))
        else:
            data.load_train_val(fake_cifar, spec, 0, torch.device("cpu"))


def _sklearn_split(labels, val_size, train_size, seed):
    """The split as tuner made it with scikit-learn, before it drew it itself."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=val_size, stratify=labels,
                                  random_state=seed, shuffle=True)  # fmt: skip
    if train_size is not None and train_size < len(train):
        train, _ = train_test_split(train, train_size=train_size, stratify=labels[train],
                                    random_state=seed)  # fmt: skip
    return np.sort(train), np.sort(val)


@pytest.mark.parametrize("seed", [0, 1, 7, 2**31 - 1])
@pytest.mark.parametrize(
    ("classes", "n", "val_size", "train_size"),
    [(10, 50_000, 5_000, None), (10, 50_000, 5_000, 1_000), (10, 4_068, 1_000, 2_005),
     (3, 997, 101, None), (7, 1_000, 333, 50)],
)  # fmt: skip
def test_the_split_is_scikit_learns_draw_for_draw(seed, classes, n, val_size, train_size) -> None:
    """Every study made so far is bound to its split: drawing it without scikit-learn (whose
    import costs each worker 1.6 s) must give the same images, also for uneven classes."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(classes, n, p=rng.dirichlet(np.ones(classes) * 3))
    ours = data.split_indices(labels, val_size, train_size, seed)
    theirs = _sklearn_split(labels, val_size, train_size, seed)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(n), train_size=val_size, stratify=labels,
                                 random_state=seed)  # fmt: skip
    assert np.array_equal(data.subsample(labels, val_size, seed), np.sort(chosen))


def test_a_split_too_small_for_its_classes_is_explained() -> None:
    with pytest.raises(ConfigError, match="at least 2 images of each of the 10 classes"):
        data.split_indices(np.arange(300) % 10, val_size=5, train_size=None, seed=0)


READ_CAPPED = """
import re, resource, sys
from pathlib import Path
from tuner import data  # torch and numpy mapped before the cap
from tuner.errors import DataError
status = open("/proc/self/status").read()
base = int(re.search(r"VmSize:\\s+(\\d+)", status).group(1)) << 10
resource.setrlimit(resource.RLIMIT_AS, (base + (256 << 20), resource.RLIM_INFINITY))
for folder in sys.argv[1:]:
    try:
        data.read_split(Path(folder), "train")
    except DataError as exc:
        print(exc)
"""


@pytest.mark.slow
def test_a_pickle_bomb_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """Batches of a few hundred KB whose arrays would take gigabytes are refused with one line
    in a process that has 256 MiB of address space to spare: nothing large was built."""
    import subprocess
    import sys

    # 2.5, 3, 0.8 and 4 GB
    sizes = {FORGED[0]: 100_000, FORGED[1]: 1_000_000, FORGED[2]: 10_000, FORGED[3]: 26}
    folders = []
    for i, (kind, n) in enumerate(sizes.items()):
        folder = tmp_path / str(i) / data.FOLDER
        folder.mkdir(parents=True)
        with (folder / "data_batch_1").open("wb") as f:
            pickle.dump(forged_batch(kind, n), f)
        assert (folder / "data_batch_1").stat().st_size < 3 << 20
        folders.append(str(folder))
    out = subprocess.run([sys.executable, "-c", READ_CAPPED, *folders],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(sizes), out.stdout
    for line, folder, kind in zip(lines, folders, sizes, strict=True):
        assert line.startswith(f"{folder}/data_batch_1: ")
        assert BAD_DATA[kind][1] in line
