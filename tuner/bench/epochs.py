"""`tuner bench`: what one epoch costs on tuner's training path against the usual recipe
(DataLoader + PIL transforms, fp32, batch 128), measured in one run on one device, and what
several workers packed onto that device get done together."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tuner.data import FOLDER, MEAN, STD, Split, TrainVal, read_split
from tuner.models import Architecture, build
from tuner.train import CompileMode, TrainConfig, compile_mode, loss_of, synchronize, train

log = logging.getLogger(__name__)
REFERENCE_BATCH = 128
# the usual CIFAR recipe, on both paths
RECIPE = dict(optimizer="nesterov", lr=0.02, weight_decay=5e-4, momentum=0.9, schedule="onecycle",
              warmup_fraction=0.2, label_smoothing=0.0, augment="crop_flip", crop_padding=4,
              cutout_size=8, seed=0)  # fmt: skip


@dataclass(frozen=True)
class BenchConfig:
    depths: tuple[str, ...]  # networks (`network`): VGG depths, GoogLeNets (googlenet-3s)
    batch_size: int
    images: int  # training images per epoch
    width: float
    epochs: int  # the first warms up (and compiles); the rest are timed
    loader_workers: int
    packed: tuple[int, ...]  # numbers of packed workers to measure
    packed_depth: str  # the packed workers' network
    modes: tuple[CompileMode, ...]  # compiled paths measured beside eager (`measured_modes`)
    device: torch.device


def network(name: str, width: float) -> torch.nn.Module:
    """A network to time by its name: `vgg16` (with batch norm: the dearer kind), or
    `googlenet-3s` (3 stages of inception modules, auxiliary heads on, at `width`)."""
    if name.startswith("googlenet-"):
        stages = int(name.removeprefix("googlenet-").removesuffix("s"))
        params = {"stages": stages, "width": 1.0, "aux": True, "aux_weight": 0.3, "dropout": 0.4}
        return build(Architecture("googlenet", params, width))
    return build(Architecture("vgg", {"depth": name, "batch_norm": True, "dropout": 0.0}, width))


def label(name: str) -> str:
    """A network's name in the log: `vgg16-bn`, `googlenet-3s`."""
    return name if name.startswith("googlenet") else f"{name}-bn"


@dataclass(frozen=True)
class Row:
    depth: str  # the network, as `label` names it (`vgg16-bn`, `googlenet-3s`)
    path: str
    epoch_seconds: float
    images_per_second: float
    ratio: float | None  # reference epoch seconds / this path's
    warmup_seconds: float | None  # first epoch minus a timed one: compiling and caches
    peak_gib: float | None  # peak GPU memory of this path
    # a compiled path: epochs after which its warm-up (beyond eager's) is paid back by the
    # seconds it saves per epoch; inf: it saves none
    pays_after: float | None = None


@dataclass(frozen=True)
class Packed:
    workers: int
    images_per_second: float  # all workers together
    ratio: float  # against one worker


# -- the data -----------------------------------------------------------------------------------


def bench_data(data_dir: Path | None, images: int, device: torch.device) -> tuple[Split, str]:
    """The real training set when it is there, else random images of the same shape (the
    content does not change what an epoch costs)."""
    folder = data_dir / FOLDER if data_dir is not None else None
    if folder is not None and (folder / "data_batch_1").is_file():
        x, y = read_split(folder, "train")
        source = f"CIFAR-10 from {folder}"
    else:
        x, y = np.empty((0, 3, 32, 32), np.uint8), np.empty(0, np.int64)
        source = "synthetic images (no CIFAR-10 found)"
    if len(x) < images:  # repeat or make up the rest
        rng = np.random.default_rng(0)
        extra = images - len(x)
        if len(x):
            pick = rng.integers(0, len(x), extra)
            x, y = np.concatenate([x, x[pick]]), np.concatenate([y, y[pick]])
            source += f", repeated to {images} images"
        else:
            x = rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8)
            y = rng.integers(0, 10, images)
    x, y = x[:images], y[:images]
    return Split(torch.from_numpy(x).to(device), torch.from_numpy(y).long().to(device)), source


# -- the reference: DataLoader + PIL ------------------------------------------------------------


class PilImages(Dataset):
    """CIFAR-10 as torchvision's dataset serves it: one PIL image per item, transformed."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        from torchvision import transforms

        self.images = images.transpose(0, 2, 3, 1)  # N×H×W×C for PIL
        self.labels = labels
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD]),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def reference_epochs(split: Split, depth: str, cfg: BenchConfig) -> list[float]:
    """Seconds per epoch of the usual recipe: fp32, batch 128, PIL transforms in workers."""
    device = cfg.device
    dataset = PilImages(split.images.cpu().numpy(), split.labels.cpu().numpy())
    loader = DataLoader(
        dataset,
        batch_size=REFERENCE_BATCH,
        shuffle=True,
        num_workers=cfg.loader_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.loader_workers > 0,
        drop_last=True,
    )
    model = network(depth, cfg.width).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    model.train()
    seconds = []
    for _ in range(cfg.epochs):
        started = time.perf_counter()
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss = loss_of(model, model(images), labels)  # with auxiliary heads' losses
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


# -- tuner's path ------------------------------------------------------------------------------


def measured_modes(setting: str, device: torch.device) -> tuple[CompileMode, ...]:
    """`--compile`: `auto` measures both compiled paths on a GPU and none on the CPU; `off`
    none; else a list such as `inductor,graphs` (`graphs` has nothing to capture on a CPU)."""
    if setting == "auto":
        return ("inductor", "graphs") if device.type == "cuda" else ()
    modes = []
    for name in (part.strip() for part in setting.split(",")):
        if name in ("", "off"):
            continue
        if name not in ("on", "inductor", "graphs"):
            raise ValueError(f"--compile takes auto, off or inductor,graphs; got {name!r}")
        if name == "graphs" and device.type != "cuda":
            log.info("graphs: CUDA graphs need a GPU; not measured on the CPU")
            continue
        modes.append(compile_mode(name, device))
    return tuple(dict.fromkeys(modes))


def tuner_config(cfg: BenchConfig, mode: CompileMode) -> TrainConfig:
    return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, compile=mode, **RECIPE)


def tuner_epochs(split: Split, depth: str, cfg: BenchConfig, mode: CompileMode) -> list[float]:
    """Seconds per epoch of tuner's own loop (training, and validating 256 images)."""
    device = split.images.device
    val = Split(split.images[:256], split.labels[:256])
    model = network(depth, cfg.width).to(device)
    seconds: list[float] = []
    train(
        model,
        TrainVal(split, val, Path(".")),
        tuner_config(cfg, mode),
        lambda stats: seconds.append(stats.seconds),
    )
    return seconds


