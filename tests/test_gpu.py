"""The GPU path for real, on a CUDA GPU (`pytest -m gpu`; `.ci/gpu` runs them there): compiled
steps, graph reuse, accumulation under CUDA graphs, bf16 against fp32, a real CUDA
out-of-memory and packed workers. The CPU suite can only trace this path; where torch sees no
GPU (CI), each test here is skipped."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tuner import train as train_module
from tuner.data import Split, TrainVal, load_train_val
from tuner.models import build_vgg
from tuner.records import WORKER_ATTR
from tuner.spec import DataSpec
from tuner.train import TrainConfig, train

from .conftest import make_images, write_fake_cifar
from .helpers import start, stored, trial_runs
from .test_faults import ONE_POINT, study_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
# the study file's own heartbeat and grace: a compile can hold the interpreter for seconds
LIMITS = {"heartbeat": 10, "grace": 60}
DEV = os.environ.get("TUNER_CIFAR_DEV")  # real images for the bf16/fp32 comparison, when set
ARCHITECTURES = [(d, bn) for d in ("vgg11", "vgg13", "vgg16", "vgg19") for bn in (True, False)]
CONFIG = TrainConfig(
    epochs=2, batch_size=128, optimizer="nesterov", lr=0.02, weight_decay=5e-4, momentum=0.9,
    schedule="onecycle", warmup_fraction=0.2, label_smoothing=0.0, augment="crop_flip",
    crop_padding=4, cutout_size=8, seed=0,
)  # fmt: skip


def synthetic(images: int, val: int, seed: int = 0) -> TrainVal:
    """Learnable CIFAR-shaped images on the GPU (the tests' own, as the CPU suite's)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(images + val) % 10
    x = torch.from_numpy(make_images(labels, rng)).to(CUDA)
    y = torch.from_numpy(labels).long().to(CUDA)
    return TrainVal(Split(x[:images], y[:images]), Split(x[images:], y[images:]), Path("."))


@pytest.fixture(scope="module")
def gpu_data() -> TrainVal:
    return synthetic(1024, 256)


@pytest.fixture
def fresh_compiles(monkeypatch: pytest.MonkeyPatch):
    """No compiled step carried over from another test; dynamo's counters from zero."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(train_module, "_COMPILED", {})
    torch._dynamo.reset()
    counters.clear()
    return counters


def _losses(history) -> list[float]:
    return [stats.train_loss for stats in history]


@pytest.mark.parametrize("mode", ["inductor", "graphs"])
@pytest.mark.parametrize(("depth", "batch_norm"), ARCHITECTURES)
def test_a_compiled_step_trains_each_architecture_as_eager_does(
    mode: str, depth: str, batch_norm: bool, gpu_data: TrainVal, fresh_compiles
) -> None:
    losses = {}
    for run in ("off", mode):
        torch.manual_seed(0)
        model = build_vgg(depth, batch_norm=batch_norm, width=0.5).to(CUDA)
        result = train(model, gpu_data, replace(CONFIG, compile=run))
        losses[run] = _losses(result.history)
        assert result.history[0].first_step_seconds is not None
    assert all(math.isfinite(loss) for loss in losses[mode]), losses
    assert fresh_compiles["inductor"]["cudagraph_skips"] == 0, "ran without CUDA graphs"
    # bf16 both ways; compiled kernels round differently, within a few percent over 16 steps
    assert losses[mode] == pytest.approx(losses["off"], rel=0.05), losses


@pytest.mark.parametrize("mode", ["inductor", "graphs"])
def test_a_second_trial_of_an_architecture_reuses_its_graphs(
    mode: str, gpu_data: TrainVal, fresh_compiles
) -> None:
    config = replace(CONFIG, compile=mode, epochs=1)
    torch.manual_seed(0)
    train(build_vgg("vgg16", batch_norm=True, dropout=0.1).to(CUDA), gpu_data, config)
    graphs = fresh_compiles["stats"]["unique_graphs"]
    assert graphs >= 1
    torch.manual_seed(1)  # another trial: new weights, another dropout rate
    second = train(build_vgg("vgg16", batch_norm=True, dropout=0.4).to(CUDA), gpu_data, config)
    assert fresh_compiles["stats"]["unique_graphs"] == graphs, "compiled again"
    assert math.isfinite(second.history[-1].train_loss)


@pytest.mark.parametrize("mode", ["off", "inductor", "graphs"])
def test_two_accumulated_half_batches_under_cuda_graphs_give_one_batch_weights(
    mode: str, fresh_compiles
) -> None:
    """The out-of-memory retry's training. Under CUDA graphs autograd can take a replay's
    output as a parameter's gradient and the next replay overwrites it (pytorch#169545):
    this is the test that would see it. No batch norm (its statistics are per micro-batch)."""
    data = synthetic(512, 64, seed=1)
    config = replace(CONFIG, epochs=1, batch_size=256, optimizer="sgd", lr=0.05, momentum=0.0,
                     weight_decay=0.0, schedule="constant", augment="none")  # fmt: skip
    config = replace(config, compile=mode)
    torch.manual_seed(0)
    start_weights = build_vgg("vgg11", batch_norm=False, width=0.5).state_dict()
    updates = []
    for accumulation in (1, 2):
        model = build_vgg("vgg11", batch_norm=False, width=0.5)
        model.load_state_dict(start_weights)
        final = train(model.to(CUDA), data, replace(config, accumulation=accumulation))
        updates.append({k: final.state_dict[k] - start_weights[k] for k in start_weights})
    for key, full in updates[0].items():
        error = (updates[1][key] - full).norm() / full.norm()
        assert error < 0.05, f"{key}: the accumulated update differs by {error:.1%}"


def test_bf16_reaches_the_accuracy_of_fp32_within_the_seed_spread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Three seeds each; eager, so that only the precision differs."""
    if DEV:
        data = load_train_val(Path(DEV), DataSpec(val_size=1000), seed=0, device=CUDA)
    else:
        root = write_fake_cifar(tmp_path / "data", per_batch=1000)
        data = load_train_val(root, DataSpec(val_size=500), seed=0, device=CUDA)
    config = replace(CONFIG, epochs=8, lr=0.05)
    accuracy: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for precision in accuracy:
        if precision == "fp32":
            monkeypatch.setattr(train_module, "autocast", lambda device: contextlib.nullcontext())
        for seed in range(3):
            torch.manual_seed(seed)
            model = build_vgg("vgg11", batch_norm=True, width=0.5).to(CUDA)
            result = train(model, data, replace(config, seed=seed))
            accuracy[precision].append(result.history[-1].val_acc)
    spread = max(statistics.stdev(accuracy["bf16"]), statistics.stdev(accuracy["fp32"]))
    gap = abs(statistics.mean(accuracy["bf16"]) - statistics.mean(accuracy["fp32"]))
    print(f"val_acc bf16 {accuracy['bf16']}, fp32 {accuracy['fp32']}; gap {gap:.4f}")
    assert gap <= max(3 * spread, 0.02), accuracy


