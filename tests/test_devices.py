from __future__ import annotations

import re

import pytest
import torch

from tuner import devices
from tuner.errors import ConfigError


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch reports on a machine with four GPUs (this one has none)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0", [0]), ("0,2", [0, 2]), (" 1 , 3 ", [1, 3]), ("2,2,0", [2, 0]), ("all", [0, 1, 2, 3])],
)
def test_gpus_parses_indices_and_all(four_gpus: None, spec: str, expected: list[int]) -> None:
    assert devices.gpus(spec) == [torch.device("cuda", i) for i in expected]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0,x", "takes CUDA indices such as 0,1 or 'all', got '0,x'"),
        ("4", "--gpus 4: torch sees 4 CUDA GPU"),
        ("-1", "torch sees 4"),
        ("", "torch sees 4"),
    ],
)
def test_gpus_names_what_is_wrong(four_gpus: None, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        devices.gpus(spec)


def test_gpus_on_a_machine_without_any(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="torch sees 0 CUDA GPU"):
        devices.gpus("all")


def test_pick_auto_is_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.pick("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda:1: no CUDA GPU is visible"):
        devices.pick("cuda:1")
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N, got 'gpu0'"):
        devices.pick("gpu0")


def test_out_of_memory_is_recognised_on_both_kinds() -> None:
    assert devices.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")
    assert devices.is_out_of_memory(cpu)
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("meta", "--device takes auto, cpu, cuda or cuda:N, got 'meta'"),
        ("cpu:3", "--device takes auto, cpu, cuda or cuda:N, got 'cpu:3'"),
        ("cuda:4", "--device cuda:4: torch sees 4 CUDA GPU(s)"),
        ("cuda:9", "--device cuda:9: torch sees 4 CUDA GPU(s)"),
    ],
)
def test_a_device_that_is_not_there_is_refused(
    four_gpus: None, monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=re.escape(message)):
        devices.pick(name)
    assert devices.pick("cuda:3") == torch.device("cuda", 3)
