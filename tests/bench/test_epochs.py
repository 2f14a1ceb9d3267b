"""`tuner bench`: its arithmetic on known inputs, and a real (tiny) run on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuner.bench.epochs import BenchConfig, PilImages, _row, bench_data, run_bench


def test_reference_dataset_serves_normalized_crops(fake_cifar: Path) -> None:
    split, source = bench_data(fake_cifar, 400, torch.device("cpu"))
    assert len(split) == 400 and "repeated to 400" in source  # the fake set has 300
    image, label = PilImages(split.images.numpy(), split.labels.numpy())[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -3 < image.mean().item() < 3 and 0 <= label < 10


def test_without_data_the_images_are_synthetic_and_say_so(tmp_path: Path) -> None:
    split, source = bench_data(tmp_path, 64, torch.device("cpu"))
    assert len(split) == 64 and source == "synthetic images (no CIFAR-10 found)"


def test_a_row_times_the_median_epoch_after_the_warm_up() -> None:
    reference = _row("vgg11", "ref", ([9.0, 4.0, 4.4, 4.2], float("nan")), 1000, None)
    assert reference.epoch_seconds == pytest.approx(4.2) and reference.ratio is None
    assert reference.warmup_seconds == pytest.approx(4.8) and reference.peak_gib is None
    row = _row("vgg11", "tuner", ([30.0, 1.0, 1.2, 1.4], 2.5), 1024, reference)
    assert row.epoch_seconds == pytest.approx(1.2)
    assert row.images_per_second == pytest.approx(1024 / 1.2)
    assert row.ratio == pytest.approx(4.2 / 1.2) and row.warmup_seconds == pytest.approx(28.8)
    assert row.peak_gib == 2.5


@pytest.mark.slow
def test_a_tiny_cpu_run_measures_every_path_and_packing(tmp_path: Path) -> None:
    cfg = BenchConfig(depths=("vgg11",), batch_size=128, images=512, width=0.0625, epochs=2,
                      loader_workers=0, packed=(1, 2), packed_depth="vgg11", modes=(),
                      device=torch.device("cpu"))  # fmt: skip
    rows, packed, source = run_bench(cfg, tmp_path)
    assert [r.path for r in rows] == ["DataLoader+PIL fp32 b128", "tuner eager b128"]
    assert all(r.epoch_seconds > 0 and r.warmup_seconds is not None for r in rows)
    assert rows[1].ratio == pytest.approx(rows[0].epoch_seconds / rows[1].epoch_seconds)
    assert [p.workers for p in packed] == [1, 2] and packed[0].ratio == 1.0
    assert packed[1].images_per_second > 0, "two processes trained and reported"
    assert "synthetic" in source


def test_a_googlenet_is_timed_by_its_name() -> None:
    from tuner.bench.epochs import label, network

    model = network("googlenet-2s", 0.125).train()
    logits, aux = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10) and len(aux) == 2, "auxiliary heads on: the dearer kind"
    assert label("googlenet-2s") == "googlenet-2s" and label("vgg16") == "vgg16-bn"
