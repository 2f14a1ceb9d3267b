"""`tuner bench` on the CPU with a tiny model: the table is there and its figures add up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tuner.bench import PilImages, bench_data
from tuner.cli import main


def test_reference_dataset_serves_normalized_crops(fake_cifar: Path) -> None:
    import torch

    split, source = bench_data(fake_cifar, 400, torch.device("cpu"))
    assert len(split) == 400 and "repeated to 400" in source  # the fake set has 300
    image, label = PilImages(split.images.numpy(), split.labels.numpy())[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -3 < image.mean().item() < 3 and 0 <= label < 10


@pytest.mark.slow
def test_bench_prints_the_table_with_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "--device", "cpu", "--images", "512", "--width", "0.0625",
            "--depths", "vgg11", "--batch-size", "128", "--epochs", "2",
            "--loader-workers", "0", "--packed", "1,2", "--data-dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "synthetic images (no CIFAR-10 found)" in out
    reference = re.search(r"vgg11-bn\s+DataLoader\+PIL fp32 b128\s+([\d.]+)\s+([\d,]+)", out)
    tuner = re.search(r"vgg11-bn\s+tuner eager b128\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)", out)
    assert reference and tuner, out
    seconds_ref, seconds = float(reference.group(1)), float(tuner.group(1))
    assert float(tuner.group(3)) == pytest.approx(seconds_ref / seconds, rel=0.02)
    assert float(tuner.group(2).replace(",", "")) == pytest.approx(512 / seconds, rel=0.02)
    packed = re.findall(r"^(\d)\s+([\d,]+)\s+([\d.]+)$", out, re.MULTILINE)
    assert [p[0] for p in packed] == ["1", "2"] and packed[0][2] == "1.00"
