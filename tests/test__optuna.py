"""The wrapper around Optuna's private API, on a real RDB storage with heartbeats."""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.testing.pytest_storages import StorageTestCase
from optuna.trial import TrialState

from tuner import _optuna

from .helpers import wait_until


def _study(tmp_path: Path, grace: int = 2) -> optuna.Study:
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=grace,
    )  # fmt: skip
    return optuna.create_study(storage=storage, study_name="s")


def test_ask_is_quiet_and_heartbeat_marks_the_trial_alive(tmp_path: Path) -> None:
    study = _study(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trial = _optuna.ask(study)
    with _optuna.heartbeat(trial, "[trial 0]"):
        pass
    assert _optuna.stale_trials(study) == [], "a fresh heartbeat is not stale"
    assert _optuna.frozen(trial).state == TrialState.RUNNING


def test_a_trial_whose_heartbeat_stopped_is_stale_after_the_grace_period(tmp_path: Path) -> None:
    study = _study(tmp_path, grace=1)
    trial = _optuna.ask(study)
    with _optuna.heartbeat(trial, "[trial 0]"):
        pass  # the worker dies: no more heartbeats
    wait_until(lambda: bool(_optuna.stale_trials(study)), "a stale trial")
    assert [t.number for t in _optuna.stale_trials(study)] == [trial.number]


def test_a_trial_that_never_beat_is_stale_once_it_started_longer_ago_than_grace(
    tmp_path: Path,
) -> None:
    """Its worker died between `ask` and its first heartbeat: Optuna never fails such a trial
    (it has no heartbeat to be stale); tuner does, once it started longer ago than grace."""
    study = _study(tmp_path, grace=1)
    trial = _optuna.ask(study)
    assert _optuna.stale_trials(study) == [], "just asked"
    wait_until(lambda: bool(_optuna.stale_trials(study)), "a silent trial")
    assert [t.number for t in _optuna.stale_trials(study)] == [trial.number]


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


def test_fail_from_outside_records_the_reason_once(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = _optuna.ask(study)
    frozen = _optuna.frozen(trial)
    assert _optuna.fail_from_outside(study, frozen, "fail_reason", "worker killed by SIGKILL")
    assert not _optuna.fail_from_outside(study, frozen, "fail_reason", "again"), "ended already"
    stored = study.get_trials()[0]
    assert stored.state == TrialState.FAIL
    assert stored.user_attrs["fail_reason"] == "worker killed by SIGKILL"


@pytest.fixture(autouse=True)
def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- reading trials without the ORM ------------------------------------------------------------


def _canonical(trial: optuna.trial.FrozenTrial) -> tuple:
    """Every field of a trial, NaN comparable."""

    def same(x):
        return "nan" if isinstance(x, float) and x != x else x

    values = trial.values and [same(v) for v in trial.values]
    intermediate = {k: same(v) for k, v in trial.intermediate_values.items()}
    return (trial._trial_id, trial.number, trial.state, values, trial.datetime_start,
            trial.datetime_complete, trial.params, trial.distributions, trial.user_attrs,
            trial.system_attrs, intermediate)  # fmt: skip


def _every_kind_of_trial(study: optuna.Study) -> None:
    def point(trial):
        trial.suggest_float("lr", 1e-5, 1.0, log=True)
        trial.suggest_int("width", 16, 512, step=16)
        trial.suggest_categorical("optimizer", ["sgd", "adam", None])
        trial.suggest_float("dropout", 0.0, 0.5, step=0.1)

    done = study.ask()
    point(done)
    for step, v in enumerate([0.1, float("nan"), float("inf"), float("-inf"), 0.5]):
        done.report(v, step)
    done.set_user_attr("mlflow_run_id", "abc")
    done.set_user_attr("nested", {"a": [1, 2.5, None], "b": True})
    study.tell(done, 0.75)
    best = study.ask()
    point(best)
    study.tell(best, float("inf"))
    pruned = study.ask()
    point(pruned)
    pruned.report(0.2, 1)
    pruned.set_user_attr("fail_reason", "diverged")
    study.tell(pruned, state=TrialState.PRUNED)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    running = study.ask()
    point(running)
    running.report(0.3, 0)
    study.enqueue_trial({"lr": 0.01}, user_attrs={"retry_of": 2})
    study.tell(study.ask(), float("-inf"))  # popped from the queue: fixed params, system attrs
    study.enqueue_trial({"lr": 0.02})  # waiting


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def storage_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/optuna.db"
    return request.getfixturevalue("postgres_url")()


def test_trials_read_without_the_orm_are_optunas_every_field(storage_url: str) -> None:
    """`read_trials` stands in for `RDBStorage._get_trials` under the study's cache: for every
    state, inf and nan values, attributes of every JSON type, queued and popped trials, and
    each way the cache asks (all, by state, unfinished and newer), the same trials."""
    storage = optuna.storages.RDBStorage(storage_url)
    study = optuna.create_study(storage=storage, study_name="kinds", direction="maximize")
    _every_kind_of_trial(study)
    study_id = study._study_id
    for states, included, greater in [
        (None, set(), -1),
        ((TrialState.RUNNING, TrialState.WAITING), set(), -1),
        ((TrialState.COMPLETE,), set(), -1),
        (None, {5}, 3),  # the cache's second read: those unfinished, and those newer
        (None, set(), 4),
    ]:
        ours = _optuna.read_trials(storage, study_id, states, included, greater)
        theirs = optuna.storages.RDBStorage._get_trials(
            storage, study_id, states, included, greater
        )
        assert [_canonical(t) for t in ours] == [_canonical(t) for t in theirs], (states, included)
        assert ours, "something was read"
    with pytest.raises(KeyError):
        _optuna.read_trials(storage, study_id + 1, None, set(), -1)


def test_the_study_cache_reads_through_it(tmp_path: Path, monkeypatch) -> None:
    from tuner._optuna import PatientStorage

    calls = []
    read = _optuna.read_trials
    monkeypatch.setattr(_optuna, "read_trials", lambda *a: calls.append(a) or read(*a))
    storage = PatientStorage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(storage=storage, study_name="cached")
    _every_kind_of_trial(study)
    again = optuna.load_study(study_name="cached", storage=storage)
    assert [_canonical(t) for t in again.get_trials()] == [
        _canonical(t) for t in optuna.storages.RDBStorage.get_all_trials(storage, study._study_id)
    ]
    assert calls, "the cache read through read_trials"


def test_trials_read_by_more_ids_than_sqlite_binds_are_optunas(tmp_path: Path) -> None:
    """SQLite binds at most 32,766 values in a statement (its default; this build's
    connections are held to it): a longer list of ids to read is read as Optuna reads it."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(storage=storage, study_name="many", direction="maximize")
    _every_kind_of_trial(study)
    limit = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
    sqlalchemy.event.listen(storage.engine, "connect", lambda db, _: db.setlimit(limit, 32_766))
    storage.engine.dispose()  # the connections made so far allow more
    greater = 40_000
    included = set(range(1, greater)) - {2, 4}  # ids of trials that are not there, mostly
    ours = _optuna.read_trials(storage, study._study_id, None, included, greater)
    theirs = optuna.storages.RDBStorage._get_trials(
        storage, study._study_id, None, included, greater
    )
    assert [_canonical(t) for t in ours] == [_canonical(t) for t in theirs]
    assert [t._trial_id for t in ours] == [1, 3, 5, 6, 7]


@pytest.mark.slow  # a schema made for each of some sixty tests
class TestPatientStorageIsOptunas(StorageTestCase):
    """Optuna's own tests of a storage, on the storage every tuner process uses (its own
    `_create_new_trial` and trial reader among them)."""

    @pytest.fixture
    def storage(self, storage_url: str) -> _optuna.PatientStorage:
        return _optuna.PatientStorage(storage_url)


def test_a_trial_taken_carries_its_takers_mark_from_the_first_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new trial and a queued one popped carry the taker's attributes in the transaction
    that makes them RUNNING: no second write, so no moment when a killed worker's trial is
    RUNNING without its mark."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=_optuna.PatientStorage(url), study_name="s")
    study.enqueue_trial({"x": 1.0})
    _optuna.take_as(study, {"worker": "host:1:2", "session": "abc"})

    def no_second_write(*args: object, **kwargs: object) -> None:
        raise AssertionError("the mark was written after the trial was taken")

    monkeypatch.setattr(_optuna.PatientStorage, "set_trial_user_attr", no_second_write)
    queued, new = _optuna.ask(study), _optuna.ask(study)
    elsewhere = optuna.load_study(study_name="s", storage=url)  # another process's view
    for trial in (queued, new):
        held = elsewhere.trials[trial.number]
        assert held.state == TrialState.RUNNING
        assert held.user_attrs == {"worker": "host:1:2", "session": "abc"}
    assert queued.number == 0 and new.number == 1, "the queued trial is taken first"
    monkeypatch.undo()
    study.enqueue_trial({"x": 2.0})  # a template's trial (queued) is nobody's yet
    assert elsewhere.trials[-1].state == TrialState.WAITING
    assert elsewhere.trials[-1].user_attrs == {}
