"""`tuner bench overhead`: what tuner's bookkeeping costs around the training, and how that grows
with the study. For each size N it fills a throwaway study (SQLite stores, as the defaults) with
N completed 15-epoch trials and their MLflow runs, then times a real `study run` whose training
loop is a replay of GPU-paced epochs (`Replay`, handed to the run as its trainer): its wall time
against the sum of its epochs, each trial's time outside its epochs (the `overhead_seconds`
every trial logs), `ask`, and `study status` as a process. The bare training loop is timed in
the same run as the reference."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import yaml
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tuner import _optuna
from tuner.data import FOLDER
from tuner.models import VGG, VGGConfig
from tuner.records import (
    EPOCHS_TAG,
    RECORDS,
    ROLE_TAG,
    RUN_ID_ATTR,
    SAMPLER_SEED_ATTR,
    SESSION_ATTR,
    SETTINGS_ATTR,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_NUMBER_TAG,
    WORKER_ATTR,
    Outcome,
    Role,
)
from tuner.space import TrialParams, suggest
from tuner.spec import StudySpec, parse
from tuner.stores import Stores, resolve
from tuner.study.session import RunRequest, run_study
from tuner.study.setup import create, open_study, settings_digest
from tuner.tracking import StudyRuns, Tracker
from tuner.tracking.runs import flatten
from tuner.train import EpochStats, TrainConfig, TrainResult, train

log = logging.getLogger(__name__)
GPU_EPOCH_SECONDS = 0.25  # a VGG epoch on tuner's path on an H100 (0.2–0.3 s, estimated)
VAL_IMAGES = 5000  # the real study's validation split: its predictions are saved per trial
TRAIN_IMAGES = 1000
FILL_SEED = 0

# The real study's settings, with the architecture pinned to VGG16-BN: every timed trial
# saves the same 59 MB of weights, the figure the targets are stated for.
STUDY = {
    "seed": 0,
    "trials": 20,
    "space": {
        "depth": ["vgg16"],
        "batch_norm": [True],
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
    "train": {"epochs": 15, "batch_size": 512, "compile": "off"},
    "data": {"val_size": VAL_IMAGES, "train_size": TRAIN_IMAGES, "test_size": 100},
    "sampler": {"type": "tpe", "n_startup_trials": 8},
    "pruner": {"type": "hyperband", "min_epochs": 1, "reduction_factor": 3},
    "limits": {"heartbeat": 10, "grace": 60},
}


@dataclass(frozen=True)
class OverheadConfig:
    sizes: tuple[int, ...]  # completed trials in the study before timing
    trials: int  # timed trials per size
    asks: int  # timed `ask` + `suggest` per size
    epoch_seconds: float  # the replay's pace: a GPU epoch
    folder: Path | None  # where the throwaway stores go; None: a temporary folder


@dataclass(frozen=True)
class OverheadRow:
    size: int
    trials: int  # timed
    epochs_s: float  # the replayed epochs' time, summed: what a GPU would have trained
    wall_s: float  # the whole `study run`, from its call to its return
    start_s: float  # of which: until its first trial trains
    end_s: float  # and: after its last trial is recorded (the study's pictures, the summary)
    trial_ms: float  # median per trial outside its epochs (its `overhead_seconds`)
    epoch_ms: float  # mean time in tuner's per-epoch callback (MLflow, Optuna, the pruner)
    ask_ms: float  # median `ask` + `suggest`
    status_s: float  # `tuner study status` as a whole process (median of 3, after a first)
    fill_s: float  # how long the study took to fill (not a target)

    @property
    def over(self) -> float:
        """The wall time's share above the epochs'."""
        return self.wall_s / self.epochs_s - 1

    @property
    def trial_share(self) -> float:
        """A trial's time outside its epochs, against its epochs' time."""
        return self.trial_ms / 1000 / (self.epochs_s / self.trials)


@dataclass(frozen=True)
class Reference:
    epoch_ms: float  # the bare training loop, no callback: median epoch
    images: int
    what: str


def run_overhead(cfg: OverheadConfig) -> tuple[list[OverheadRow], Reference]:
    with _folder(cfg.folder) as root:
        data = write_data(root / "data")
        log.info("timing the bare training loop (the reference) …")
        reference = bare_loop(data)
        rows = [measure(root / f"n{n}", data, n, cfg) for n in cfg.sizes]
    return rows, reference


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The timed `study run` says nothing (its lines cost the same; they would bury the table)."""
    logger = logging.getLogger("tuner")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _folder(folder: Path | None) -> Iterator[Path]:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="tuner-overhead-") as tmp:
        yield Path(tmp)


def bench_spec(size: int) -> StudySpec:
    return parse({"name": f"overhead-{size}", **STUDY}, source="tuner bench overhead")


