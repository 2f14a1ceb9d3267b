"""The pieces that let many nodes share one study, each on its own (the real servers are in
test_multinode): URLs and drivers, pools, blips waited out, the parent claimed once, seeds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from tuner import _optuna
from tuner.errors import ConfigError
from tuner.spec import parse
from tuner.store_errors import patiently, shown
from tuner.stores import (
    POOL_OVERFLOW,
    POOL_SIZE,
    engine_options,
    local_artifacts_warning,
    missing_driver,
    resolve,
    schema_race,
    server_database,
)
from tuner.study.setup import make_sampler

from .conftest import TINY_STUDY

PG = "postgresql://tuner:s3cret@db.example:5432/optuna"


def test_a_password_is_never_shown() -> None:
    assert "s3cret" not in shown(PG)
    assert shown(PG) == "postgresql://tuner:***@db.example:5432/optuna"
    assert shown("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert "s3cret" not in resolve("mlruns", PG).describe()


def test_which_urls_are_database_servers() -> None:
    assert server_database(PG)
    assert server_database("mysql+pymysql://u@h/db")
    assert not server_database("sqlite:////tmp/x.db")
    assert not server_database("http://127.0.0.1:5000")
    assert not server_database("file:///tmp/mlruns")


def test_a_missing_driver_is_named_with_what_to_install() -> None:
    try:
        raise ImportError("No module named 'psycopg'")
    except ImportError as exc:
        error = missing_driver(PG, exc)
    assert isinstance(error, ConfigError)
    assert "pip install 'tuner[postgres]'" in str(error) and "psycopg 3" in str(error)
    assert "s3cret" not in str(error)
    assert missing_driver(PG, ValueError("other")) is None


def test_a_server_gets_a_small_checked_named_pool() -> None:
    options = engine_options(PG)
    assert options["pool_pre_ping"] is True
    assert (options["pool_size"], options["max_overflow"]) == (POOL_SIZE, POOL_OVERFLOW)
    assert options["connect_args"]["application_name"].startswith("tuner ")
    assert "pool_size" not in engine_options("sqlite:////tmp/x.db")


def test_the_artifact_root_comes_from_the_flag_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TUNER_ARTIFACT_ROOT", raising=False)
    assert resolve(tmp_path).artifact_root == (tmp_path / "artifacts").resolve().as_uri()
    monkeypatch.setenv("TUNER_ARTIFACT_ROOT", "s3://bucket/studies")
    assert resolve(tmp_path).artifact_root == "s3://bucket/studies"
    assert resolve(tmp_path, artifact_root="/shared/a").artifact_root == "file:///shared/a"
    assert resolve(tmp_path, tracking_uri="http://h:5000").artifact_root is None


def test_local_artifacts_beside_a_database_server_are_warned_about(tmp_path: Path) -> None:
    on_db = resolve(tmp_path, PG, PG)
    warning = local_artifacts_warning(on_db, "s", lambda: "file:///node1/mlruns/artifacts/1")
    assert warning and "/node1/mlruns/artifacts/1" in warning and "mlflow server" in warning
    assert local_artifacts_warning(on_db, "s", lambda: "s3://bucket/1") is None
    on_file = resolve(tmp_path)
    assert local_artifacts_warning(on_file, "s", lambda: "file:///x") is None


def test_schema_races_are_told_from_other_errors() -> None:
    duplicate = sqlalchemy.exc.IntegrityError(
        "CREATE TYPE", {}, Exception('duplicate key value violates "pg_type_typname"')
    )
    exists = sqlalchemy.exc.ProgrammingError("CREATE TABLE", {}, Exception("already exists"))
    assert schema_race(duplicate) and schema_race(exists)
    assert not schema_race(sqlalchemy.exc.OperationalError("x", {}, Exception("refused")))


def _failing_first(*errors: str) -> Callable[[], str]:
    """A store call that fails with each of `errors` in turn (as the driver says it), then
    answers "ok"."""
    failures = [sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(e)) for e in errors]

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    return call


def test_a_server_that_blips_is_waited_out_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    call = _failing_first("server closed the connection unexpectedly",
                          "the database system is starting up")  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert patiently(call, "the test store") == "ok"
    lines = [r.getMessage() for r in caplog.records]
    assert sum("waiting for the test store: unreachable" in line for line in lines) == 1
    assert sum("answers again" in line for line in lines) == 1


def test_a_deadlock_is_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL and MySQL end one transaction of a deadlock; it goes through when tried again
    (as Optuna tries a new trial again)."""
    call = _failing_first("deadlock detected")
    with caplog.at_level(logging.INFO):
        assert patiently(call, "the test store") == "ok"
    assert "waiting for the test store: in a deadlock" in caplog.text


def test_an_error_that_does_not_pass_is_raised_at_once() -> None:
    calls = []

    def call() -> None:
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("no such table: trials"))

    with pytest.raises(sqlalchemy.exc.OperationalError):
        patiently(call, "the test store")
    assert len(calls) == 1


def test_the_first_claim_wins_and_the_others_adopt_it(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    study = optuna.create_study(study_name="s", storage=storage)
    study_id = study._study_id
    assert _optuna.claim_user_attr(storage, study_id, "parent", "first") == "first"
    assert _optuna.claim_user_attr(storage, study_id, "parent", "second") == "first"
    assert storage.get_study_user_attrs(study_id)["parent"] == "first"


def test_tpe_counts_the_trials_of_other_nodes_as_running_lies() -> None:
    sampler = make_sampler(parse(TINY_STUDY), 0)
    assert sampler._constant_liar is True


def test_the_progress_note_gives_the_runs_pace_and_what_is_left() -> None:
    import datetime

    import optuna
    from optuna.trial import TrialState, create_trial

    from tuner.records import SESSION_ATTR
    from tuner.study.worker import Budget, progress_note

    study = optuna.create_study(direction="maximize")
    start = datetime.datetime(2026, 11, 24, 8, 0, 0)
    for n, state in enumerate([TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]):
        trial = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                             user_attrs={SESSION_ATTR: "s1" if n < 2 else "other"})  # fmt: skip
        trial.datetime_start = start + datetime.timedelta(seconds=10 * n)
        trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=10)
        study.add_trial(trial)
    killed = create_trial(state=TrialState.FAIL, user_attrs={SESSION_ATTR: "s1"})
    killed.datetime_start = start + datetime.timedelta(seconds=30)
    study.add_trial(killed)  # Ctrl-C: queued again, so not done
    study.enqueue_trial({}, user_attrs={"retry_of": 3})
    now = start.timestamp() + 40  # 2 of this run's trials finished in 40 s: 20 s each
    budget = Budget("s1", trials=8, deadline=None)  # the study aims at 8: 3 done, 5 left
    assert progress_note(budget, study, now) == "  (3/8 done, about 1 min 40 s left)"
    more = Budget("s1", trials=8, deadline=None, more=True)  # 8 more: 2 done, 6 left
    assert progress_note(more, study, now) == "  (2/8 done, about 2 min 00 s left)"
    soon = Budget("s1", trials=8, deadline=now + 30, more=True)
    assert progress_note(soon, study, now) == "  (2/8 done, about 30 s left)"
    assert progress_note(Budget("s1", trials=3, deadline=None), study, now) == "  (3/3 done)"
