"""The whole job through the `tuner` command, as a user runs it, on generated data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch

from tuner.cli import main

from .conftest import write_study

pytestmark = pytest.mark.slow


def tuner(cwd: Path, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    hidden = ("MLFLOW_TRACKING_URI", "TUNER_STORAGE")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["TUNER_DATA_DIR"] = str(data)
    return subprocess.run([sys.executable, "-m", "tuner", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def runs(cwd: Path, experiment: str) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def stored_study(cwd: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/mlruns/optuna.db")


def role(run: mlflow.entities.Run) -> str:
    return run.data.tags.get("tuner.role", "")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory, fake_cifar: Path) -> Path:
    """A tiny study created and run through the CLI; the tests below read what it left."""
    cwd = tmp_path_factory.mktemp("user")
    write_study(cwd)
    first = tuner(cwd, fake_cifar, "study", "create", "tiny")
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout and "mlruns/optuna.db" in first.stdout
    again = tuner(cwd, fake_cifar, "study", "create", "tiny")
    assert again.returncode == 0 and "already exists" in again.stdout
    ran = tuner(cwd, fake_cifar, "study", "run", "tiny")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (cwd / "run.log").write_text(ran.stdout)
    return cwd


def test_run_prints_progress_per_trial_and_epoch(study_dir: Path) -> None:
    log = (study_dir / "run.log").read_text()
    assert "[trial 0] start: " in log and "[trial 0] epoch 1/2" in log
    assert "ran " in log and "best so far: trial" in log


def test_optuna_holds_every_trial(study_dir: Path) -> None:
    study = stored_study(study_dir)
    assert len(study.trials) == 4
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED", "FAIL"}
    assert any(t.state.name == "COMPLETE" for t in study.trials)
    optuna_cli = str(Path(sys.executable).parent / "optuna")
    listed = subprocess.run(
        [optuna_cli, "trials", "--study-name", "tiny", "--storage", "sqlite:///mlruns/optuna.db",
         "-f", "json"], cwd=study_dir, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert len(json.loads(listed.stdout)) == 4


def test_one_nested_mlflow_run_per_trial(study_dir: Path) -> None:
    all_runs = runs(study_dir, "tiny")
    parents = [r for r in all_runs if role(r) == "study"]
    assert len(parents) == 1
    parent = parents[0]
    trials = [r for r in all_runs if role(r) == "trial"]
    assert len(trials) == 4
    study = stored_study(study_dir)
    states = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    client = mlflow.MlflowClient()
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        trial = study.trials[int(run.data.tags["optuna.trial_number"])]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["tuner.state"] == states[trial.state.name]
        assert {"depth", "batch_norm", "dropout", "optimizer", "lr", "weight_decay", "augment",
                "train.epochs", "optuna_trial_number"} <= set(run.data.params)  # fmt: skip
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == list(range(1, len(trial.intermediate_values) + 1))
        for metric in ("train_loss", "val_loss", "lr", "epoch_seconds"):
            assert metric in run.data.metrics
        if trial.state.name == "COMPLETE":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["final_val_acc"] == pytest.approx(trial.value)
            files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
            assert "model/state_dict.pt" in files
            weights = client.download_artifacts(run.info.run_id, "model/state_dict.pt")
            state = torch.load(weights, weights_only=True)
            assert all(isinstance(v, torch.Tensor) for v in state.values())
            assert client.list_artifacts(run.info.run_id, "predictions")
        if trial.state.name == "PRUNED":
            assert run.data.tags["tuner.pruned_at_epoch"] == str(len(trial.intermediate_values))


def test_parent_run_carries_the_best_value_and_plots(study_dir: Path) -> None:
    parent = next(r for r in runs(study_dir, "tiny") if role(r) == "study")
    study = stored_study(study_dir)
    assert parent.data.metrics["best_val_acc"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    assert parent.info.status == "FINISHED"


def test_status_shows_states_and_the_best_trial(study_dir: Path, fake_cifar: Path) -> None:
    out = tuner(study_dir, fake_cifar, "study", "status", "tiny")
    assert out.returncode == 0, out.stderr
    assert "complete:" in out.stdout and "pruned:" in out.stdout and "failed:" in out.stdout
    assert "best: trial" in out.stdout and "top " in out.stdout


def test_ensemble_scores_the_top_trials_and_logs_a_run(study_dir: Path, fake_cifar: Path) -> None:
    out = tuner(study_dir, fake_cifar, "ensemble", "tiny", "--top", "3")
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("ensemble test accuracy", "ensemble test log-loss", "gain over best member"):
        assert line in out.stdout
    study = stored_study(study_dir)
    complete = sorted((t for t in study.trials if t.state.name == "COMPLETE"),
                      key=lambda t: -t.value)[:3]  # fmt: skip
    all_runs = runs(study_dir, "tiny")
    ensembles = [r for r in all_runs if role(r) == "ensemble"]
    assert len(ensembles) == 1
    run = ensembles[0]
    parent = next(r for r in all_runs if role(r) == "study")
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["tuner.members"].split(",") == [
        t.user_attrs["mlflow_run_id"] for t in complete
    ]
    assert 0 <= run.data.metrics["test_acc"] <= 1 and run.data.metrics["test_log_loss"] > 0
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "confusion_matrix.png" in files


def test_running_again_continues_the_study(study_dir: Path, fake_cifar: Path) -> None:
    out = tuner(study_dir, fake_cifar, "study", "run", "tiny", "--trials", "1")
    assert out.returncode == 0, out.stderr
    study = stored_study(study_dir)
    assert len(study.trials) == 5
    assert len([r for r in runs(study_dir, "tiny") if role(r) == "trial"]) == 5


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_ui_binds_loopback_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    started = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: started.append(command) or 0)
    args = ["ui"] if host == "127.0.0.1" else ["ui", "--host", host]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    command = started[0]
    assert command[command.index("--host") + 1] == host
    assert command[command.index("--backend-store-uri") + 1].endswith("mlruns/mlflow.db")
    out = capsys.readouterr().out
    assert f"http://{host}:5000" in out
    assert ("no authentication" in out) == (host != "127.0.0.1")
