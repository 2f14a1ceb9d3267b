from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tuner import train as train_module
from tuner.data import Split, TrainVal, load_train_val
from tuner.models import build_vgg
from tuner.spec import DataSpec
from tuner.train import Diverged, TrainConfig, compile_mode, lr_factor, train

CONFIG = TrainConfig(
    epochs=2, batch_size=32, optimizer="nesterov", lr=0.05, weight_decay=5e-4, momentum=0.9,
    schedule="onecycle", warmup_fraction=0.2, label_smoothing=0.0, augment="crop_flip_cutout",
    crop_padding=4, cutout_size=8, seed=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_data(fake_cifar: Path):
    spec = DataSpec(val_size=60, train_size=120)
    return load_train_val(fake_cifar, spec, 0, torch.device("cpu"))


def _model(batch_norm: bool = True) -> torch.nn.Module:
    return build_vgg("vgg11", batch_norm=batch_norm, width=0.0625)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_schedules_warm_up_and_end_where_they_should(schedule: str) -> None:
    factors = [lr_factor(s, 100, schedule, 0.2) for s in range(100)]
    assert all(0 <= f <= 1 for f in factors)
    if schedule == "constant":
        assert set(factors) == {1.0}
    else:
        assert factors[0] == pytest.approx(0.05) and factors[19] == 1.0  # 20 warm-up steps
        assert factors[-1] < 0.05


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam", "adamw"])
def test_trains_and_reports_every_epoch(tiny_data, optimizer: str) -> None:
    lr = 1e-3 if optimizer.startswith("adam") else 0.05
    seen = []
    result = train(_model(), tiny_data, replace(CONFIG, optimizer=optimizer, lr=lr), seen.append)
    assert [s.epoch for s in seen] == [1, 2] and result.history == tuple(seen)
    assert all(s.seconds > 0 and 0 <= s.val_acc <= 1 for s in seen)
    assert result.val_probs.shape == (60, 10)
    assert result.val_probs.sum(1) == pytest.approx(1.0, abs=1e-4)
    assert seen[-1].lr == pytest.approx(0.0, abs=1e-9), "onecycle ends at zero"


def test_with_nothing_held_out_it_trains_on_everything_and_reports_no_validation(
    tiny_data,
) -> None:
    """A refit: train + validation merged; the epochs say so, and no validation metric is
    made up."""
    from tuner.objective import describe_epoch

    merged = tiny_data.merged()
    seen = []
    result = train(_model(), merged, replace(CONFIG, epochs=1), seen.append)
    assert seen[0].val_acc is None and seen[0].val_loss is None
    assert set(seen[0].metrics()) == {"train_loss", "lr_schedule", "epoch_seconds",
                                      "first_step_seconds"}  # fmt: skip
    assert result.val_probs.shape == (0, 10)
    assert "val" not in describe_epoch(seen[0], 1)


def test_same_seed_same_result(tiny_data) -> None:
    model = _model()
    twin = copy.deepcopy(model)
    torch.manual_seed(1)  # the global RNG state must not matter to train()
    a = train(model, tiny_data, CONFIG).history[-1]
    torch.manual_seed(2)
    b = train(twin, tiny_data, CONFIG).history[-1]
    other = train(copy.deepcopy(twin), tiny_data, replace(CONFIG, seed=1)).history[-1]
    assert (a.train_loss, a.val_loss) == (b.train_loss, b.val_loss)
    assert a.train_loss != other.train_loss, "the seed drives order and augmentation"


def test_learns_the_generated_classes(tiny_data) -> None:
    config = replace(CONFIG, epochs=6, augment="flip", optimizer="adam", lr=3e-3)
    result = train(build_vgg("vgg11", batch_norm=True, width=0.125), tiny_data, config)
    assert result.history[-1].val_acc > 0.3  # chance is 0.1


def test_nan_loss_stops_training_at_once(tiny_data) -> None:
    seen = []
    config = replace(CONFIG, optimizer="sgd", lr=1e3, schedule="constant", augment="none")
    with pytest.raises(Diverged) as info:
        train(_model(batch_norm=False), tiny_data, config, seen.append)
    assert info.value.epoch == 1 and seen == [], "no epoch is reported after a NaN"


def test_a_raising_callback_ends_training(tiny_data) -> None:
    class Stop(Exception):
        pass

    def stop_after_first(stats):
        raise Stop

    with pytest.raises(Stop):
        train(_model(), tiny_data, replace(CONFIG, epochs=5), stop_after_first)


def test_compiled_step_is_reused_across_trials_and_dropout_rates(
    tiny_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One compiled graph serves new models of the same architecture whatever their dropout
    (inductor's code generation is left out: same tracing, 40 s less on 2 cores)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(train_module, "_COMPILED", {})
    torch._dynamo.reset()
    counters.clear()
    compiled = replace(CONFIG, compile="inductor", epochs=1)
    losses = []
    for dropout in (0.1, 0.3, 0.45):
        torch.manual_seed(0)
        model = build_vgg("vgg11", batch_norm=True, dropout=dropout, width=0.0625)
        result = train(model, tiny_data, compiled)
        losses.append(result.history[-1].train_loss)
        assert result.history[0].first_step_seconds is not None
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch.manual_seed(0)
    eager = train(build_vgg("vgg11", batch_norm=True, dropout=0.45, width=0.0625), tiny_data,
                  replace(CONFIG, epochs=1))  # fmt: skip
    assert eager.history[-1].train_loss == pytest.approx(losses[-1], rel=1e-4)


def test_half_batch_with_accumulation_gives_the_same_weights() -> None:
    """The out-of-memory retry runs half batches, two per step: the same training."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    data = TrainVal(
        Split(images, torch.arange(64) % 10), Split(images[:8], torch.zeros(8).long()), Path(".")
    )
    config = replace(CONFIG, epochs=1, batch_size=64, optimizer="sgd", lr=0.1, weight_decay=0.0,
                     momentum=0.0, schedule="constant", augment="none")  # fmt: skip
    results = []
    for accumulation in (1, 2, 4):
        model = build_vgg("vgg11", batch_norm=False, width=0.125)
        torch.manual_seed(1)
        model.load_state_dict(build_vgg("vgg11", batch_norm=False, width=0.125).state_dict())
        results.append(train(model, data, replace(config, accumulation=accumulation)).state_dict)
    for other in results[1:]:
        for key, value in results[0].items():
            torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cpu", "off"),
        ("auto", "cuda", train_module.AUTO_ON_GPU),
        ("on", "cpu", "inductor"),
        ("on", "cuda", "inductor"),
        ("inductor", "cuda", "inductor"),
        ("graphs", "cuda", "graphs"),
        ("graphs", "cpu", "off"),  # nothing to capture
        ("off", "cuda", "off"),
    ],
)
def test_compile_setting_to_the_mode_run_on_each_device(
    setting: str, device: str, expected: str
) -> None:
    assert compile_mode(setting, torch.device(device)) == expected


@pytest.mark.slow  # AOT tracing: 5 s on 2 cores
def test_graphs_mode_traces_the_step_as_eager_computes_it() -> None:
    """`graphs` is AOT autograd replayed as CUDA graphs; on the CPU the backend runs the same
    traced forward and backward without capture, so the tracing itself is checked here."""
    import torch._dynamo

    torch._dynamo.reset()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    start = build_vgg("vgg11", batch_norm=True, dropout=0.0, width=0.0625).state_dict()
    grads = []
    for mode in ("off", "graphs"):
        model = build_vgg("vgg11", batch_norm=True, dropout=0.0, width=0.0625)
        model.load_state_dict(start)
        step = train_module.step_function(torch.device("cpu"), mode)
        step(model, images, labels, 0.0).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, traced in zip(*grads, strict=True):
        torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-6)
