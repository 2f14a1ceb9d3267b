"""CIFAR-100, Fashion-MNIST and a user's loader behind `tuner.data`'s one API, on data
generated here."""

from __future__ import annotations

import gzip
import sys
import tracemalloc
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tuner import _fashion, data
from tuner.errors import ConfigError, DataError
from tuner.spec import DataSpec, TrainSpec

from .conftest import write_fake_cifar
from .helpers import (
    CIFAR100_FOLDER,
    idx_bytes,
    offline,
    write_cifar100,
    write_fashion_mnist,
    write_idx,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_loader_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test calls its loaders anew; `plugins.load` adds the current folder to sys.path."""
    monkeypatch.setattr(data, "_LOADED", {})
    monkeypatch.setattr(sys, "path", list(sys.path))


# a loader's module: arrays of 4 classes, 20×20 RGB, channels last (as Keras gives them);
# `load` returns RETURNS, and counts its calls
MODULE = """
import numpy as np
import torch

rng = np.random.default_rng(0)
Y, YT = np.arange(120) % 4, np.arange(40) % 4
X = rng.integers(0, 256, (120, 20, 20, 3), dtype=np.uint8)
XT = rng.integers(0, 256, (40, 20, 20, 3), dtype=np.uint8)
CALLS = []


def load():
    CALLS.append(1)
    return {returns}
"""
GOOD = "(X, Y), (XT, YT)"


@pytest.fixture
def loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A function that writes a loader module returning `returns` into the current folder (a
    fresh one, under a name of its own) and gives the study file's `package.module:function`."""
    monkeypatch.chdir(tmp_path)
    names: list[str] = []

    def write(returns: str = GOOD) -> str:
        name = f"tuner_test_loader_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(MODULE.replace("{returns}", returns))
        names.append(name)
        return f"{name}:load"

    yield write
    for name in names:
        sys.modules.pop(name, None)


SETS = ["cifar10", "cifar100", "fashion-mnist", "loader"]
EXPECTED = {  # set → (shape, classes, first class name, training images in the files)
    "cifar10": ((3, 32, 32), 10, "plane", 300),
    "cifar100": ((3, 32, 32), 100, "fine0", 300),
    "fashion-mnist": ((1, 28, 28), 10, "T-shirt/top", 200),
    "loader": ((3, 20, 20), 4, "0", 120),
}


def _source(kind: str, tmp_path: Path, loader) -> tuple[DataSpec, Path]:
    """The study file's data section and the data folder for data set `kind`."""
    root = tmp_path / "data"
    if kind == "cifar10":
        return DataSpec(val_size=100, test_size=40), write_fake_cifar(root)
    if kind == "cifar100":
        return DataSpec(set="cifar100", val_size=100), write_cifar100(root)
    if kind == "fashion-mnist":
        write_fashion_mnist(root / "fashion-mnist")
        return DataSpec(set="fashion-mnist", val_size=50), root
    return DataSpec(loader=loader(), val_size=20), root


@pytest.mark.parametrize("kind", SETS)
def test_each_set_loads_with_its_shape_classes_and_info(kind: str, tmp_path: Path, loader) -> None:
    spec, root = _source(kind, tmp_path, loader)
    shape, classes, first_name, n = EXPECTED[kind]
    tv = data.load_train_val(root, spec, 0, CPU)
    test = data.load_test(root, spec, 0, CPU)
    info = tv.info
    assert (info.name, info.shape, info.classes) == (spec.name, shape, classes)
    assert len(info.mean) == len(info.std) == shape[0] and info.class_names[0] == first_name
    assert len(info.class_names) == classes
    assert len(tv.train) + len(tv.val) == n and len(tv.val) == spec.val_size
    for split in (tv.train, tv.val, test):
        assert split.info == info and split.images.dtype == torch.uint8
        assert tuple(split.images.shape[1:]) == shape and split.labels.dtype == torch.int64
    assert set(tv.train.labels.tolist()) == set(range(classes))
    assert data.describe(spec, root) == info
    assert tv.merged().info == info and data.load_val(root, spec, 0, CPU).info == info
    assert data.normalize(tv.train.images, info).shape == tv.train.images.shape


def test_describe_reads_no_file_for_the_known_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no(*args, **kwargs):
        raise AssertionError("describe read or fetched a file")

    for name in ("ensure_cifar", "read_split", "_unpickle"):
        monkeypatch.setattr(data, name, no)
    monkeypatch.setattr(_fashion, "ensure", no)
    nowhere = tmp_path / "nowhere"
    for name in ("cifar10", "cifar100", "fashion-mnist"):
        assert data.describe(DataSpec(set=name), nowhere) == data.KNOWN[name]
    assert not nowhere.exists()
    assert data.CIFAR100_INFO.class_names[99] == "99"


def test_resolve_data_dir_has_a_folder_per_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TUNER_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name in ("cifar10", "cifar100", "fashion-mnist"):
        assert data.resolve_data_dir(None, DataSpec(set=name)) == tmp_path / "tuner" / name
    assert data.resolve_data_dir(None) == tmp_path / "tuner" / "cifar10"
    assert data.resolve_data_dir("here", DataSpec(set="cifar100")) == Path("here")


def test_a_loader_is_called_once_a_process(loader) -> None:
    target = loader()
    spec = DataSpec(loader=target, val_size=20)
    info = data.describe(spec, Path("unused"))
    data.load_train_val(Path("unused"), spec, 0, CPU)
    data.load_test(Path("unused"), spec, 0, CPU)
    module = sys.modules[target.split(":")[0]]
    assert len(module.CALLS) == 1
    pixels = module.X.astype(np.float64)
    assert np.allclose(info.mean, pixels.mean(axis=(0, 1, 2)))
    assert np.allclose(info.std, pixels.std(axis=(0, 1, 2)))


ACCEPTED = {  # what a loader returns → the image shape tuner sees
    "channels last": (GOOD, (3, 20, 20)),
    "N×H×W": ("(X[..., 0], Y), (XT[..., 0], YT)", (1, 20, 20)),
    "N×C×H×W": ("(X.transpose(0, 3, 1, 2), Y), (XT.transpose(0, 3, 1, 2), YT)", (3, 20, 20)),
    "torch tensors": ("(torch.from_numpy(X), torch.from_numpy(Y)), "
                      "(torch.from_numpy(XT), torch.from_numpy(YT))", (3, 20, 20)),
    "label columns, int64 pixels": ("(X.astype(np.int64), Y[:, None]), (XT, YT[:, None])",
                                    (3, 20, 20)),
}  # fmt: skip


@pytest.mark.parametrize("case", ACCEPTED)
def test_a_loader_may_return_keras_layouts(loader, case: str) -> None:
    returns, shape = ACCEPTED[case]
    spec = DataSpec(loader=loader(returns), val_size=20)
    tv = data.load_train_val(Path("unused"), spec, 0, CPU)
    assert tuple(tv.train.images.shape[1:]) == shape == tv.info.shape
    assert tv.info.classes == 4 and len(tv.train) == 100
    test = data.load_test(Path("unused"), spec, 0, CPU)  # all of them, in their order
    x_test = sys.modules[spec.loader.split(":")[0]].XT  # channels last
    expected = torch.from_numpy(x_test).permute(0, 3, 1, 2)[:, : shape[0]]
    assert torch.equal(test.images, expected), "pixels moved"


REFUSED = {  # what a loader returns → what its one line says
    "two arrays": ("X, Y", "returned a tuple, expected ((x_train, y_train), (x_test, y_test))"),
    "nothing": ("None", "returned a NoneType, expected"),
    "floats in [0, 1]": ("(X / 255, Y), (XT / 255, YT)",
                         "x_train: pixels are float64 in [0, 1], expected uint8 in 0..255 "
                         "(images scaled to [0, 1] would train as black"),
    "pixels above 255": ("(X.astype(np.int64) + 10, Y), (XT, YT)",
                         "x_train: pixel values run from 10 to 265, expected 0..255"),
    "a missing class": ("(X, np.where(Y == 2, 3, Y)), (XT, YT)",
                        "y_train has no image of class 2 (of 0..3"),
    "one class": ("(X, Y * 0), (XT, YT * 0)", "holds class 0 alone"),
    "a test label unseen": ("(X, Y), (XT, YT + 1)", "y_test holds label 4 but y_train's largest"),
    "a negative label": ("(X, Y - 1), (XT, YT)", "labels run from -1, expected 0..K-1"),
    "a label short": ("(X, Y[:-1]), (XT, YT)", "y_train holds 119 labels for 120 images"),
    "float labels": ("(X, Y * 1.0), (XT, YT)", "y_train are float64, expected integers"),
    "unlike test images": ("(X, Y), (XT[:, :10], YT)",
                           "training images are 3×20×20 but test images are 3×10×20"),
    "two channels": ("(X[..., :2], Y), (XT[..., :2], YT)",
                     "x_train has shape (120, 20, 20, 2), expected N×H×W, N×H×W×C"),
    "a list": ("(X.tolist(), Y), (XT, YT)", "x_train is a list, expected a numpy array"),
    "a raise": ("1 / 0", "it raised ZeroDivisionError: division by zero"),
    "ambiguous layout": ("(X[:, :3, :4, :3], Y), (XT[:, :3, :4, :3], YT)",
                         "channels first or last cannot be told apart"),
    "NaN pixels": ("(np.full(X.shape, np.nan), Y), (XT, YT)", "holding NaN or infinite"),
    "a huge label": ("(X, np.where(Y == 3, 10**9, Y)), (XT, YT)",
                     "y_train holds label 1000000000 for 120 images"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED)
def test_a_loader_that_breaks_its_contract_is_one_line_naming_it(loader, case: str) -> None:
    returns, said = REFUSED[case]
    target = loader(returns)
    with pytest.raises(DataError) as info:
        data.load_train_val(Path("unused"), DataSpec(loader=target, val_size=20), 0, CPU)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"data.loader {target!r}: ")
    assert said in message


def test_a_loader_that_cannot_be_imported_is_named(loader) -> None:
    loader()  # the current folder is a fresh one
    spec = DataSpec(loader="tuner_test_no_such_module:load")
    with pytest.raises(ConfigError, match="data.loader 'tuner_test_no_such_module:load': cannot"):
        data.describe(spec, Path("unused"))


def test_a_loaders_test_split_is_checked_per_class_where_a_subset_is_drawn(loader) -> None:
    """Every class twice at least in the test arrays where `test_size` draws a stratified
    subset of them; the whole test split is scored as it is."""
    spec = DataSpec(loader=loader("(X, Y), (XT, np.where(YT == 1, 0, YT))"), test_size=10)
    with pytest.raises(DataError, match="the test arrays hold 0 image.s. of class 1"):
        data.load_test(Path("unused"), spec, 0, CPU)
    whole = data.load_test(Path("unused"), spec.model_copy(update={"test_size": None}), 0, CPU)
    assert 1 not in whole.labels.tolist()


# Fashion-MNIST's files


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_is_found_in_each_layout(tmp_path: Path, layout: str, gz: bool) -> None:
    write_fashion_mnist(tmp_path / layout, gz=gz)
    assert _fashion.ensure(tmp_path, download=False) == tmp_path / layout
    images, labels = _fashion.read(tmp_path / layout, "test")
    assert images.shape == (60, 1, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(60)]


def _damaged(folder: Path, damage: str) -> Path:
    """The files, then one of them damaged as `damage` says: the damaged file."""
    write_fashion_mnist(folder, n_train=60, gz=damage != "a raw file shorter than its header")
    images = np.zeros((60, 28, 28))
    labels = np.arange(60) % 10
    name = folder / "train-images-idx3-ubyte"
    if damage == "a raw file shorter than its header":
        return write_idx(name, idx_bytes(images, dims=(61, 28, 28)), gz=False)
    if damage == "a gzip shorter than its header":
        return write_idx(name, idx_bytes(images, dims=(61, 28, 28)), gz=True)
    if damage == "a header claiming billions":
        return write_idx(name, idx_bytes(images, dims=(2**31, 28, 28)), gz=True)
    if damage == "labels in the images file":
        return write_idx(name, idx_bytes(labels), gz=True)
    if damage == "label 10":
        path = folder / "train-labels-idx1-ubyte"
        return write_idx(path, idx_bytes(np.where(labels == 3, 10, labels)), gz=True)
    if damage == "images of 27×27":
        return write_idx(name, idx_bytes(np.zeros((60, 27, 27))), gz=True)
    if damage == "a label short":
        return write_idx(folder / "train-labels-idx1-ubyte", idx_bytes(labels[:-1]), gz=True)
    if damage == "not a gzip":
        (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    elif damage == "an empty file":
        (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b""))
    return folder / "train-images-idx3-ubyte.gz"


BAD_IDX = {  # damage → what the one line says
    "a raw file shorter than its header": "header claims 47,824 bytes of data but the file "
    "holds 47,040",
    "a gzip shorter than its header": "header claims 47,824 bytes of data (61×28×28) but the "
    "file holds 47,040 bytes",
    "a header claiming billions": "its header claims 2,147,483,648 images, expected 1..100,000",
    "labels in the images file": "magic number 0x00000801, expected 0x00000803",
    "label 10": "label 10 (image 3) is outside 0..9; 6 such labels",
    "images of 27×27": "images of 27×27 pixels, expected N×28×28",
    "a label short": "59 labels but train-images-idx3-ubyte.gz holds 60 images",
    "not a gzip": "not a readable IDX file",
    "an empty file": "magic number 0 bytes, expected 0x00000803",
}


@pytest.mark.parametrize("damage", BAD_IDX)
def test_a_damaged_idx_file_is_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    path = _damaged(tmp_path / "fashion-mnist", damage)
    spec = DataSpec(set="fashion-mnist", val_size=20)
    with pytest.raises(DataError) as info:
        data.load_train_val(tmp_path, spec, 0, CPU)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert BAD_IDX[damage] in message


def test_a_raw_header_that_lies_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_idx(
        tmp_path / "x", idx_bytes(np.zeros((5, 28, 28)), dims=(90_000, 28, 28)), False
    )

    def read(*args):
        raise AssertionError("the data of a lying header was read")

    monkeypatch.setattr(_fashion, "_read_at_most", read)
    with pytest.raises(
        DataError, match="claims 70,560,000 bytes of data but the file holds 3,920"
    ):
        _fashion.read_idx(path, "images")


def test_a_gzip_bomb_is_refused_after_inflating_what_the_header_claims(tmp_path: Path) -> None:
    """60 labels, then 64 MB of zeros in 64 KB of gzip: no more than the header's 60 bytes
    (and one chunk) is inflated."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip stream
    parts = [squeeze.compress(idx_bytes(np.arange(60) % 10))]
    parts += [squeeze.compress(bytes(1 << 20)) for _ in range(64)] + [squeeze.flush()]
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"".join(parts))
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(
            DataError, match="claims 60 bytes of data .60. but the file holds more"
        ):
            _fashion.read_idx(path, "labels")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak:,} bytes were allocated"


@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_a_partial_fashion_mnist_is_named_and_never_downloaded_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    import torchvision.datasets.utils as tv_utils

    folder = write_fashion_mnist(tmp_path / layout)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    downloads: list[tuple] = []
    monkeypatch.setattr(tv_utils, "download_url", lambda *a, **k: downloads.append(a))
    with pytest.raises(DataError) as info:
        data.ensure(DataSpec(set="fashion-mnist"), tmp_path)
    message = str(info.value)
    assert "\n" not in message and not downloads
    assert f"{folder} holds train-images-idx3-ubyte" in message
    assert "but not t10k-labels-idx1-ubyte" in message


def test_a_failed_download_says_where_to_point_tuner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(DataError) as info:
        data.load_train_val(tmp_path, DataSpec(set="fashion-mnist"), 0, CPU)
    message = str(info.value)
    assert "\n" not in message and "download failed" in message and "name resolution" in message
    assert "--data-dir" in message and "TUNER_DATA_DIR" in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert list(tmp_path.iterdir()) == [], "a partial download was left behind"


def test_a_download_lands_whole_with_torchvisions_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils
    from torchvision.datasets import FashionMNIST

    release = write_fashion_mnist(tmp_path / "release")
    fetched: dict[str, str] = {}

    def download(url: str, root: str, filename: str, md5: str) -> None:
        fetched[filename] = md5
        (Path(root) / filename).write_bytes((release / filename).read_bytes())

    monkeypatch.setattr(tv_utils, "download_url", download)
    root = tmp_path / "data"
    assert data.ensure(DataSpec(set="fashion-mnist"), root) == root / "fashion-mnist"
    assert fetched == dict(FashionMNIST.resources)
    assert sorted(p.name for p in root.iterdir()) == ["fashion-mnist"]
    assert data.describe(DataSpec(set="fashion-mnist"), root).shape == (1, 28, 28)


# CIFAR-100


@pytest.mark.parametrize(
    ("removed", "said"),
    [("test", "holds train but not test"), ("train", "holds test but no train")],
)
def test_a_partial_cifar100_is_named_and_never_downloaded_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, removed: str, said: str
) -> None:
    import torchvision.datasets.utils as tv_utils

    folder = write_cifar100(tmp_path) / CIFAR100_FOLDER
    (folder / removed).unlink()
    downloads: list[tuple] = []
    monkeypatch.setattr(tv_utils, "download_and_extract_archive",
                        lambda *a, **k: downloads.append(a))  # fmt: skip
    with pytest.raises(DataError) as info:
        data.load_train_val(tmp_path, DataSpec(set="cifar100", val_size=100), 0, CPU)
    message = str(info.value)
    assert "\n" not in message and f"{folder} {said}" in message and not downloads


def test_cifar100_reads_fine_labels_from_its_own_folder_too(tmp_path: Path) -> None:
    folder = write_cifar100(tmp_path, meta=False) / CIFAR100_FOLDER
    spec = DataSpec(set="cifar100", val_size=100)
    test = data.load_test(folder, spec, 0, CPU)  # the release's folder itself
    assert set(test.labels.tolist()) == set(range(100)), "coarse labels would be 0..19"
    assert test.info == data.CIFAR100_INFO  # no meta: the classes are numbered


def test_cifar100_label_out_of_range_names_the_file(tmp_path: Path) -> None:
    import pickle

    folder = write_cifar100(tmp_path) / CIFAR100_FOLDER
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [5, 100]}
    (folder / "train").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=r"/train: label 100 \(image 1\) is outside 0..99"):
        data.load_train_val(tmp_path, DataSpec(set="cifar100"), 0, CPU)


# what fits the images


CIFAR = data.CIFAR10_INFO
TINY = data.DataInfo("pkg.mod:fn", 4, (1, 8, 12), (0.0,), (1.0,), ("0", "1", "2", "3"))


@pytest.mark.parametrize(
    ("info", "settings", "augments", "said"),
    [
        (CIFAR, {"crop_padding": 16, "cutout_size": 32}, ["crop_flip_cutout"], None),
        (TINY, {"crop_padding": 7, "cutout_size": 8}, ["crop_flip_cutout", "none"], None),
        (TINY, {"crop_padding": 16, "cutout_size": 32}, ["none", "flip"], None),
        (TINY, {"crop_padding": 8}, ["flip", "crop_flip"],
         "train.crop_padding=8 does not fit pkg.mod:fn's images (8×12 pixels): augment "
         "'crop_flip' pads by reflection, which needs padding below 8"),
        (TINY, {"cutout_size": 9, "crop_padding": 2}, ["crop_flip_cutout"],
         "train.cutout_size=9 is larger than pkg.mod:fn's images (8×12 pixels); lower "
         "train.cutout_size to 8 or less"),
    ],
)  # fmt: skip
def test_check_augment_names_a_setting_the_images_cannot_take(
    info: data.DataInfo, settings: dict, augments: list[str], said: str | None
) -> None:
    train = TrainSpec(epochs=1, **settings)
    if said is None:
        data.check_augment(train, augments, info)
        return
    with pytest.raises(ConfigError) as error:
        data.check_augment(train, augments, info)
    assert "\n" not in str(error.value) and said in str(error.value)


def test_one_channel_is_normalized_and_augmented() -> None:
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    info = data.FASHION_MNIST_INFO
    out = data.normalize(x, info)
    assert out.shape == x.shape
    assert torch.allclose(out, (x.float() - 72.94) / 90.02)
    generator = torch.Generator().manual_seed(0)
    augmented = data.augment(x, "crop_flip_cutout", padding=4, cutout=8, generator=generator)
    assert augmented.shape == x.shape and augmented.dtype == torch.uint8
    with pytest.raises(ValueError, match="images have 1 channels but cifar10 has 3"):
        data.normalize(x)


def test_a_split_keeps_cifar10_as_its_default_info() -> None:
    split = data.Split(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2))
    assert split.info == data.CIFAR10_INFO and data.CIFAR10_INFO.class_names[0] == "plane"
