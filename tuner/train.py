"""The training loop, top to bottom. It knows nothing of Optuna or MLflow: it reports each epoch
to a callback, and a callback that raises (a pruner, Ctrl-C) ends training there."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuner.data import CIFAR10_INFO, DataInfo, Split, TrainVal, augment, normalize
from tuner.spec import Augment, Optimizer, Schedule

NAN_CHECK_EVERY = 10  # steps between divergence checks (each check syncs the GPU once)
# How the forward-and-loss step runs: as written (off); traced, with inductor's generated
# kernels, replayed as CUDA graphs (inductor); traced and replayed as CUDA graphs of torch's own
# kernels, without code generation (graphs: a warm-up of seconds, not tens of seconds).
CompileMode = Literal["off", "inductor", "graphs"]
# what `compile: auto` runs on a GPU. Not yet measured: `tuner bench` (in `.ci/gpu bench`)
# weighs each mode's warm-up against the seconds it saves per epoch, and decides it there
AUTO_ON_GPU: CompileMode = "inductor"


class Diverged(Exception):
    """The training loss became NaN or infinite; training stops at once."""

    def __init__(self, epoch: int, step: int, loss: float) -> None:
        super().__init__(f"loss became {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    optimizer: Optimizer
    lr: float  # peak learning rate
    weight_decay: float
    momentum: float  # SGD and Nesterov only
    schedule: Schedule
    warmup_fraction: float  # of all steps
    label_smoothing: float
    augment: Augment
    crop_padding: int  # pixels
    cutout_size: int  # pixels
    seed: int
    accumulation: int = 1  # micro-batches per optimizer step (batch_size / accumulation each)
    compile: CompileMode = "off"  # see CompileMode


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float | None  # None: no validation images (a refit trains on them)
    val_acc: float | None
    lr: float  # at the end of the epoch
    seconds: float  # wall time of the epoch's training and validation
    first_step_seconds: float | None = None  # epoch 1 only: includes compiling, when on

    def metrics(self) -> dict[str, float]:
        metrics = {
            "train_loss": self.train_loss,
            "lr_schedule": self.lr,  # where the schedule is (params.lr: its peak)
            "epoch_seconds": self.seconds,
        }
        if self.val_loss is not None and self.val_acc is not None:
            metrics |= {"val_loss": self.val_loss, "val_acc": self.val_acc}
        if self.first_step_seconds is not None:
            metrics["first_step_seconds"] = self.first_step_seconds
        return metrics


@dataclass(frozen=True)
class TrainResult:
    history: tuple[EpochStats, ...]
    # N×classes softmax on the validation split after the last epoch (N may be 0)
    val_probs: np.ndarray
    state_dict: dict[str, torch.Tensor]  # on the CPU, ready to save


def lr_factor(step: int, total: int, schedule: str, warmup_fraction: float) -> float:
    """Multiplier of the peak rate at optimizer step `step` of `total`."""
    if schedule == "constant":
        return 1.0
    warmup = int(total * warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # linear up, then linear down to zero
        return max(0.0, 1 - progress)
    raise ValueError(f"unknown schedule {schedule!r}")


def make_optimizer(
    params: Iterator[nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # one kernel per step instead of one per tensor
    if cfg.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.optimizer == "nesterov",
            weight_decay=cfg.weight_decay,
            fused=fused,
        )
    if cfg.optimizer == "adam":  # L2 through the gradient, as torch's Adam does
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw":  # decoupled weight decay
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bf16 on the GPU (no loss scaling needed); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(images: torch.Tensor, device: torch.device, info: DataInfo) -> torch.Tensor:
    x = normalize(images, info)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that wall-clock timings mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int, info: DataInfo = CIFAR10_INFO
) -> torch.Tensor:
    """Softmax outputs (float32, N×classes) for uint8 images of data set `info` on the model's
    device."""
    device = images.device
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        with autocast(device):
            logits = _logits(model(to_input(images[start : start + batch_size], device, info)))
        outputs.append(torch.softmax(logits.float(), dim=1))
    return torch.cat(outputs)


def _logits(out: torch.Tensor | tuple) -> torch.Tensor:
    """A network's logits: what it returns, or the first of what it returns with its
    auxiliary heads' (a builder's network may keep them in eval mode)."""
    return out[0] if isinstance(out, tuple) else out


def _forward_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    info: DataInfo = CIFAR10_INFO,
) -> torch.Tensor:
    """uint8 images in, mean cross-entropy out: the part of a step that torch.compile takes."""
    device = images.device
    with autocast(device):
        out = model(to_input(images, device, info))
    return loss_of(model, out, labels, label_smoothing)


def loss_of(
    model: nn.Module,
    out: torch.Tensor | tuple,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The mean cross-entropy of what `model` returned for a batch. A network that returns
    `(logits, auxiliary logits)` while training (GoogLeNet's auxiliary classifiers) adds each
    auxiliary head's loss times its `aux_weight` (1 where it has none), as Szegedy et al. did."""
    loss = F.cross_entropy(_logits(out).float(), labels, label_smoothing=label_smoothing)
    if isinstance(out, tuple) and len(out) > 1:
        weight = getattr(model, "aux_weight", 1.0)
        for aux in out[1]:
            loss = loss + weight * F.cross_entropy(aux.float(), labels,
                                                   label_smoothing=label_smoothing)  # fmt: skip
    return loss


