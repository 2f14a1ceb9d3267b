"""The wrapper around Optuna's private API, on a real RDB storage with heartbeats."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tuner import _optuna

from .helpers import wait_until


def _study(tmp_path: Path, grace: int = 2) -> optuna.Study:
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=grace,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(1),
    )  # fmt: skip
    return optuna.create_study(storage=storage, study_name="s")


def test_ask_is_quiet_and_heartbeat_marks_the_trial_alive(tmp_path: Path) -> None:
    study = _study(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trial = _optuna.ask(study)
    with _optuna.heartbeat(trial, "[trial 0]"):
        pass
    assert _stale(study) == [], "a fresh heartbeat is not stale"
    assert _optuna.frozen(trial).state == TrialState.RUNNING


def test_a_trial_whose_heartbeat_stopped_is_failed_and_queued_again(tmp_path: Path) -> None:
    study = _study(tmp_path, grace=1)
    trial = _optuna.ask(study)
    trial.suggest_float("x", 0, 1)
    with _optuna.heartbeat(trial, "[trial 0]"):
        pass  # the worker dies: no more heartbeats
    stale: list[int] = []
    wait_until(lambda: bool(stale.extend(_stale(study)) or stale), "a stale trial")
    assert stale == [trial.number]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"] == "no heartbeat"
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params


def test_a_stale_trial_that_is_alive_is_spared(tmp_path: Path) -> None:
    study = _study(tmp_path, grace=1)
    trial = _optuna.ask(study)
    with _optuna.heartbeat(trial, "[trial 0]"):
        pass
    wait_until(lambda: bool(_stale(study, spare=True) == [] and _stale_ids(study)), "stale")
    assert _optuna.frozen(trial).state == TrialState.RUNNING, "its worker lives: spared"


def test_a_heartbeat_survives_a_store_that_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    study = _study(tmp_path)
    trial = _optuna.ask(study)
    beats: list[int] = []
    real = trial.storage.record_heartbeat

    def flaky(trial_id: int) -> None:
        beats.append(trial_id)
        if len(beats) == 1:
            raise optuna.exceptions.StorageInternalError("database is locked")
        real(trial_id)

    monkeypatch.setattr(trial.storage, "record_heartbeat", flaky)
    with caplog.at_level("INFO"), _optuna.heartbeat(trial, "[trial 0]"):
        wait_until(lambda: len(beats) >= 2, "a second beat after the failed one", timeout=30)
    assert "[trial 0] its heartbeat could not be recorded" in caplog.text
    assert "recorded again" in caplog.text


def _stale(study: optuna.Study, spare: bool = False) -> list[int]:
    return _optuna.failed_stale(study, "fail_reason", "no heartbeat", lambda t: spare)


def _stale_ids(study: optuna.Study) -> list[int]:
    return study._storage._get_stale_trial_ids(study._study_id)


def test_fail_from_outside_records_the_reason_once(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = _optuna.ask(study)
    frozen = _optuna.frozen(trial)
    assert _optuna.fail_from_outside(study, frozen, "fail_reason", "worker killed by SIGKILL")
    assert not _optuna.fail_from_outside(study, frozen, "fail_reason", "again"), "ended already"
    stored = study.get_trials()[0]
    assert stored.state == TrialState.FAIL
    assert stored.user_attrs["fail_reason"] == "worker killed by SIGKILL"
    _optuna.retry_dead(study, stored)
    assert study.get_trials()[1].system_attrs["failed_trial"] == 0


@pytest.fixture(autouse=True)
def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