# -- packed workers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _PackedJob:
    cfg: BenchConfig
    data_dir: Path | None
    mode: CompileMode
    workers: int
    barrier: object
    results: object


def _packed_worker(job: _PackedJob) -> None:
    """One of several processes on one device: warm up, wait for the others, then time."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.workers))  # CPU: share the cores
    device = job.cfg.device
    split, _ = bench_data(job.data_dir, job.cfg.images, device)
    warm = replace(job.cfg, epochs=1)
    tuner_epochs(split, job.cfg.packed_depth, warm, job.mode)  # compile, caches, allocator
    job.barrier.wait()
    started = time.perf_counter()
    timed = replace(job.cfg, epochs=max(1, job.cfg.epochs - 1))
    tuner_epochs(split, job.cfg.packed_depth, timed, job.mode)
    job.results.put((timed.epochs * len(split), time.perf_counter() - started))


def packed_throughput(cfg: BenchConfig, data_dir: Path | None, mode: CompileMode, n: int) -> float:
    """Images per second of `n` worker processes training together on one device."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(n), context.Queue()
    job = _PackedJob(cfg, data_dir, mode, n, barrier, results)
    processes = [context.Process(target=_packed_worker, args=(job,)) for _ in range(n)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=3600) for _ in processes]
    for process in processes:
        process.join()
    images = sum(done for done, _ in outcomes)
    return images / max(seconds for _, seconds in outcomes)


# -- the whole benchmark ---------------------------------------------------------------------


def run_bench(cfg: BenchConfig, data_dir: Path | None) -> tuple[list[Row], list[Packed], str]:
    """Every row of the table, measured in this run on `cfg.device`."""
    device = cfg.device
    split, source = bench_data(data_dir, cfg.images, device)
    rows: list[Row] = []
    for depth in cfg.depths:
        network = label(depth)
        log.info(
            f"{network}: reference (DataLoader + PIL, {cfg.loader_workers} workers, fp32, "
            f"batch {REFERENCE_BATCH}) …"
        )
        measured = _measure(lambda d=depth: reference_epochs(split, d, cfg), device)
        images = _epoch_images(len(split), REFERENCE_BATCH)
        path = f"DataLoader+PIL fp32 b{REFERENCE_BATCH}"
        reference = _row(network, path, measured, images, None)
        rows.append(reference)
        eager = None
        for mode in ("off", *cfg.modes):
            name = "eager" if mode == "off" else mode
            log.info(f"{network}: tuner {name} (batch {cfg.batch_size}; bf16 on a GPU) …")
            measured = _measure(lambda d=depth, m=mode: tuner_epochs(split, d, cfg, m), device)
            images = _epoch_images(len(split), cfg.batch_size)
            row = _row(network, f"tuner {name} b{cfg.batch_size}", measured, images, reference)
            eager = eager or row
            rows.append(row if mode == "off" else _with_payback(row, eager))
    packed: list[Packed] = []
    if cfg.packed:
        single = None
        mode = compile_mode("auto", device)
        for n in cfg.packed:
            log.info(f"{label(cfg.packed_depth)}: {n} packed worker(s), compile {mode} …")
            rate = packed_throughput(cfg, data_dir, mode, n)
            single = single or (rate if n == 1 else None)
            packed.append(Packed(n, rate, rate / single if single else math.nan))
    return rows, packed, source


def _with_payback(row: Row, eager: Row) -> Row:
    """The epochs a compiled path needs to pay back its warm-up beyond eager's."""
    extra = max(0.0, (row.warmup_seconds or 0.0) - (eager.warmup_seconds or 0.0))
    saved = eager.epoch_seconds - row.epoch_seconds
    return replace(row, pays_after=extra / saved if saved > 0 else math.inf)


def _measure(run: Callable[[], list[float]], device: torch.device) -> tuple[list[float], float]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = run()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return seconds, peak


def _epoch_images(images: int, batch: int) -> int:
    return max(1, images // batch) * min(batch, images)  # full batches only, as both loops do


def _row(
    depth: str,
    path: str,
    measured: tuple[list[float], float],
    images: int,
    reference: Row | None,
) -> Row:
    seconds, peak = measured
    timed = seconds[1:] or seconds
    epoch = float(np.median(timed))
    return Row(
        depth=depth,
        path=path,
        epoch_seconds=epoch,
        images_per_second=images / epoch,
        ratio=reference.epoch_seconds / epoch if reference else None,
        warmup_seconds=max(0.0, seconds[0] - epoch) if len(seconds) > 1 else None,
        peak_gib=None if math.isnan(peak) else peak,
    )
