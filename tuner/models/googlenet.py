"""GoogLeNet (Inception v1, Szegedy et al. 2014) for small images (Fashion-MNIST's 28×28,
CIFAR's 32×32): the nine inception modules are rows of one table, grouped in three stages, and
one class with named parts (`stem`, `stages`, `aux`, `classifier`) builds any prefix of them, so
that saved weights have stable names.

The stem has no early downsampling (a 3×3 conv to 192 channels keeps 28×28), so stage 3 sees
the 28×28 map the paper's stage 3 sees of a 224×224 image; a 3×3 stride-2 max-pool between
stages halves it (28 → 14 → 7).

The auxiliary heads' contract with the training loop: in training mode a network with heads
returns `(logits, (aux_logits, ...))`, one entry per head, and the loss is
`cross_entropy(logits) + model.aux_weight * cross_entropy(aux_logits)` summed over the heads
(`aux_weight` is a non-persistent float buffer, 0.3 in the paper). In eval mode, or without
heads, the network returns the logits alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from tuner.models.vgg import Dropout, initialize, scaled


class Row(NamedTuple):
    """One inception module's output channels per branch (a row of the paper's table 1)."""

    b1: int  # 1×1
    reduce3: int  # 1×1 before the 3×3
    b3: int  # 3×3
    reduce5: int  # 1×1 before the 5×5
    b5: int  # 5×5
    pool_proj: int  # 1×1 after the 3×3 max-pool

    @property
    def out(self) -> int:
        return self.b1 + self.b3 + self.b5 + self.pool_proj


# Szegedy et al. 2014, table 1
INCEPTION: dict[str, Row] = {
    "3a": Row(64, 96, 128, 16, 32, 32),
    "3b": Row(128, 128, 192, 32, 96, 64),
    "4a": Row(192, 96, 208, 16, 48, 64),
    "4b": Row(160, 112, 224, 24, 64, 64),
    "4c": Row(128, 128, 256, 24, 64, 64),
    "4d": Row(112, 144, 288, 32, 64, 64),
    "4e": Row(256, 160, 320, 32, 128, 128),
    "5a": Row(256, 160, 320, 32, 128, 128),
    "5b": Row(384, 192, 384, 48, 128, 128),
}
STAGES: tuple[tuple[str, ...], ...] = (("3a", "3b"), ("4a", "4b", "4c", "4d", "4e"), ("5a", "5b"))
# the modules an auxiliary head follows, by the number of stages: the paper's 4a and 4d; with
# stage 3 alone, 3a
AUX_AFTER: dict[int, tuple[str, ...]] = {1: ("3a",), 2: ("4a", "4d"), 3: ("4a", "4d")}
STEM_CHANNELS = 192  # the paper's stem ends with 192 channels

# the logits, or in training with auxiliary heads (the logits, (each head's logits, ...))
Output = torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class GoogLeNetConfig:
    """One GoogLeNet: how many of `STAGES`, its heads, and what the data and study file fix."""

    stages: int  # 1: stage 3 only, 2: + stage 4, 3: + stage 5
    width: float = 1.0  # channel multiplier
    aux: bool = False  # auxiliary heads (see the module's docstring for the loss)
    aux_weight: float = 0.3  # each head's share of the loss
    dropout: float = 0.4  # before the classifier's linear
    num_classes: int = 10
    in_channels: int = 3  # 1 for grayscale images

    def __post_init__(self) -> None:
        if self.stages not in (1, 2, 3):
            raise ValueError(f"GoogLeNet has 1 to 3 stages, got stages={self.stages!r}")
        if not self.width > 0:
            raise ValueError(f"GoogLeNet's width must be positive, got width={self.width!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def conv_bn(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """Conv (no bias: BN's shift replaces it), BatchNorm, ReLU; 'same' padding."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        bn=nn.BatchNorm2d(out_channels),
        relu=nn.ReLU(inplace=True),
    ))  # fmt: skip


class Inception(nn.Module):
    """Four branches side by side, concatenated along channels: 1×1; 1×1 → 3×3; 1×1 → 5×5;
    3×3 max-pool → 1×1."""

    def __init__(self, in_channels: int, row: Row) -> None:
        super().__init__()
        self.b1 = conv_bn(in_channels, row.b1, 1)
        self.b3 = nn.Sequential(OrderedDict(
            reduce=conv_bn(in_channels, row.reduce3, 1), conv=conv_bn(row.reduce3, row.b3, 3)
        ))  # fmt: skip
        # the 5×5 factored as two 3×3: the same field of view with fewer weights and one more
        # ReLU (as Inception v2 does)
        self.b5 = nn.Sequential(OrderedDict(
            reduce=conv_bn(in_channels, row.reduce5, 1), conv1=conv_bn(row.reduce5, row.b5, 3),
            conv2=conv_bn(row.b5, row.b5, 3),
        ))  # fmt: skip
        self.pool = nn.Sequential(OrderedDict(
            pool=nn.MaxPool2d(3, stride=1, padding=1), proj=conv_bn(in_channels, row.pool_proj, 1)
        ))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1)