def compile_mode(setting: str, device: torch.device) -> CompileMode:
    """The study file's `train.compile` on this device. `auto` compiles on the GPU only (on the
    CPU a compile takes longer than it saves); `on` is `inductor`; `graphs` has nothing to
    capture on the CPU and runs as written there."""
    if setting == "auto":
        return AUTO_ON_GPU if device.type == "cuda" else "off"
    if setting == "on":
        return "inductor"
    if setting == "graphs" and device.type != "cuda":
        return "off"
    if setting not in ("off", "inductor", "graphs"):
        raise ValueError(f"train.compile takes auto, on, inductor, graphs or off, got {setting!r}")
    return setting  # type: ignore[return-value]


_COMPILED: dict[tuple[str, CompileMode], Callable[..., torch.Tensor]] = {}
COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same tracing, without code generation


def step_function(device: torch.device, mode: CompileMode) -> Callable[..., torch.Tensor]:
    """The forward-and-loss function; compiled once per process, device type and mode.

    One compiled function serves every trial of a worker: torch.compile treats parameters as
    inputs, so a new model of an architecture it has seen reuses the compiled graphs (the
    warm-up is paid once per architecture and worker; inductor's disk cache, shared by the
    workers of a machine, shortens it for the next worker).
    """
    if mode == "off":
        return _forward_loss
    key = (device.type, mode)
    if key not in _COMPILED:
        import torch._dynamo

        # 4 depths × batch norm or not × micro-batch sizes: more graphs than the default 8
        torch._dynamo.config.recompile_limit = 64
        if mode == "graphs":  # AOT autograd's forward and backward graphs, each a CUDA graph
            compiled = torch.compile(_forward_loss, backend="cudagraphs", dynamic=False)
        else:
            cuda = device.type == "cuda"
            compiled = torch.compile(
                _forward_loss,
                mode="reduce-overhead" if cuda else None,  # CUDA graphs on the GPU
                dynamic=False,
                backend=COMPILE_BACKEND,
            )
        _COMPILED[key] = compiled
    return _COMPILED[key]


