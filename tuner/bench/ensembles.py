"""`tuner bench ensembles`: does choosing an ensemble pay? For each seed, a whole study of the
study file's space (small networks, the given data), then greedy selection against the top-K
average against the best single trial, each with and without flip TTA, on the test images;
the mean and spread over the seeds."""

from __future__ import annotations

import contextlib
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tuner import spec as spec_module
from tuner.ensemble import EnsembleReport, EnsembleRequest, evaluate
from tuner.errors import TunerError
from tuner.spec import StudySpec
from tuner.stores import Stores, resolve, sqlite_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsembleBenchConfig:
    study: str  # the study file whose space and baselines are searched
    seeds: tuple[int, ...]
    trials: int
    epochs: int
    width: float
    batch_size: int
    top: int
    val_size: int
    train_size: int | None
    test_size: int | None
    device: torch.device
    jobs: int = 1  # worker processes of each study (`tuner study run --jobs`)
    folder: Path | None = None  # keep the stores here (default: a temporary folder)


@dataclass(frozen=True)
class SeedRow:
    """One seed's study and its three ways to use it, on the test images."""

    seed: int
    completed: int  # trials the ensembles chose from
    test_images: int
    single: float  # the trial with the best validation accuracy, alone
    single_flip: float
    average: float  # the top-K by validation accuracy, equally weighted
    average_flip: float
    greedy: float  # greedy selection with replacement on the validation log-loss
    greedy_flip: float
    greedy_members: int
    greedy_weights: str  # `12:0.4 3:0.2 …`
    study_seconds: float
    # test log-loss (plain): what greedy minimises on the validation images, and a steadier
    # measure than accuracy on a thousand test images
    single_loss: float = float("nan")
    average_loss: float = float("nan")
    greedy_loss: float = float("nan")


def bench_spec(cfg: EnsembleBenchConfig, seed: int) -> StudySpec:
    """The study file with the benchmark's budget: its space, baselines, sampler and pruner
    (Hyperband's first rung scaled with the epochs: 2 of 30 is 1 of 6); small networks on the
    given data."""
    raw = spec_module.load(cfg.study).to_dict()
    file_epochs = raw["train"]["epochs"]
    raw["name"] = f"{raw['name']}-bench-s{seed}"
    raw["seed"], raw["trials"] = seed, cfg.trials
    raw["train"] |= {"epochs": cfg.epochs, "width": cfg.width, "batch_size": cfg.batch_size}
    raw["data"] = {"val_size": cfg.val_size, "train_size": cfg.train_size,
                   "test_size": cfg.test_size}  # fmt: skip
    if raw["pruner"]["type"] == "hyperband":
        scaled = raw["pruner"]["min_epochs"] * cfg.epochs / file_epochs
        raw["pruner"]["min_epochs"] = max(1, round(scaled))
    return spec_module.parse(raw, f"{cfg.study} (benchmark budget)")


def run_ensemble_bench(cfg: EnsembleBenchConfig, data_dir: Path | None) -> list[SeedRow]:
    with contextlib.ExitStack() as stack:
        folder = cfg.folder or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        return [_one_seed(cfg, seed, folder / f"seed-{seed}", data_dir) for seed in cfg.seeds]


def _one_seed(cfg: EnsembleBenchConfig, seed: int, folder: Path, data_dir: Path | None) -> SeedRow:
    spec = bench_spec(cfg, seed)
    stores = resolve(mlruns=folder, storage=sqlite_url(folder / "optuna.db"),
                     tracking_uri=sqlite_url(folder / "mlflow.db"))  # fmt: skip
    log.info(f"seed {seed}: a study of {cfg.trials} trials of {spec.name!r} "
             f"({cfg.epochs} epochs, width {cfg.width}, {cfg.jobs} workers); its lines go to "
             f"{folder / 'study.log'} …")  # fmt: skip
    started = time.perf_counter()
    _run_study(spec, stores, cfg, data_dir, folder)
    seconds = time.perf_counter() - started

    def scored(method: str) -> EnsembleReport:
        request = EnsembleRequest(k=cfg.top, method=method, tta="flip")  # type: ignore[arg-type]
        with _quiet():
            return evaluate(spec, stores, request, data_dir=data_dir, device=cfg.device)

    greedy, average = scored("greedy"), scored("average")
    assert greedy.test_tta and average.test_tta and greedy.single_test_tta  # asked for
    row = SeedRow(
        seed=seed,
        completed=greedy.candidates,
        test_images=greedy.test_images,
        single=greedy.single_test.accuracy,
        single_flip=greedy.single_test_tta.accuracy,
        average=average.test.accuracy,
        average_flip=average.test_tta.accuracy,
        greedy=greedy.test.accuracy,
        greedy_flip=greedy.test_tta.accuracy,
        greedy_members=len(greedy.members),
        greedy_weights=" ".join(f"{m.trial_number}:{m.weight:.2f}" for m in greedy.members),
        study_seconds=seconds,
        single_loss=greedy.single_test.log_loss,
        average_loss=average.test.log_loss,
        greedy_loss=greedy.test.log_loss,
    )
    log.info(
        f"seed {seed}: {row.completed} completed trials in {seconds:.0f} s; test accuracy "
        f"single {row.single:.4f}, average {row.average:.4f}, greedy {row.greedy:.4f}"
    )
    return row


def _run_study(
    spec: StudySpec, stores: Stores, cfg: EnsembleBenchConfig, data_dir: Path | None, folder: Path
) -> None:
    """`tuner study run` on the benchmark's study file, as a user runs it (its workers too),
    its lines into the folder's study.log."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    command = [sys.executable, "-m", "tuner", "study", "run", str(path), "--jobs", str(cfg.jobs),
               "--device", str(cfg.device), "--mlruns", str(folder), "--storage",
               stores.optuna_url, "--tracking-uri", stores.tracking_uri]  # fmt: skip
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    with (folder / "study.log").open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise TunerError(f"the study of seed {spec.seed} failed (exit {done.returncode}); see "
                         f"{folder / 'study.log'}")  # fmt: skip


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The ensembles' own lines are not the benchmark's: warnings only."""
    loggers = [logging.getLogger(n) for n in ("tuner.study", "tuner.ensemble")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread
