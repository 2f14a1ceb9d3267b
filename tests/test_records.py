from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from tuner.records import (
    COUNTED,
    REASON_ATTR,
    RECORDS,
    Outcome,
    retried_numbers,
    retry_origin,
    worker_id,
)


@pytest.mark.parametrize(
    ("outcome", "optuna_state", "mlflow_status"),
    [
        (Outcome.COMPLETE, TrialState.COMPLETE, "FINISHED"),
        (Outcome.PRUNED, TrialState.PRUNED, "FINISHED"),
        (Outcome.DIVERGED, TrialState.PRUNED, "FAILED"),  # PRUNED: TPE learns from it
        (Outcome.FAILED, TrialState.FAIL, "FAILED"),
        (Outcome.KILLED, TrialState.FAIL, "KILLED"),
    ],
)
def test_one_map_from_outcome_to_each_store(
    outcome: Outcome, optuna_state: TrialState, mlflow_status: str
) -> None:
    record = RECORDS[outcome]
    assert (record.optuna, record.mlflow, record.word) == (optuna_state, mlflow_status, outcome)


def test_every_outcome_has_a_record() -> None:
    assert set(RECORDS) == set(Outcome)


def _stored(state: TrialState, **user_attrs: object) -> optuna.trial.FrozenTrial:
    study = optuna.create_study()
    trial = study.ask()
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    return study.trials[0]


@pytest.mark.parametrize(
    ("state", "attrs", "expected"),
    [
        (TrialState.COMPLETE, {}, Outcome.COMPLETE),
        (TrialState.PRUNED, {}, Outcome.PRUNED),
        (TrialState.PRUNED, {REASON_ATTR: "diverged"}, Outcome.DIVERGED),
        (TrialState.FAIL, {REASON_ATTR: "timeout"}, Outcome.FAILED),
        (TrialState.FAIL, {REASON_ATTR: "interrupted"}, Outcome.FAILED),  # Optuna: one FAIL
    ],
)
def test_a_stored_trial_reads_back_as_its_outcome(
    state: TrialState, attrs: dict, expected: Outcome
) -> None:
    assert Outcome.of(_stored(state, **attrs)) is expected


def test_status_counts_every_stored_outcome_in_a_fixed_order() -> None:
    assert [o.value for o in COUNTED] == [
        "complete", "pruned", "diverged", "failed", "running", "waiting"
    ]  # fmt: skip


def test_retry_origin_reads_both_kinds_of_retry() -> None:
    assert retry_origin({"retry_of": 3}, {}) == 3, "after out of memory"
    assert retry_origin({}, {"failed_trial": 5}) == 5, "after a dead worker's heartbeat"
    assert retry_origin({}, {}) is None


def test_retried_numbers_collects_every_trial_queued_again() -> None:
    study = optuna.create_study()
    study.enqueue_trial({}, user_attrs={"retry_of": 0})
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    assert retried_numbers(study.trials) == {0}


def test_worker_id_names_host_and_process() -> None:
    host, pid = worker_id(1234).rsplit(":", 1)
    assert host and pid == "1234"
