"""VGG for small images (CIFAR's 32×32, Fashion-MNIST's 28×28): the variants are rows of one
table, built by one class with named parts (`features`, `classifier`), so that saved weights
have stable names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuner.spec import Depth

# Output channels per 3×3 conv; "M" is a 2×2 max-pool (Simonyan & Zisserman 2014, table 1).
LAYERS: dict[Depth, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}  # fmt: skip


class Dropout(nn.Module):
    """Dropout whose rate is a buffer, not a Python float: torch.compile guards on floats, and
    a searched rate would recompile the training step for every trial."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1 - self.p.to(x.dtype)
        return x * (torch.rand_like(x) < keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}"


@dataclass(frozen=True)
class VGGConfig:
    """One VGG: its row of `LAYERS`, and what the data and the study file fix."""

    depth: Depth
    batch_norm: bool
    dropout: float = 0.0
    width: float = 1.0  # channel multiplier
    num_classes: int = 10
    in_channels: int = 3  # 1 for grayscale images

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class VGG(nn.Module):
    """VGG features from `LAYERS[depth]`; the head: five pools leave 1×1 of a 32×32 or 28×28
    image (pools round up: 28 → 14 → 7 → 4 → 2 → 1), averaged where a larger one leaves
    more, then one linear.

    With `seed`, the initial weights are drawn from it, not from the global RNG: a trial's
    network is the same in every process.
    """

    def __init__(self, arch: VGGConfig, *, seed: int | None = None) -> None:
        super().__init__()
        if arch.depth not in LAYERS:
            raise ValueError(f"unknown VGG depth {arch.depth!r}; known: {', '.join(LAYERS)}")
        self.arch = arch
        self.features, channels = _features(LAYERS[arch.depth], arch)
        self.classifier = nn.Sequential(
            nn.Flatten(), Dropout(arch.dropout), nn.Linear(channels, arch.num_classes)
        )
        initialize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1))


def build_vgg(
    depth: Depth,
    *,
    batch_norm: bool,
    dropout: float = 0.0,
    width: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
) -> VGG:
    """`VGG(VGGConfig(...))` in one call."""
    return VGG(VGGConfig(depth, batch_norm, dropout, width, num_classes, in_channels))


def _features(layers: tuple[int | str, ...], arch: VGGConfig) -> tuple[nn.Sequential, int]:
    modules: list[nn.Module] = []
    in_channels = arch.in_channels
    for item in layers:
        if item == "M":
            # rounding up: an odd side (7 of a 28×28 image) keeps its last row; on the even
            # sides of a 32×32 image it pools as floor does
            modules.append(nn.MaxPool2d(2, ceil_mode=True))
            continue
        out = scaled(int(item), arch.width)
        # with batch norm the conv's bias is redundant (BN's shift replaces it)
        modules.append(nn.Conv2d(in_channels, out, 3, padding=1, bias=not arch.batch_norm))
        if arch.batch_norm:
            modules.append(nn.BatchNorm2d(out))
        modules.append(nn.ReLU(inplace=True))
        in_channels = out
    return nn.Sequential(*modules), in_channels


_INDEXED = re.compile(r"^(\d+)\.(.+)$")


def rename_legacy(state: Mapping[str, torch.Tensor], model: VGG) -> dict[str, torch.Tensor]:
    """Weights saved before the parts had names (a bare `nn.Sequential`: `0.weight`, …, the
    head after the features) under today's names; other state is returned as it is."""
    if not state or not all(_INDEXED.match(key) for key in state):
        return dict(state)
    n = len(model.features)
    renamed = {}
    for key, value in state.items():
        index, rest = _INDEXED.match(key).groups()  # type: ignore[union-attr]
        i = int(index)
        renamed[f"features.{i}.{rest}" if i < n else f"classifier.{i - n}.{rest}"] = value
    return renamed


def initialize(model: nn.Module, seed: int | None = None) -> None:
    """He init for convs (as torchvision's VGG), ones and zeros for batch norm, small normal
    for linears: drawn from `seed` without touching the global RNG (None: from the global
    RNG)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            initialize(model)
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
