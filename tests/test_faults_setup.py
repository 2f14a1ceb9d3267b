"""Faults around a study's set-up, injected for real: `study create` killed while it builds the
stores, study files edited between runs, stores deleted under a study, and bad data. After each,
the stores are checked and `status`, `run` and `ensemble` must still work (or refuse in one
line that says what to do)."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from .conftest import TINY_STUDY, write_batch, write_fake_cifar
from .helpers import (
    mlflow_runs,
    no_leftovers,
    quick,
    role,
    start,
    stored,
    trial_runs,
    tuner,
    wait_until,
)
from .test_faults import study_file

pytestmark = pytest.mark.slow
ONE_EPOCH = {**TINY_STUDY["train"], "epochs": 1}


def _parents(cwd: Path, name: str) -> list[mlflow.entities.Run]:
    return [r for r in mlflow_runs(cwd, name) if role(r) == "study"]


# -- 1. `study create` stopped while MLflow builds its tables ----------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_first_create_stopped_while_mlflow_builds_its_tables(
    tmp_path: Path, fake_cifar: Path, sig: signal.Signals, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    study_file(tmp_path, "fresh", trials=1, train=ONE_EPOCH)
    create = start(tmp_path, fake_cifar, "study", "create", "fresh")
    mlruns = tmp_path / "mlruns"
    wait_until(lambda: bool(list(mlruns.glob(".mlflow.db.building-*"))), "MLflow's migrations")
    create.send_signal(sig)
    out, err = create.communicate(timeout=60)
    assert create.returncode == {signal.SIGKILL: -9, signal.SIGTERM: 143}.get(sig, 130), err
    if sig != signal.SIGKILL:
        assert "Traceback" not in err
        assert err.strip().endswith("nothing was left half-made; run the same command again")
        assert not list(mlruns.glob(".mlflow.db.building-*")), "cleaned up on the way out"
    assert not (mlruns / "mlflow.db").exists(), "no half-built store in place"

    again = quick(tmp_path, fake_cifar, monkeypatch, capsys, "study", "create", "fresh")
    assert again.returncode == 0, again.stderr
    assert not list(mlruns.glob(".*.building-*")), "a killed build's file is removed"
    assert len(_parents(tmp_path, "fresh")) == 1
    if sig != signal.SIGKILL:
        return  # the stores are as after a plain create: running works as after the kill
    run = tuner(tmp_path, fake_cifar, "study", "run", "fresh")
    assert run.returncode == 0, run.stderr
    assert [t.state.name for t in stored(tmp_path, "fresh").trials] == ["COMPLETE"]


# -- 2. `study create` killed between its study-attribute writes -------------------------------


def _kill_between_attribute_writes(cwd: Path, data: Path) -> set[str]:
    """Start `study create`, SIGKILL it as soon as its first study attribute is stored; the
    attribute keys it left."""
    create = start(cwd, data, "study", "create", "partial")
    db = cwd / "mlruns" / "optuna.db"
    keys: set[str] = set()
    deadline = time.monotonic() + 120
    while create.poll() is None and time.monotonic() < deadline:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                keys = {k for (k,) in con.execute("SELECT key FROM study_user_attributes")}
        except sqlite3.Error:  # not built yet
            keys = set()
        if keys:
            create.kill()
            break
        time.sleep(0.001)
    create.communicate(timeout=60)
    with sqlite3.connect(db) as con:
        return {k for (k,) in con.execute("SELECT key FROM study_user_attributes")}


def test_create_killed_between_attribute_writes_is_finished_by_the_next_command(
    tmp_path: Path, fake_cifar: Path
) -> None:
    for attempt in range(5):  # the kill must land inside a window of milliseconds
        cwd = tmp_path / str(attempt)
        study_file(cwd, "partial", trials=1, train=ONE_EPOCH)
        left = _kill_between_attribute_writes(cwd, fake_cifar)
        if "mlflow_parent_run_id" not in left:
            break
    else:
        pytest.fail("five kills all landed after the set-up was whole")
    assert left, "killed after its first attribute"
    status = tuner(cwd, fake_cifar, "study", "status", "partial")
    assert status.returncode == 0, status.stderr  # status reads Optuna only: no harm

    run = tuner(cwd, fake_cifar, "study", "run", "partial")
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stdout, "no false alarm about a changed file"
    attrs = stored(cwd, "partial").user_attrs
    assert {"mlflow_parent_run_id", "mlflow_experiment_id", "spec_sha256", "spec"} <= set(attrs)
    parents = _parents(cwd, "partial")
    assert [p.info.run_id for p in parents] == [attrs["mlflow_parent_run_id"]], "one parent"
    assert set(trial_runs(cwd, "partial")) == {0}
    no_leftovers(cwd, "partial")


# -- 7 and 8. the study file edited between runs ------------------------------------------------


@pytest.fixture(scope="module")
def ran_once_template(tmp_path_factory: pytest.TempPathFactory, fake_cifar: Path) -> Path:
    cwd = tmp_path_factory.mktemp("ran-once")
    study_file(cwd, "edited", trials=1, train=ONE_EPOCH)
    out = tuner(cwd, fake_cifar, "study", "run", "edited")
    assert out.returncode == 0, out.stderr
    return cwd


@pytest.fixture
def ran_once(tmp_path: Path, ran_once_template: Path) -> Path:
    """A study with one finished trial, copied for each test (its artifacts stay with the
    template, where the experiment says they are)."""
    for part in ("studies", "mlruns"):
        shutil.copytree(ran_once_template / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("artifacts"))  # fmt: skip
    return tmp_path


def _edit(cwd: Path, section: str, value: object) -> Path:
    path = cwd / "studies" / "edited.yaml"
    raw = yaml.safe_load(path.read_text())
    raw[section] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_an_edited_search_space_is_refused_with_the_diff(
    ran_once: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from .test_faults import ONE_POINT

    path = _edit(ran_once, "space", {**ONE_POINT, "depth": ["vgg13"], "augment": ["none"]})
    for command in ("run", "create"):
        out = quick(ran_once, fake_cifar, monkeypatch, capsys, "study", command, "edited")
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert f"studies/{path.name}: the search space differs" in out.stderr
        assert "space.depth: ['vgg11'] → ['vgg13']" in out.stderr
        assert "space.augment: ['flip'] → ['none']" in out.stderr
    assert len(stored(ran_once, "edited").trials) == 1, "no trial added, failed or not"


def test_edited_settings_are_refused_unless_allowed_and_then_recorded(
    ran_once: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    _edit(ran_once, "train", {**ONE_EPOCH, "epochs": 2})
    for command in ("create", "run"):
        out = quick(ran_once, fake_cifar, monkeypatch, capsys, "study", command, "edited")
        assert out.returncode == 2, out.stderr
        assert "studies/edited.yaml: the fixed settings differ" in out.stderr
        assert "train.epochs: 1 → 2" in out.stderr and "--allow-changed-settings" in out.stderr
    spec_yaml = ran_once / "spec.yaml"
    parent = _parents(ran_once, "edited")[0].info.run_id
    mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="spec.yaml",
                                        dst_path=str(ran_once))  # fmt: skip
    assert yaml.safe_load(spec_yaml.read_text())["train"]["epochs"] == 1, "kept as created"

    out = tuner(ran_once, fake_cifar, "study", "run", "edited", "--allow-changed-settings",
                "--trials", "1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "trials from now on train with changed settings" in out.stdout
    study = stored(ran_once, "edited")
    old, new = (t.user_attrs["settings_sha256"] for t in study.trials)
    assert old != new
    assert study.user_attrs[f"settings:{new}"]["train"]["epochs"] == 2
    assert study.user_attrs[f"settings:{old}"]["train"]["epochs"] == 1
    assert len(study.trials[1].intermediate_values) == 2, "trained with the new settings"

    _edit(ran_once, "trials", 3)  # steering the search, not what a trial trains: free
    _edit(ran_once, "train", ONE_EPOCH)
    out = quick(ran_once, fake_cifar, monkeypatch, capsys, "study", "status", "edited")
    assert out.returncode == 0
    assert (
        quick(ran_once, fake_cifar, monkeypatch, capsys, "study", "create", "edited").returncode
        == 0
    )


# -- 10. stores that no longer belong together ---------------------------------------------------


@pytest.mark.parametrize("lost", ["parent run deleted", "mlflow.db deleted", "optuna.db deleted"])
def test_stores_that_disagree_are_refused_not_merged(
    ran_once: Path, fake_cifar: Path, lost: str
) -> None:
    mlruns = ran_once / "mlruns"
    parent = _parents(ran_once, "edited")[0].info.run_id
    if lost == "parent run deleted":
        mlflow.MlflowClient(f"sqlite:///{mlruns}/mlflow.db").delete_run(parent)
        expected = f"mlflow runs restore --run-id {parent}"
    elif lost == "mlflow.db deleted":
        for path in mlruns.glob("mlflow.db*"):
            path.unlink()
        expected = "has no such experiment under that id"
    else:
        for path in mlruns.glob("optuna.db*"):
            path.unlink()
        expected = "has no such study: was the Optuna storage deleted or moved?"
    for command in (("study", "run", "edited"), ("ensemble", "edited", "--top", "1"),
                    ("report", "edited")):  # fmt: skip
        out = tuner(ran_once, fake_cifar, *command)  # a process: no engine of this one's
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        assert expected in out.stderr, out.stderr
        if lost == "optuna.db deleted":
            break  # no study to ensemble or report: they say so (exit 1)
    if lost != "mlflow.db deleted":
        made = 0 if lost == "parent run deleted" else 1  # (search_runs hides deleted runs)
        assert len(_parents(ran_once, "edited")) == made, "no second parent"
        assert len(trial_runs(ran_once, "edited")) == 1, "no second run for trial 0"


# -- 11. bad data in the data folder --------------------------------------------------------------


def test_bad_data_stops_a_run_with_one_line_before_any_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_fake_cifar(tmp_path / "data")
    batch = data / "cifar-10-batches-py" / "data_batch_2"
    rng = np.random.default_rng(0)
    write_batch(batch, rng.random((150, 3, 32, 32)).astype(np.float32), np.arange(150) % 10)
    study_file(tmp_path, "bad", trials=1, train=ONE_EPOCH)
    out = tuner(tmp_path, data, "study", "run", "bad")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {batch}: pixels are float32 in [0, 1], expected uint8 in 0..255 (images "
        "scaled to [0, 1] would train as black: save them as uint8)"
    ]
    assert stored(tmp_path, "bad").trials == [], "no trial started"
    os.unlink(batch)
