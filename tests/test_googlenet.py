from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tuner.models import Architecture, build, load_state
from tuner.models.googlenet import (
    INCEPTION,
    STAGES,
    GoogLeNet,
    GoogLeNetConfig,
    build_googlenet,
)

SHAPES = [(1, 28, 28), (3, 32, 32)]
HEADS = {1: 1, 2: 2, 3: 2}  # auxiliary heads by stages: after 3a; after 4a and 4d


def tiny(stages: int, *, aux: bool = False, width: float = 0.125, **kw: object) -> GoogLeNet:
    return GoogLeNet(GoogLeNetConfig(stages, width, aux, **kw), seed=0)  # type: ignore[arg-type]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# the output column of the paper's table 1: the channels each module leaves
@pytest.mark.parametrize(("name", "out"), [
    ("3a", 256), ("3b", 480), ("4a", 512), ("4b", 512), ("4c", 512), ("4d", 528), ("4e", 832),
    ("5a", 832), ("5b", 1024),
])  # fmt: skip
def test_table_is_the_papers(name: str, out: int) -> None:
    assert INCEPTION[name].out == out
    assert sum(STAGES, ()) == tuple(INCEPTION)


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_shapes(stages: int, shape: tuple[int, int, int]) -> None:
    model = tiny(stages, num_classes=7, in_channels=shape[0])
    assert model.eval()(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_training_with_aux_returns_each_heads_logits(stages: int) -> None:
    model = tiny(stages, aux=True, aux_weight=0.25, in_channels=1)
    logits, aux = model.train()(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    assert [a.shape for a in aux] == [(2, 10)] * HEADS[stages]
    assert model.aux_weight.item() == 0.25  # the training loop's weight for each head's loss
    assert "aux_weight" not in model.state_dict()
    out = model.eval()(torch.randn(2, 1, 28, 28))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_without_aux_there_are_no_heads(stages: int) -> None:
    with_aux, without = tiny(stages, aux=True), tiny(stages)
    assert len(without.aux) == 0
    assert not any(name.startswith("aux.") for name in without.state_dict())
    assert count(without) < count(with_aux)
    assert isinstance(without.train()(torch.randn(2, 3, 32, 32)), torch.Tensor)


def test_weights_have_stable_names_by_part() -> None:
    names = list(tiny(3, aux=True).state_dict())
    assert names[0] == "stem.conv.weight" and names[-1] == "classifier.fc.bias"
    assert {n.split(".")[0] for n in names} == {"stem", "stages", "aux", "classifier"}
    assert "stages.0.0.b5.conv2.conv.weight" in names  # 3a's 5×5 branch, its second 3×3
    assert "aux.1.head.weight" in names  # the head after 4d


def test_weights_round_trip_through_load_state() -> None:
    trained, fresh = (GoogLeNet(GoogLeNetConfig(2, 0.125, aux=True), seed=s) for s in (1, 2))
    load_state(fresh, trained.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), trained.eval()(x))
    with pytest.raises(ValueError, match="not this network"):
        load_state(tiny(3, aux=True), trained.state_dict())


@pytest.mark.parametrize(("small", "large"), [
    ({"stages": 2, "width": 0.125}, {"stages": 2, "width": 0.25}),
    ({"stages": 1, "width": 0.125}, {"stages": 2, "width": 0.125}),
    ({"stages": 2, "width": 0.125}, {"stages": 3, "width": 0.125}),
])  # fmt: skip
def test_parameters_grow_with_width_and_stages(small: dict, large: dict) -> None:
    assert count(tiny(**small)) < count(tiny(**large))


def test_built_from_its_architecture_record() -> None:
    """The study file's width multiplies the drawn one; without heads, aux_weight may be absent."""
    params = {"stages": 2, "width": 0.25, "aux": False, "dropout": 0.3}
    arch = Architecture("googlenet", params, 0.5, 10, (1, 28, 28))
    assert Architecture.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    model = build(arch, seed=0)
    assert isinstance(model, GoogLeNet) and model.config.width == 0.125
    assert model.stem.conv.out_channels == 24  # 192 × 0.125
    assert model.train()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="stages=4"):
        GoogLeNetConfig(4)
    with pytest.raises(ValueError, match="lack aux, dropout"):
        build_googlenet({"stages": 1, "width": 1.0}, width=1.0, in_channels=1, num_classes=10)
