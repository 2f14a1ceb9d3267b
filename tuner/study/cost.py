"""What a study will cost on this machine, before it trains: a few training steps of each depth
in its space, measured on the device, times the images of an epoch, the epochs a trial trains
on average under its pruner, and the trials left. `study run` says it, and stops where it is
far beyond what the user will wait (`--max-hours`)."""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tuner.console import counted, duration
from tuner.errors import TunerError
from tuner.models import VGG, VGGConfig
from tuner.pruning import expected_epochs
from tuner.spec import Depth, StudySpec
from tuner.train import synchronize

log = logging.getLogger(__name__)

CIFAR_TRAIN_IMAGES = 50_000  # the training split, before the validation images are carved out
# a CPU's time grows with the batch: a small one measured is as true and costs a second;
# a GPU's does not (a small batch leaves it idle), so it is measured at the study's own
CPU_BATCH = 32
STEPS = 3  # timed at least, after one to warm up; their median: a step now and then is slow
ENOUGH_SECONDS = 0.5  # per depth: cheap steps are timed until this much has passed


@dataclass(frozen=True)
class Cost:
    """A study's trials left, on one device, as measured."""

    trials: int
    epochs_per_trial: float  # on average, under the study's pruner
    epoch_seconds: float  # mean over the depths measured, at the study's width and images
    devices: int = 1  # trials at once, as the GPUs given: workers packed on one device share it
    partial: bool = False  # only the cheaper depths measured: the cost is at least this

    @property
    def seconds(self) -> float:
        return self.trials * self.epochs_per_trial * self.epoch_seconds / self.devices

    def says(self) -> str:
        return (
            f"{counted(self.trials, 'trial')} × "
            f"~{self.epochs_per_trial:.1f} epochs × "
            f"{self.epoch_seconds:.1f} s per epoch (measured"
            + (", the cheaper depths only" if self.partial else "")
            + ")"
            + (f" / {self.devices} GPUs" if self.devices > 1 else "")
            + f": {'at least' if self.partial else 'about'} {duration(self.seconds)}"
        )


def train_images(spec: StudySpec) -> int:
    data = spec.data
    return data.train_size or CIFAR_TRAIN_IMAGES - data.val_size


def measure(
    spec: StudySpec, device: torch.device, trials: int, devices: int = 1, limit: float = math.inf
) -> Cost:
    """The cost of `trials` trials of `spec` on `device`: each depth of its space measured, the
    cheapest first, until the cheaper ones alone cost more than `limit` seconds (a study of
    days on a CPU is told in seconds, not after a minute of measuring)."""
    epochs = expected_epochs(spec)
    measured: list[float] = []
    try:
        for depth in sorted(spec.space.depth, key=lambda d: int(d.removeprefix("vgg"))):
            measured.append(epoch_seconds(spec, depth, device))
            cost = Cost(trials, epochs, sum(measured) / len(measured), devices)
            if cost.seconds > limit and len(measured) < len(spec.space.depth):
                return replace(cost, partial=True)
        return cost
    finally:
        if device.type == "cuda":  # the workers, not this process, need the GPU's memory
            torch.cuda.empty_cache()


def epoch_seconds(spec: StudySpec, depth: Depth, device: torch.device) -> float:
    """One epoch of the study's training images on a VGG of `depth` (with batch norm: the
    dearer kind), from eager steps (at least `STEPS` after one to warm up; more while cheap).
    On the CPU at a small batch, scaled per image."""
    batch = spec.train.batch_size
    batch = min(CPU_BATCH, batch) if device.type == "cpu" else batch
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    model = VGG(VGGConfig(depth, True, 0.0, spec.train.width), seed=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times: list[float] = []
    # the first warms up; then at least STEPS, and more while they are cheap: a loaded
    # machine's odd slow step weighs less in the median of many
    while len(times) < STEPS + 1 or (sum(times[1:]) < ENOUGH_SECONDS and len(times) < 50):
        synchronize(device)
        began = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:]) / batch * train_images(spec)


def check(cost: Cost, spec: StudySpec, device: torch.device, max_hours: float) -> None:
    """Say what the study will cost; stop, with what to run instead, past `max_hours`."""
    if cost.seconds <= max_hours * 3600:
        log.info(f"estimate on {device}: {cost.says()}")
        return
    instead = ["a smaller study (fewer trials, epochs or images: `vgg-cifar-smoke` is sized "
               "for a CPU)"]  # fmt: skip
    if device.type == "cpu":
        instead.append("on a GPU (`--device cuda`, `--gpus all`)")
    anyway = (  # a partial estimate is a floor: a number from it would not be enough
        "a --max-hours above the whole study's cost (every depth is measured then)"
        if cost.partial
        else f"`--max-hours {math.ceil(cost.seconds / 3600)}`"
    )
    raise TunerError(
        f"{spec.name!r} would take too long on {device}: {cost.says()}, more than "
        f"--max-hours {max_hours:g}. Run {' or '.join(instead)}; or give {anyway} to run it "
        "anyway"
    )