def measure(folder: Path, data: Path, size: int, cfg: OverheadConfig) -> OverheadRow:
    spec = bench_spec(size)
    stores = resolve(folder / "mlruns", *_local_urls(folder))
    studies = folder / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    (studies / f"{spec.name}.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    log.info(f"N = {size:,}: filling a study with {size:,} completed trials …")
    started = time.perf_counter()
    with _quiet():
        fill(spec, stores, size)
    fill_s = time.perf_counter() - started
    log.info(f"N = {size:,}: filled in {fill_s:.0f} s; timing {cfg.trials} trials of "
             f"{spec.train.epochs} epochs, `ask`, `study status` …")  # fmt: skip
    replay = Replay(spec.train.epochs, cfg.epoch_seconds)
    request = RunRequest(devices=(torch.device("cpu"),), trials=cfg.trials, data_dir=data,
                         trainer=replay)  # fmt: skip
    with _quiet():
        started = time.perf_counter()
        run_study(spec, stores, request)
        wall = time.perf_counter() - started
        ended = time.time()
    client = Tracker(stores).client
    timed = open_study(spec, stores).get_trials(deepcopy=False)[size:]
    overheads = [
        client.get_run(t.user_attrs[RUN_ID_ATTR]).data.metrics["overhead_seconds"] for t in timed
    ]
    return OverheadRow(
        size=size,
        trials=cfg.trials,
        epochs_s=replay.trained,
        wall_s=wall,
        start_s=(replay.first or started) - started,
        end_s=ended - max(t.datetime_complete.timestamp() for t in timed),
        trial_ms=1000 * statistics.median(overheads),
        epoch_ms=1000 * statistics.mean(replay.callbacks),
        ask_ms=1000 * time_asks(spec, stores, cfg.asks),
        status_s=time_status(spec, stores, folder),
        fill_s=fill_s,
    )


def _local_urls(folder: Path) -> tuple[str, str]:
    """The defaults' SQLite files, whatever TUNER_STORAGE and MLFLOW_TRACKING_URI say."""
    mlruns = (folder / "mlruns").resolve()
    return f"sqlite:///{mlruns}/optuna.db", f"sqlite:///{mlruns}/mlflow.db"


# -- filling a study ----------------------------------------------------------------------------


def fill(spec: StudySpec, stores: Stores, size: int) -> None:
    """`size` completed trials of `spec.train.epochs` epochs, as `study run` would leave them:
    parameters, intermediate values and attributes in Optuna, and a finished nested run with
    every epoch's metrics in MLflow. Drawn at random in memory, then stored in one go."""
    created = create(spec, stores)
    tracker, runs = created.tracker, created.runs
    memory = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.RandomSampler(seed=FILL_SEED)
    )
    rng = np.random.default_rng(FILL_SEED)
    epochs = spec.train.epochs
    for number in range(size):
        trial = memory.ask()
        params = suggest(trial, spec.space)
        curve = np.sort(rng.uniform(0.1, 0.8, epochs))  # below the replay's: it is promoted
        run_id = _filled_run(tracker, runs, spec, number, params, curve)
        for epoch, acc in enumerate(curve, 1):
            trial.report(float(acc), epoch)
        attrs = {
            RUN_ID_ATTR: run_id,
            WORKER_ATTR: "filled:0",
            SESSION_ATTR: "filled",
            SAMPLER_SEED_ATTR: FILL_SEED,
            SETTINGS_ATTR: settings_digest(spec),
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        memory.tell(trial, float(curve[-1]))
    open_study(spec, stores).add_trials(memory.get_trials(deepcopy=False))


def _filled_run(
    tracker: Tracker, runs: StudyRuns, spec: StudySpec, number: int, params: TrialParams,
    curve: Any,
) -> str:  # fmt: skip
    """A finished trial run as `study run` leaves one, in three calls instead of its dozens."""
    tags = {MLFLOW_PARENT_RUN_ID: runs.parent_run_id, ROLE_TAG: Role.TRIAL,
            STUDY_TAG: spec.name, TRIAL_NUMBER_TAG: str(number),
            STATE_TAG: RECORDS[Outcome.COMPLETE].word, EPOCHS_TAG: str(len(curve))}  # fmt: skip
    run = tracker.client.create_run(
        runs.experiment_id, tags=tags, run_name=f"{number:04d} {params.label()}"
    )
    stamp = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), stamp, epoch)
        for epoch, acc in enumerate(curve, 1)
        for key, value in _epoch_metrics(acc).items()
    ]
    metrics.append(Metric("final_val_acc", float(curve[-1]), stamp, 0))
    logged = {**params.as_dict(), **flatten("", spec.trial_settings())}
    tracker.client.log_batch(
        run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in logged.items()]
    )
    tracker.client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _epoch_metrics(acc: float) -> dict[str, float]:
    return {"train_loss": 2 - 2 * acc, "val_loss": 2.1 - 2 * acc, "val_acc": acc,
            "lr": 0.01, "epoch_seconds": GPU_EPOCH_SECONDS}  # fmt: skip


