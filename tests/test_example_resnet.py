"""The example of a user's model builder (examples/resnet.py) meets tuner's contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples.resnet import build
from tuner.models import Architecture, check_builder

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"blocks": 1, "channels": 8, "dropout": 0.2}


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["28x28x1", "32x32x3"])
def test_builds_for_small_images(shape: tuple[int, int, int]) -> None:
    model = build(PARAMS, shape, 7)
    assert model.train()(torch.randn(4, *shape)).shape == (4, 7)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["28x28x1", "32x32x3"])
def test_tuner_accepts_it_as_a_study_files_builder(
    shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # tuner looks for `examples.resnet` from the folder it runs in
    arch = Architecture("builder", PARAMS, 1.0, 10, shape, builder="examples.resnet:build")
    check_builder(arch)


@pytest.mark.parametrize("blocks", [1, 2])
def test_blocks_add_depth(blocks: int) -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    deeper = build({**PARAMS, "blocks": blocks + 1}, (3, 32, 32), 10)
    assert count(deeper) > count(build({**PARAMS, "blocks": blocks}, (3, 32, 32), 10))
