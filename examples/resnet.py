"""A small pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual
Networks"), written as a user writes a model for tuner: one file, no import of tuner.

A study file names it by module and function, looked for from the folder tuner runs in:

    model: {builder: "examples.resnet:build"}

The contract: tuner calls `build(params, input_shape, num_classes)` with the trial's drawn
parameters (here `blocks`, `channels` and `dropout`), the images' (channels, height, width)
and the number of classes; it returns a `torch.nn.Module` whose forward maps an N×C×H×W float
batch to N×num_classes logits. tuner checks that on one dummy batch before anything trains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

STAGES = 3  # each after the first halves the map (stride 2) and doubles the channels


class PreActBlock(nn.Module):
    """BN → ReLU → 3×3 conv, twice, added to the input; a 1×1 conv shortcut where the shape
    changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        # no conv biases: each conv is followed by a BN (here, the next block's) that shifts
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        # the projection takes the pre-activated input, as in the paper
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    """A 3×3 conv stem, three stages of `blocks` pre-activation blocks, then BN → ReLU →
    global average pool → dropout → linear. Any image size works: the pool averages what
    the stages leave (7×7 of 28×28, 8×8 of 32×32)."""

    def __init__(
        self, in_channels: int, num_classes: int, blocks: int, channels: int, dropout: float
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        width = channels
        for stage in range(STAGES):
            out = channels * 2**stage
            for i in range(blocks):
                layers.append(PreActBlock(width, out, stride=2 if stage and i == 0 else 1))
                width = out
        self.stages = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(width, num_classes),
        )  # fmt: skip
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def build(
    params: dict[str, Any], input_shape: tuple[int, int, int], num_classes: int
) -> nn.Module:
    """The network for one trial: `blocks` residual blocks per stage, `channels` in the first
    stage (doubled in each next one), `dropout` before the linear head."""
    blocks, channels = int(params["blocks"]), int(params["channels"])
    if blocks < 1 or channels < 1:
        raise ValueError(f"blocks and channels must be at least 1, got {blocks=}, {channels=}")
    return ResNet(input_shape[0], num_classes, blocks, channels, float(params["dropout"]))
