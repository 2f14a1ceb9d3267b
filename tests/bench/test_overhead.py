"""`tuner bench overhead` on the real path, at a size a test can afford."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from tuner.cli import cli


@pytest.mark.slow
def test_the_overhead_bench_fills_studies_and_times_the_real_path(tmp_path: Path) -> None:
    keep = tmp_path / "stores"
    result = CliRunner().invoke(
        cli,
        ["bench", "overhead", "--sizes", "0,4", "--trials", "2", "--asks", "2",
         "--epoch-seconds", "0.01", "--keep", str(keep)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "4"], result.output
    for row in rows:  # N, epochs s, wall s, over, start s, end s, trial ms, /trial, epoch ms …
        epochs, wall, over = float(row[1]), float(row[2]), float(row[3].rstrip("%"))
        assert wall > epochs > 0 and over > 0
        assert all(float(value.rstrip("%")) > 0 for value in row[4:11])
    assert "reference: the bare training loop" in result.output
    study = optuna.load_study(
        study_name="overhead-4", storage=f"sqlite:///{keep}/n4/mlruns/optuna.db"
    )
    states = [t.state.name for t in study.trials]
    assert states[:4] == ["COMPLETE"] * 4, "filled"
    assert states[4:6] == ["COMPLETE"] * 2, "then two trials ran the whole path"
    assert all(len(t.intermediate_values) == 15 for t in study.trials[:6])
    assert all("mlflow_run_id" in t.user_attrs for t in study.trials[:6])
