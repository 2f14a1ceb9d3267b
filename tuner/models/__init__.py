"""The networks a study trains. Each family is a module of this package (VGG's table of layers,
GoogLeNet's table of inception modules), or a user's builder; `build` makes a trial's network
from its `Architecture`, the record saved with its weights, so that any trained network is
rebuilt from its own record (an ensemble may mix families)."""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tuner import plugins
from tuner.errors import ConfigError
from tuner.models.vgg import LAYERS, VGG, Dropout, VGGConfig, build_vgg, rename_legacy

__all__ = ["LAYERS", "VGG", "Architecture", "Dropout", "VGGConfig", "build", "build_vgg",
           "check_builder", "load_state"]  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """Enough to rebuild a trained network for loading its weights (saved as JSON with them)."""

    family: str  # "vgg", "googlenet", or "builder" (a user's function)
    params: Mapping[str, Any] = field(default_factory=dict)  # its drawn parameters
    width: float = 1.0  # the study file's channel multiplier (train.width)
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)  # channels, height, width
    builder: str | None = None  # a builder's `package.module:function`

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "params": dict(self.params), "width": self.width,
                "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "builder": self.builder}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Architecture:
        """Also a record written before there were families: a VGG's, flat."""
        if "family" not in data:
            params = {k: data[k] for k in ("depth", "batch_norm", "dropout") if k in data}
            return cls("vgg", params, data.get("width", 1.0), data.get("num_classes", 10))
        shape = tuple(data.get("input_shape", (3, 32, 32)))
        return cls(data["family"], dict(data.get("params", {})), data.get("width", 1.0),
                   data.get("num_classes", 10), shape, data.get("builder"))  # type: ignore[arg-type]  # fmt: skip


def build(arch: Architecture, *, seed: int | None = None) -> nn.Module:
    """The network `arch` records, its initial weights drawn from `seed` (None: the global RNG).
    A builder's network is checked on one dummy batch (`check_builder`)."""
    p = arch.params
    channels = arch.input_shape[0]
    if arch.family == "vgg":
        config = VGGConfig(p["depth"], bool(p["batch_norm"]), float(p.get("dropout", 0.0)),
                           arch.width, arch.num_classes, channels)  # fmt: skip
        return VGG(config, seed=seed)
    if arch.family == "googlenet":
        from tuner.models.googlenet import build_googlenet

        return build_googlenet(p, width=arch.width, in_channels=channels,
                               num_classes=arch.num_classes, seed=seed)  # fmt: skip
    if arch.family == "builder" and arch.builder:
        with _seeded(seed):
            return check_builder(arch)
    raise ConfigError(f"unknown model family {arch.family!r} (known: vgg, googlenet, builder)")


class _seeded:
    """Draw a builder's initial weights from `seed`, leaving the global RNGs (torch's, numpy's,
    Python's) and torch's threads as they were: a builder is the user's code."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
                      torch.get_num_threads())  # fmt: skip
        if self.seed is not None:
            torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        rng, numpy_rng, python_rng, threads = self.saved
        torch.set_rng_state(rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        torch.set_num_threads(threads)


DUMMY_BATCH = 3  # odd: a network right only for a batch of two (or one) is caught


def check_builder(arch: Architecture) -> nn.Module:
    """Call the user's builder with the drawn parameters, the input shape and the number of
    classes, and pass one dummy batch through its network in eval mode (logits alone, one
    row per image and a column per class) and in training mode (the same, or `(logits,
    [auxiliary logits…])`). Its import error, anything it raises, a wrong return type or a
    wrong output is one `ConfigError` line naming the builder, before anything trains. The
    network is returned as it was built (the batch leaves no trace in its state)."""
    assert arch.builder is not None
    target = arch.builder
    make = plugins.load(target, "model.builder")
    called = f"called with {dict(arch.params)}, input shape {arch.input_shape}, " \
             f"{arch.num_classes} classes"  # fmt: skip
    try:
        model = make(dict(arch.params), arch.input_shape, arch.num_classes)
    except (Exception, SystemExit) as exc:  # the user's code: whatever it raises is one line
        raise ConfigError(f"model.builder {target!r} raised {_one_line(exc)} ({called})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.builder {target!r} returned a {type(model).__name__}, expected a "
            "torch.nn.Module"
        )
    _check_output(model, arch, training=False)  # also makes a lazy module's weights
    state = copy.deepcopy(model.state_dict())  # training mode moves batch norm's statistics
    try:
        _check_output(model, arch, training=True)
    finally:
        model.load_state_dict(state)
        model.train()
    return model


def _check_output(model: nn.Module, arch: Architecture, training: bool) -> None:
    target, mode = arch.builder, "training" if training else "eval"
    dummy = torch.zeros(DUMMY_BATCH, *arch.input_shape)
    expected = (DUMMY_BATCH, arch.num_classes)
    model.train(training)
    try:
        with torch.no_grad():
            out = model(dummy)
    except (Exception, SystemExit) as exc:
        raise ConfigError(
            f"model.builder {target!r}: its network fails on a batch of shape "
            f"{tuple(dummy.shape)} in {mode} mode ({_one_line(exc)})"
        ) from None
    parts = [out] if not (training and isinstance(out, tuple)) else [out[0], *_aux(out)]
    for part in parts:
        if not isinstance(part, torch.Tensor) or tuple(part.shape) != expected:
            got = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise ConfigError(
                f"model.builder {target!r}: in {mode} mode its network maps a batch of shape "
                f"{tuple(dummy.shape)} to {got}, expected a tensor of {expected} (one logit "
                "per class" + (", or (logits, [auxiliary logits])" if training else "") + ")"
            )


def _aux(out: tuple) -> list[object]:
    """A training forward's auxiliary logits: `(logits, [aux, …])`; anything else is wrong."""
    if len(out) == 2 and isinstance(out[1], list | tuple):
        return list(out[1])
    return [out]  # not the shape the step reads: said as what it is


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "") -> None:
    """Load weights, also a VGG's saved before its parts had names; a mismatch says which."""
    if isinstance(model, VGG):
        state = rename_legacy(state, model)
        what = what or (f"a {model.arch.depth}{'-bn' if model.arch.batch_norm else ''} "
                        f"at width {model.arch.width}")  # fmt: skip
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"these weights are not {what or 'this network'} ({first})") from None