def train(
    model: nn.Module,
    data: TrainVal,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochStats], None] = lambda stats: None,
    between_steps: Callable[[], None] = lambda: None,
) -> TrainResult:
    """Train `cfg.epochs` epochs; `on_epoch(stats)` after each, `between_steps()` after each
    optimizer step (a host call, cheap: it may raise to stop the training, as `on_epoch`
    may)."""
    device = data.train.images.device
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), cfg, device)
    if _graphed(cfg, device):
        # Under CUDA graphs autograd may take a backward output as a parameter's .grad, and
        # the next micro-batch's replay overwrites it: accumulated gradients come out wrong
        # (pytorch#169545). Gradients that always exist are added to in place, never taken.
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
    total = cfg.epochs * steps_per_epoch(len(data.train), cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, cfg.schedule, cfg.warmup_fraction)
    )
    step_fn = step_function(device, cfg.compile)
    history: list[EpochStats] = []
    probs = torch.empty(0, data.info.classes)
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        train_loss, first_step = _train_epoch(
            model, data.train, cfg, optimizer, schedule, generator, epoch, step_fn, between_steps
        )
        val_loss = val_acc = None
        if len(data.val):
            probs = predict(model, data.val.images, cfg.batch_size * 2, data.info)
            val_loss, val_acc = _score(probs, data.val)
        synchronize(device)
        stats = EpochStats(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            val_acc=val_acc,
            lr=schedule.get_last_lr()[0],
            seconds=time.perf_counter() - started,
            first_step_seconds=first_step if epoch == 1 else None,
        )
        history.append(stats)
        on_epoch(stats)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return TrainResult(tuple(history), probs.cpu().numpy(), state)


def _graphed(cfg: TrainConfig, device: torch.device) -> bool:
    """The step is replayed as CUDA graphs (both compiled modes, on a GPU)."""
    return cfg.compile != "off" and device.type == "cuda"


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Full batches only (fixed shapes for compiled steps); a set smaller than one batch is one."""
    return max(1, images // batch_size)


def _train_epoch(
    model: nn.Module,
    split: Split,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    epoch: int,
    step_fn: Callable[..., torch.Tensor],
    between_steps: Callable[[], None],
) -> tuple[float, float]:
    """One pass; returns the mean training loss and the seconds of its first step."""
    device = split.images.device
    model.train()
    steps = steps_per_epoch(len(split), cfg.batch_size)
    batch = min(cfg.batch_size, len(split))
    order = torch.randperm(len(split), device=device, generator=generator)[: steps * batch]
    # the whole epoch's augmentation at once: a few batched ops, no per-batch work
    images = augment(
        split.images[order],
        cfg.augment,
        padding=cfg.crop_padding,
        cutout=cfg.cutout_size,
        generator=generator,
    )
    labels = split.labels[order]
    micro = max(1, batch // cfg.accumulation)
    graphed = _graphed(cfg, device)
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
    first_step = 0.0
    started = time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=not graphed)  # graphed: zeroed in place (`train`)
        for start in range((step - 1) * batch, step * batch, micro):
            end = min(start + micro, step * batch)
            if graphed:  # a new replay: the last one's outputs are no longer read
                torch.compiler.cudagraph_mark_step_begin()
            loss = step_fn(model, images[start:end], labels[start:end], cfg.label_smoothing,
                           split.info)  # fmt: skip
            # each micro-batch's share of the batch mean: accumulated gradients equal one batch's
            (loss * ((end - start) / batch)).backward()
            loss_sum += loss.detach() * (end - start)
        optimizer.step()
        schedule.step()
        if step == 1:
            synchronize(device)
            first_step = time.perf_counter() - started
        if step % NAN_CHECK_EVERY == 0:
            _check_finite(loss_sum, epoch, step)
        between_steps()
    _check_finite(loss_sum, epoch, steps)
    return loss_sum.item() / (steps * batch), first_step


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    value = loss_sum.item()
    if not math.isfinite(value):
        raise Diverged(epoch, step, value)


def _score(probs: torch.Tensor, split: Split) -> tuple[float, float]:
    """(mean log-loss, accuracy) of softmax outputs against the split's labels."""
    labels = split.labels
    picked = probs.gather(1, labels.view(-1, 1)).clamp_min(1e-12)
    loss = -picked.log().mean().item()
    # counted, then divided in Python: 0.39, not float32's 0.38999998 in every table and chart
    acc = (probs.argmax(1) == labels).sum().item() / len(labels)
    return loss, acc
