"""Shared fixtures: CIFAR-10-shaped data generated on the spot, and tiny study files."""

from __future__ import annotations

import pickle
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

TINY_STUDY = {
    "name": "tiny",
    "seed": 0,
    "trials": 4,
    "space": {
        "depth": ["vgg11", "vgg13", "vgg16", "vgg19"],
        "batch_norm": [True, False],
        "dropout": {"low": 0.0, "high": 0.5},
        "weight_decay": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
        "augment": ["none", "flip", "crop_flip", "crop_flip_cutout"],
        "optimizer": {
            "sgd": {"lr": {"low": 1.0e-3, "high": 0.5, "log": True}},
            "nesterov": {"lr": {"low": 1.0e-3, "high": 0.5, "log": True}},
            "adam": {"lr": {"low": 1.0e-5, "high": 3.0e-3, "log": True}},
            "adamw": {"lr": {"low": 1.0e-5, "high": 3.0e-3, "log": True}},
        },
    },
    "train": {"epochs": 2, "batch_size": 32, "width": 0.0625},
    "data": {"val_size": 60, "train_size": 120, "test_size": 80},
    "sampler": {"type": "tpe", "n_startup_trials": 2},
    "pruner": {"type": "median", "n_startup_trials": 1, "warmup_epochs": 0},
}


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy images whose mean colour depends on the class: learnable, yet not trivial."""
    palette = rng.integers(40, 216, size=(10, 3, 1, 1))
    noise = rng.normal(0, 40, size=(len(labels), 3, 32, 32))
    return np.clip(palette[labels] + noise, 0, 255).astype(np.uint8)


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": labels.tolist(),
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"{i}.png".encode() for i in range(len(images))],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_fake_cifar(root: Path, per_batch: int = 150, batches: int = 2, test: int = 100) -> Path:
    """The standard `cifar-10-batches-py` layout with `batches` training files and a test file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, batches + 1):
        labels = np.arange(per_batch) % 10
        write_batch(folder / f"data_batch_{i}", make_images(labels, rng), labels)
    labels = np.arange(test) % 10
    write_batch(folder / "test_batch", make_images(labels, rng), labels)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                  "frog", "horse", "ship", "truck")]  # fmt: skip
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, f, protocol=2)
    return root


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"))


def write_study(folder: Path, overrides: dict | None = None, name: str = "tiny") -> Path:
    """A tiny study file in `folder/studies/NAME.yaml`, with top-level sections overridden."""
    raw = {**TINY_STUDY, "name": name, **(overrides or {})}
    path = folder / "studies" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _pytest_signal_handlers() -> Iterator[None]:
    """`tuner.cli.main` installs tuner's handlers: each test leaves pytest's in place."""
    from .helpers import pristine_signals

    with pristine_signals():
        yield


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """tuner's signal handlers for one test; pytest's own and a clean state after it."""
    from tuner import interrupts

    from .helpers import pristine_signals

    with pristine_signals():
        interrupts.install()
        yield


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory):
    """One Optuna and one MLflow SQLite store for the tests that need real ones (an MLflow
    schema takes seconds to create); each test uses study and experiment names of its own."""
    from tuner.stores import resolve

    folder = tmp_path_factory.mktemp("mlruns")
    return resolve(
        mlruns=folder,
        storage=f"sqlite:///{folder}/optuna.db",
        tracking_uri=f"sqlite:///{folder}/mlflow.db",
    )


@pytest.fixture(scope="session")
def tracker(stores):
    from tuner.tracking import Tracker

    return Tracker(stores)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[Callable[[], str]]:
    """A PostgreSQL cluster of the session's, started on first use, for tests that read and
    write but never stop it: a function that gives a fresh database's URL each call. The
    tests that blip a server start their own."""
    from .servers import start_postgres

    try:
        server = start_postgres()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no PostgreSQL server could be started here: {exc}")
    try:
        yield server.create_database
    finally:
        server.remove()
