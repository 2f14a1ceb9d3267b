"""A bad artifact location is refused before any store is written, or, where only the first
write finds it out, leaves nothing RUNNING and no experiment that keeps it: the command run
again with a corrected --artifact-root makes the study there."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from ..conftest import write_study
from ..helpers import quick, stored


def _experiments(cwd: Path) -> list[mlflow.entities.Experiment]:
    client = mlflow.MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    return client.search_experiments(view_type=mlflow.entities.ViewType.ALL)


def _running(cwd: Path) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    ids = [e.experiment_id for e in _experiments(cwd)]
    return [r for r in client.search_runs(ids) if r.info.status == "RUNNING"]


@pytest.mark.slow  # builds the stores twice (MLflow's migrations): seconds
@pytest.mark.parametrize("bad", ["under a file", "a scheme no artifact store has"])
def test_a_bad_artifact_root_is_one_line_and_can_be_corrected(
    tmp_path, fake_cifar, monkeypatch, capsys, bad: str
) -> None:
    write_study(tmp_path)
    (tmp_path / "a-file").write_text("")
    root = str(tmp_path / "a-file" / "artifacts") if bad == "under a file" else "nosuch://b/x"
    failed = quick(tmp_path, fake_cifar, monkeypatch, capsys, "study", "create", "tiny",
                   "--artifact-root", root)  # fmt: skip
    lines = [x for x in failed.stderr.splitlines() if x.strip()]
    assert failed.returncode in (1, 2) and len(lines) == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    assert "artifact" in lines[0] and "--artifact-root" in lines[0], lines[0]
    assert not _running(tmp_path), "a parent run left RUNNING"
    assert not [e for e in _experiments(tmp_path) if e.name == "tiny"], "kept the location"

    good = tmp_path / "artifacts-here"
    again = quick(tmp_path, fake_cifar, monkeypatch, capsys, "study", "create", "tiny",
                  "--artifact-root", str(good))  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    [experiment] = [e for e in _experiments(tmp_path) if e.name == "tiny"]
    assert experiment.artifact_location == good.as_uri()
    assert list(good.rglob("spec.yaml")), "the parent's spec.yaml went there"
    assert "mlflow_parent_run_id" in stored(tmp_path, "tiny").user_attrs