def aux_head(in_channels: int, width: float, num_classes: int) -> nn.Sequential:
    """An auxiliary classifier for small images: the paper's head with a 4×4 pool in place of
    its 5×5 average pool of stride 3 (of a 14×14 map)."""
    mid, hidden = scaled(128, width), scaled(1024, width)
    return nn.Sequential(OrderedDict(
        # a map smaller than 4×4 is repeated into the 4×4 (adaptive pooling's windows are then
        # single cells), so the linear's shape does not depend on the image size
        pool=nn.AdaptiveAvgPool2d(4),
        conv=conv_bn(in_channels, mid, 1),
        flatten=nn.Flatten(),
        fc=nn.Linear(mid * 16, hidden),
        relu=nn.ReLU(inplace=True),
        dropout=Dropout(0.7),
        head=nn.Linear(hidden, num_classes),
    ))  # fmt: skip


class GoogLeNet(nn.Module):
    """The stem, `config.stages` stages of inception modules with a max-pool between them,
    auxiliary heads where the paper puts them (if `config.aux`), and a global-average-pool
    classifier.

    With `seed`, the initial weights are drawn from it, not from the global RNG: a trial's
    network is the same in every process.
    """

    def __init__(self, config: GoogLeNetConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        width = config.width
        channels = scaled(STEM_CHANNELS, width)
        self.stem = conv_bn(config.in_channels, channels, 3)
        self.stages = nn.ModuleList()
        self.aux = nn.ModuleList()
        self._taps: dict[tuple[int, int], int] = {}  # (stage, module) → the head after it
        taps = AUX_AFTER[config.stages] if config.aux else ()
        for s, names in enumerate(STAGES[: config.stages]):
            stage = nn.Sequential()
            for m, name in enumerate(names):
                row = Row(*(scaled(c, width) for c in INCEPTION[name]))
                stage.append(Inception(channels, row))
                channels = row.out
                if name in taps:
                    self._taps[s, m] = len(self.aux)
                    self.aux.append(aux_head(channels, width, config.num_classes))
            self.stages.append(stage)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)  # between stages: 28 → 14 → 7
        self.classifier = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            dropout=Dropout(config.dropout),
            fc=nn.Linear(channels, config.num_classes),
        ))  # fmt: skip
        # a buffer, as Dropout's rate: torch.compile would recompile for each trial's float
        self.aux_weight: torch.Tensor
        self.register_buffer(
            "aux_weight", torch.tensor(float(config.aux_weight)), persistent=False
        )
        initialize(self, seed)  # VGG's initial weights, from `seed`

    def forward(self, x: torch.Tensor) -> Output:
        heads = self.training and len(self.aux) > 0
        aux_logits: list[torch.Tensor] = []
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            if s:
                x = self.pool(x)
            for m, module in enumerate(stage):
                x = module(x)
                if heads and (s, m) in self._taps:
                    aux_logits.append(self.aux[self._taps[s, m]](x))
        logits = self.classifier(x)
        return (logits, tuple(aux_logits)) if heads else logits


def build_googlenet(
    params: Mapping[str, Any],
    *,
    width: float,
    in_channels: int,
    num_classes: int,
    seed: int | None = None,
) -> GoogLeNet:
    """A trial's GoogLeNet from its drawn `params` (`stages`, `width`, `aux`, `aux_weight`
    (absent without heads), `dropout`); `width` is the study file's train.width, which
    multiplies the drawn one."""
    missing = [k for k in ("stages", "width", "aux", "dropout") if k not in params]
    if missing:
        raise ValueError(f"googlenet parameters lack {', '.join(missing)}; got {dict(params)}")
    config = GoogLeNetConfig(
        stages=int(params["stages"]),
        width=float(params["width"]) * width,
        aux=bool(params["aux"]),
        aux_weight=float(params.get("aux_weight", GoogLeNetConfig.aux_weight)),
        dropout=float(params["dropout"]),
        num_classes=num_classes,
        in_channels=in_channels,
    )
    return GoogLeNet(config, seed=seed)