CAPPED = """
import sys
import torch
torch.cuda.set_per_process_memory_fraction(float(sys.argv[1]))  # the card, made this small
from tuner.cli import main
main(sys.argv[2:])
"""


def _reserved_peak(data: TrainVal, config: TrainConfig) -> int:
    """Bytes the caching allocator held at most while training one step of `config`."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(CUDA)
    torch.manual_seed(0)
    train(build_vgg("vgg11", batch_norm=True, width=1.0).to(CUDA), data, config)
    peak = torch.cuda.max_memory_reserved(CUDA)
    torch.cuda.empty_cache()
    return peak


def test_a_real_cuda_out_of_memory_frees_the_memory_and_the_half_batch_retry_completes(
    tmp_path: Path,
) -> None:
    """The card is capped (the allocator's own limit, so the error is CUDA's) between what a
    batch of 4096 needs and what two accumulated batches of 2048 need, measured here first.
    The retry runs in the same process after the failure: it fits only if the failed
    attempt's memory was given back."""
    batch = 4096
    root = write_fake_cifar(tmp_path / "data", per_batch=2100)
    spec = DataSpec(val_size=100, train_size=batch)
    data = load_train_val(root, spec, seed=0, device=CUDA)
    config = replace(CONFIG, epochs=1, batch_size=batch, augment="flip")
    full = _reserved_peak(data, config)
    half = _reserved_peak(data, replace(config, accumulation=2))
    assert full > 1.3 * half, f"no room between {half / 2**30:.2f} and {full / 2**30:.2f} GiB"
    fraction = (full + half) / 2 / torch.cuda.get_device_properties(CUDA).total_memory
    del data
    torch.cuda.empty_cache()
    train_cfg = {"epochs": 1, "batch_size": batch, "width": 1.0, "compile": "off"}
    study_file(tmp_path, "oom", train=train_cfg, trials=1, limits=LIMITS,
               data={"val_size": 100, "train_size": batch})  # fmt: skip
    run = start(tmp_path, root, f"{fraction:.6f}", "study", "run", "oom", "--device", "cuda",
                python=[sys.executable, "-c", CAPPED])  # fmt: skip
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, out + err
    assert "out of memory: queued a retry at batch 2048 × 2 accumulation steps" in out
    trials = stored(tmp_path, "oom").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], out
    assert trials[0].user_attrs["fail_reason"] == "out_of_memory"
    assert trials[1].user_attrs["grad_accumulation"] == 2
    assert trial_runs(tmp_path, "oom")[0].data.tags["tuner.fail_reason"] == "out_of_memory"


def test_three_workers_packed_on_one_gpu_finish_a_budget(tmp_path: Path) -> None:
    """`--jobs-per-gpu 3` with the study's own compile setting (auto), each worker compiling
    its step once."""
    root = write_fake_cifar(tmp_path / "data", per_batch=600)
    space = {**ONE_POINT, "depth": ["vgg11", "vgg16"]}
    study_file(tmp_path, "packed", space=space, trials=6, limits=LIMITS,
               train={"epochs": 3, "batch_size": 128, "width": 0.5},
               data={"val_size": 200, "train_size": 1000})  # fmt: skip
    run = start(tmp_path, root, "study", "run", "packed", "--gpus", "0", "--jobs-per-gpu", "3")
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, out + err
    trials = stored(tmp_path, "packed").trials
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials), out
    workers = {t.user_attrs[WORKER_ATTR] for t in trials}
    assert len(workers) == 3, f"trials ran on {sorted(workers)}"
    assert all(math.isfinite(t.value) for t in trials)