# -- timing the real path -----------------------------------------------------------------------


@dataclass
class Replay:
    """A training loop that trains nothing: each epoch takes `pace` seconds, as a GPU's would
    (the training thread waits for it), then goes to tuner's per-epoch callback, which is
    timed; each better than the filled trials', so that every rung promotes it and it
    completes; VGG16-BN's weights (59 MB) come out of it, as the real study's would."""

    epochs: int
    pace: float
    first: float | None = None  # perf_counter when the first trial began to train
    trained: float = 0.0  # the epochs' own time, summed
    callbacks: list[float] = field(default_factory=list)  # each epoch's callback, seconds

    @functools.cached_property
    def result(self) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        weights = VGG(VGGConfig("vgg16", True, 0.0, 1.0)).state_dict()
        return weights, np.full((VAL_IMAGES, 10), 0.1, np.float32)

    def __call__(self, model: Any, data: Any, config: TrainConfig, on_epoch: Any,
                 between_steps: Any) -> TrainResult:  # fmt: skip
        """The signature of `tuner.train.train`."""
        weights, probs = self.result
        if self.first is None:
            self.first = time.perf_counter()
        history = []
        for epoch in range(1, self.epochs + 1):
            began = time.perf_counter()
            time.sleep(self.pace)  # the GPU trains; the training thread waits for it
            self.trained += time.perf_counter() - began
            stats = EpochStats(epoch, 0.5, 0.6, 0.9 + epoch / 1000, 0.01, self.pace)
            tick = time.perf_counter()
            on_epoch(stats)
            self.callbacks.append(time.perf_counter() - tick)
            history.append(stats)
        return TrainResult(tuple(history), probs, weights)


def time_asks(spec: StudySpec, stores: Stores, asks: int) -> float:
    """The median `ask` + `suggest` (the sampler's work on the filled study); each asked trial
    is then failed, which the next ask's sampler skips."""
    study = open_study(spec, stores)
    times = []
    for _ in range(asks):
        tick = time.perf_counter()
        trial = _optuna.ask(study)
        suggest(trial, spec.space)
        times.append(time.perf_counter() - tick)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return statistics.median(times)


def time_status(spec: StudySpec, stores: Stores, folder: Path, times: int = 3) -> float:
    """`tuner study status NAME` as a user runs it, the median of `times`: a new process,
    imports and all, after a first run that is not timed (Python's bytecode written, as on a
    user's machine: PYTHONDONTWRITEBYTECODE is dropped)."""
    drop = ("TUNER_STORAGE", "MLFLOW_TRACKING_URI", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    command = [sys.executable, "-m", "tuner", "study", "status", spec.name, "--mlruns", "mlruns"]
    seconds = []
    for _ in range(times + 1):
        tick = time.perf_counter()
        subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
        seconds.append(time.perf_counter() - tick)
    return statistics.median(seconds[1:])


# -- the reference: the bare training loop ------------------------------------------------------


def bare_loop(data: Path, epochs: int = 4) -> Reference:
    """tuner's training loop with a callback that does nothing: a small VGG on the bench's
    images, on the CPU (the GPU epoch the shares are stated against is `GPU_EPOCH_SECONDS`)."""
    from tuner.data import load_train_val
    from tuner.spec import DataSpec

    split = load_train_val(data, DataSpec(val_size=500, train_size=TRAIN_IMAGES, test_size=100),
                           0, torch.device("cpu"))  # fmt: skip
    arch = VGGConfig("vgg11", True, 0.0, 0.125)
    config = TrainConfig(epochs=epochs, batch_size=128, optimizer="nesterov", lr=0.02,
                         weight_decay=5e-4, momentum=0.9, schedule="onecycle",
                         warmup_fraction=0.2, label_smoothing=0.0, augment="crop_flip",
                         crop_padding=4, cutout_size=8, seed=0)  # fmt: skip
    result = train(VGG(arch), split, config, lambda stats: None)
    seconds = [s.seconds for s in result.history[1:]]  # the first warms up
    what = f"VGG11-BN ×{arch.width} on {len(split.train)} images, CPU"
    return Reference(1000 * statistics.median(seconds), len(split.train), what)


def write_data(root: Path) -> Path:
    """Random images in CIFAR-10's layout, as many as the bench's study reads (the content does
    not change what bookkeeping costs)."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    count = VAL_IMAGES + TRAIN_IMAGES
    for name, n in (("data_batch_1", count), ("test_batch", 100)):
        labels = (np.arange(n) % 10).tolist()
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": images, b"labels": labels}, f, protocol=2)
    return root
