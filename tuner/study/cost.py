"""What a study will cost on this machine, before it trains: a few training steps of each network
of its space whose cost differs (each VGG depth, each GoogLeNet stage count), measured on the
device, times the images of an epoch, the epochs a trial trains
on average under its pruner, and the trials left. `study run` says it, and stops where it is
far beyond what the user will wait (`--max-hours`)."""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, replace

import torch

from tuner.console import counted, duration
from tuner.data import CIFAR10_INFO, DataInfo
from tuner.errors import ConfigError, TunerError
from tuner.models import Architecture, build
from tuner.pruning import expected_epochs
from tuner.spec import StudySpec
from tuner.train import loss_of, synchronize

log = logging.getLogger(__name__)

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
    epoch_seconds: float  # mean over the networks measured, at the study's width and images
    devices: int = 1  # trials at once, as the GPUs given: workers packed on one device share it
    partial: bool = False  # only the cheaper networks measured: the cost is at least this

    @property
    def seconds(self) -> float:
        return self.trials * self.epochs_per_trial * self.epoch_seconds / self.devices

    def says(self) -> str:
        return (
            f"{counted(self.trials, 'trial')} × "
            f"~{self.epochs_per_trial:.1f} epochs × "
            f"{self.epoch_seconds:.1f} s per epoch (measured"
            + (", the cheaper networks only" if self.partial else "")
            + ")"
            + (f" / {self.devices} GPUs" if self.devices > 1 else "")
            + f": {'at least' if self.partial else 'about'} {duration(self.seconds)}"
        )


def train_images(spec: StudySpec, info: DataInfo) -> int:
    data = spec.data
    if data.train_size:
        return data.train_size
    # the training split, less the validation images carved out of it
    return max(1, info.train_images - data.val_size)


def networks(spec: StudySpec, info: DataInfo) -> list[Architecture]:
    """The networks of the space whose cost differs most, cheapest first: each VGG depth
    (with batch norm: the dearer kind), each GoogLeNet stage count (at its widest, with
    auxiliary heads), a builder's network at its first point."""
    from tuner.objective import architecture, first_point

    space, point = spec.space, first_point(spec)

    def at(**params: object) -> Architecture:
        return architecture(spec, replace(point, model={**point.model, **params}), info)

    if spec.family == "vgg":
        depths = sorted(space.depth, key=lambda d: int(d.removeprefix("vgg")))  # type: ignore[attr-defined]
        return [at(depth=d, batch_norm=True, dropout=0.0) for d in depths]
    if spec.family == "googlenet":
        width = space.width.high  # type: ignore[attr-defined]
        return [at(stages=n, width=width, aux=True, aux_weight=0.3)
                for n in sorted(space.stages)]  # type: ignore[attr-defined]  # fmt: skip
    return [architecture(spec, point, info)]


def measure(
    spec: StudySpec,
    device: torch.device,
    trials: int,
    devices: int = 1,
    limit: float = math.inf,
    info: DataInfo = CIFAR10_INFO,
) -> Cost:
    """The cost of `trials` trials of `spec` on `device`, on images as `info` describes: each
    network of `networks` measured, the cheapest first, until the cheaper ones alone cost
    more than `limit` seconds (a study of days on a CPU is told in seconds, not after a
    minute of measuring)."""
    epochs = expected_epochs(spec)
    measured: list[float] = []
    archs = networks(spec, info)
    try:
        for arch in archs:
            measured.append(_measured(spec, arch, device, info))
            cost = Cost(trials, epochs, sum(measured) / len(measured), devices)
            if cost.seconds > limit and len(measured) < len(archs):
                return replace(cost, partial=True)
        return cost
    finally:
        if device.type == "cuda":  # the workers, not this process, need the GPU's memory
            torch.cuda.empty_cache()


def _measured(spec: StudySpec, arch: Architecture, device: torch.device, info: DataInfo) -> float:
    """`epoch_seconds`; a user's network that fails to train a batch is one line naming it."""
    try:
        return epoch_seconds(spec, arch, device, info)
    except Exception as exc:
        if arch.builder is None:  # tuner's own network: not the user's to fix
            raise
        why = " ".join(str(exc).split())
        raise ConfigError(
            f"model.builder {arch.builder!r}: its network fails to train a batch of "
            f"{_batch(spec, device)} images ({type(exc).__name__}: {why})"
        ) from None


def _batch(spec: StudySpec, device: torch.device) -> int:
    batch = spec.train.batch_size
    return min(CPU_BATCH, batch) if device.type == "cpu" else batch


def epoch_seconds(
    spec: StudySpec, arch: Architecture, device: torch.device, info: DataInfo = CIFAR10_INFO
) -> float:
    """One epoch of the study's training images on the network `arch`, from eager steps (at
    least `STEPS` after one to warm up; more while cheap). On the CPU at a small batch, scaled
    per image."""
    batch = _batch(spec, device)
    images = torch.randn(batch, *arch.input_shape, device=device)
    labels = torch.randint(0, arch.num_classes, (batch,), device=device)
    model = build(arch, seed=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times: list[float] = []
    # the first warms up; then at least STEPS, and more while they are cheap: a loaded
    # machine's odd slow step weighs less in the median of many
    while len(times) < STEPS + 1 or (sum(times[1:]) < ENOUGH_SECONDS and len(times) < 50):
        synchronize(device)
        began = time.perf_counter()
        loss = loss_of(model, model(images), labels)  # auxiliary heads' too, as a trial's
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:]) / batch * train_images(spec, info)


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
        "a --max-hours above the whole study's cost (every network is measured then)"
        if cost.partial
        else f"`--max-hours {math.ceil(cost.seconds / 3600)}`"
    )
    raise TunerError(
        f"{spec.name!r} would take too long on {device}: {cost.says()}, more than "
        f"--max-hours {max_hours:g}. Run {' or '.join(instead)}; or give {anyway} to run it "
        "anyway"
    )
