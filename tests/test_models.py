from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tuner.models import (
    LAYERS,
    VGG,
    Architecture,
    Dropout,
    build,
    build_vgg,
    load_state,
)

CONVS = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no-bn"])
@pytest.mark.parametrize("depth", list(CONVS))
def test_shapes_and_layers(depth: str, batch_norm: bool) -> None:
    model = build_vgg(depth, batch_norm=batch_norm, dropout=0.3, width=0.125)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == CONVS[depth]
    assert len(norms) == (CONVS[depth] if batch_norm else 0)
    assert all((c.bias is None) == batch_norm for c in convs)
    assert [round(m.p.item(), 6) for m in model.modules() if isinstance(m, Dropout)] == [0.3]


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5])
def test_dropout_drops_that_share_in_training_and_nothing_in_eval(p: float) -> None:
    layer = Dropout(p)
    x = torch.ones(200_000)
    out = layer(x)
    assert (out == 0).float().mean().item() == pytest.approx(p, abs=0.01)
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)  # survivors scaled by 1/(1-p)
    assert torch.equal(layer.eval()(x), x)


def test_width_multiplier_scales_channels() -> None:
    full = build_vgg("vgg11", batch_norm=True)
    tiny = build_vgg("vgg11", batch_norm=True, width=0.125)
    assert [m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d)][-1] == 512
    assert [m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)][-1] == 64
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(tiny) < count(full) / 40


def test_standard_vgg16_size() -> None:
    # conv weights of VGG16 (14.7 M) + BN + a 512→10 head: the standard CIFAR VGG16-BN
    params = sum(p.numel() for p in build_vgg("vgg16", batch_norm=True).parameters())
    assert 14_700_000 < params < 14_800_000


def test_unknown_depth_is_named() -> None:
    with pytest.raises(ValueError, match="vgg12"):
        build_vgg("vgg12", batch_norm=True)


def test_table_has_five_pools_per_variant() -> None:
    assert all(row.count("M") == 5 for row in LAYERS.values())


SEEDED = {
    "vgg": Architecture("vgg", {"depth": "vgg11", "batch_norm": False, "dropout": 0.1}, 0.125),
    "googlenet": Architecture("googlenet", {"stages": 2, "width": 1.0, "aux": True,
                                            "aux_weight": 0.3, "dropout": 0.1}, 0.125),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(SEEDED))
def test_trial_models_are_seeded_not_global(family: str) -> None:
    arch = SEEDED[family]
    torch.manual_seed(1)
    a = build(arch, seed=7).state_dict()
    torch.manual_seed(2)
    b = build(arch, seed=7).state_dict()
    c = build(arch, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_weights_have_stable_names_by_part() -> None:
    names = list(build_vgg("vgg11", batch_norm=True, width=0.125).state_dict())
    assert names[0] == "features.0.weight" and names[-1] == "classifier.2.bias"
    assert {n.split(".")[0] for n in names} == {"features", "classifier"}


def _as_bare_sequential(model: VGG) -> dict[str, torch.Tensor]:
    """The weights as tuner saved them before the parts had names (one nn.Sequential)."""
    legacy = nn.Sequential(*model.features, *model.classifier)
    return legacy.state_dict()


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no-bn"])
def test_old_checkpoints_still_load(batch_norm: bool) -> None:
    trained = build_vgg("vgg13", batch_norm=batch_norm, dropout=0.2, width=0.125)
    old = _as_bare_sequential(trained)
    assert "0.weight" in old, "the old naming"
    fresh = build_vgg("vgg13", batch_norm=batch_norm, dropout=0.2, width=0.125)
    load_state(fresh, old)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), trained.eval()(x))


def test_weights_of_another_architecture_fail_clearly() -> None:
    saved = build_vgg("vgg11", batch_norm=True, width=0.125).state_dict()
    with pytest.raises(ValueError, match="not a vgg16-bn at width 0.125"):
        load_state(build_vgg("vgg16", batch_norm=True, width=0.125), saved)
    with pytest.raises(ValueError, match="not a vgg16-bn"):
        load_state(build_vgg("vgg16", batch_norm=True, width=0.125), _as_bare_sequential(
            build_vgg("vgg11", batch_norm=True, width=0.125)))  # fmt: skip


def test_architecture_round_trips_through_json() -> None:
    arch = Architecture("vgg", {"depth": "vgg19", "batch_norm": True, "dropout": 0.3}, 0.5,
                        100, (1, 28, 28))  # fmt: skip
    assert Architecture.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    model = build(arch)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 100)


def test_records_written_before_families_are_vggs() -> None:
    old = {"depth": "vgg11", "batch_norm": False, "dropout": 0.1, "width": 0.25}  # pre-VGG class
    arch = Architecture.from_dict(old)
    assert arch == Architecture("vgg", {"depth": "vgg11", "batch_norm": False, "dropout": 0.1},
                                0.25)  # fmt: skip
    assert isinstance(build(arch), VGG)


@pytest.mark.parametrize("size", [28, 32, 64])
def test_vgg_takes_small_images_of_any_channels(size: int) -> None:
    """Pools round up (28 → … → 1), and what five pools leave of a larger image is averaged."""
    model = build_vgg("vgg11", batch_norm=True, width=0.125, num_classes=7, in_channels=1)
    assert model.eval()(torch.zeros(2, 1, size, size)).shape == (2, 7)
