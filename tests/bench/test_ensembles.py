"""`tuner bench ensembles`: whole studies per seed, three ways to use each, one table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tuner import report
from tuner.bench.ensembles import EnsembleBenchConfig, SeedRow, mean_and_spread

from ..conftest import write_study
from ..helpers import tuner


def _row(seed: int, single: float, average: float, greedy: float) -> SeedRow:
    return SeedRow(seed, 20, 1000, single, single + 0.01, average, average + 0.01, greedy,
                   greedy + 0.02, 3, "4:0.50 1:0.25 7:0.25", 300.0, 1.5, 1.4, 1.3)  # fmt: skip


def test_the_table_gives_each_seed_the_mean_the_spread_and_greedy_against_average() -> None:
    cfg = EnsembleBenchConfig("vgg-cifar", (0, 1, 2), 24, 6, 0.25, 64, 5, 1000, None, None,
                              torch.device("cpu"))  # fmt: skip
    rows = [_row(0, 0.50, 0.52, 0.53), _row(1, 0.48, 0.51, 0.51), _row(2, 0.49, 0.50, 0.52)]
    text = report.ensemble_bench(rows, cfg)
    assert "3 studies of 24 trials of 'vgg-cifar'" in text
    assert re.search(r"\n\s+0\s+20\s+0\.5000\s+0\.5100\s+0\.5200\s+0\.5300\s+0\.5300", text)
    assert re.search(r"\n\s+mean\s+0\.4900\s+0\.5000\s+0\.5100", text)
    assert re.search(r"\n\s+± sd\s+0\.0100", text)
    assert "greedy − average: +1.00 ± 1.00 points (wins/ties/losses 2/1/0)" in text
    assert "greedy − best single: +3.00 ± 0.00 points" in text
    assert "test log-loss (mean ± sd): best single 1.5000 ± 0.0000, top-5 avg 1.4000" in text
    assert mean_and_spread([1.0]) == (1.0, 0.0)


@pytest.mark.slow
def test_the_benchmark_runs_whole_studies_and_prints_its_table(
    tmp_path: Path, fake_cifar: Path
) -> None:
    train = {"epochs": 1, "batch_size": 32, "width": 0.0625}
    study = write_study(tmp_path, {"trials": 3, "pruner": {"type": "none"}, "train": train})
    sizes = ["--val-size", "60", "--train-size", "120", "--test-size", "80"]
    out = tuner(tmp_path, fake_cifar, "bench", "ensembles", "--study", str(study),
                "--seeds", "0,1", "--trials", "3", "--epochs", "1", "--width", "0.0625",
                "--batch-size", "32", *sizes, "--jobs", "1", "--top", "2",
                "--keep", str(tmp_path / "kept"))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 studies of 3 trials" in out.stdout and "greedy − average" in out.stdout
    assert re.search(r"\n\s+1\s+3\s+0\.\d{4}", out.stdout), out.stdout
    assert (tmp_path / "kept" / "seed-1" / "study.log").read_text().count("complete") >= 3
