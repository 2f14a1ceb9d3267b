"""`--device` and `--gpus` to torch devices, each checked against what torch sees."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.errors import ConfigError

if TYPE_CHECKING:
    import torch


def pick(name: str = "auto") -> torch.device:
    """`auto` (the GPU when there is one), `cpu`, `cuda` or `cuda:N`."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    # tuner's path: CPU and CUDA; `cpu:N` names nothing other than `cpu`
    if device is None or not (device.type == "cuda" or str(device) == "cpu"):
        raise ConfigError(f"--device takes auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ConfigError(f"--device {name}: torch sees {count} CUDA GPU(s) on this machine")
    return device


def gpus(spec: str) -> list[torch.device]:
    """`--gpus 0,1` or `all` → [cuda:0, cuda:1]; repeats are dropped."""
    import torch

    count = torch.cuda.device_count()
    if spec.strip() == "all":
        indices = list(range(count))
    else:
        try:
            indices = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(
                f"--gpus takes CUDA indices such as 0,1 or 'all', got {spec!r}"
            ) from None
    if not indices or any(not 0 <= i < count for i in indices):
        raise ConfigError(f"--gpus {spec}: torch sees {count} CUDA GPU(s) on this machine")
    return [torch.device("cuda", i) for i in dict.fromkeys(indices)]


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator failing (a RuntimeError there)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def release_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back, so the next trial starts from empty."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe(device: torch.device) -> str:
    """The device in words, with torch's version: the first line of a benchmark table."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"
