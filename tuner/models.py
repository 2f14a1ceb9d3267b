"""VGG for 32×32 inputs: the variants are rows of one table, built by one function."""

from __future__ import annotations

import torch
from torch import nn

# Output channels per 3×3 conv; "M" is a 2×2 max-pool (Simonyan & Zisserman 2014, table 1).
LAYERS: dict[str, tuple[int | str, ...]] = {
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


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def build_vgg(
    depth: str,
    *,
    batch_norm: bool,
    dropout: float = 0.0,
    width: float = 1.0,
    num_classes: int = 10,
) -> nn.Sequential:
    """VGG features from `LAYERS[depth]`; CIFAR head: five pools leave 1×1, so one linear."""
    if depth not in LAYERS:
        raise ValueError(f"unknown VGG depth {depth!r}; known: {', '.join(LAYERS)}")
    layers: list[nn.Module] = []
    in_channels = 3
    for item in LAYERS[depth]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = scaled(int(item), width)
        # with batch norm the conv's bias is redundant (BN's shift replaces it)
        layers.append(nn.Conv2d(in_channels, out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out
    layers += [nn.Flatten(), Dropout(dropout), nn.Linear(in_channels, num_classes)]
    model = nn.Sequential(*layers)
    _init(model)
    return model


def _init(model: nn.Module) -> None:
    """He init for convs (as torchvision's VGG), small normal for the head."""
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
