from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from tuner.records import Outcome
from tuner.study.summary import counts, ranked, summarize


def _study(*trials: tuple[TrialState, float | None, dict]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for state, value, attrs in trials:
        trial = study.ask()
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        if state != TrialState.RUNNING:
            study.tell(trial, value, state=state)
    return study


RUN = {"mlflow_run_id": "r"}


def test_top_trials_break_ties_by_the_earlier_trial_and_skip_those_without_a_run() -> None:
    study = _study(
        (TrialState.COMPLETE, 0.5, RUN),
        (TrialState.COMPLETE, 0.7, {}),  # its worker died before it had a run
        (TrialState.COMPLETE, 0.5, RUN),
        (TrialState.PRUNED, None, RUN),
        (TrialState.COMPLETE, 0.6, RUN),
    )
    trials = study.get_trials()
    assert [t.number for t in ranked(trials)] == [1, 4, 0, 2]
    assert [t.number for t in ranked(trials, 2, with_run=True)] == [4, 0]
    assert [t.number for t in ranked(trials, 10, with_run=True)] == [4, 0, 2]


def test_counts_name_every_outcome_even_when_none() -> None:
    study = _study(
        (TrialState.COMPLETE, 0.5, {}),
        (TrialState.PRUNED, None, {"fail_reason": "diverged"}),
        (TrialState.FAIL, None, {"fail_reason": "timeout"}),
        (TrialState.RUNNING, None, {}),
    )
    assert counts(study.get_trials()) == {
        Outcome.COMPLETE: 1,
        Outcome.PRUNED: 0,
        Outcome.DIVERGED: 1,
        Outcome.FAILED: 1,
        Outcome.RUNNING: 1,
        Outcome.WAITING: 0,
    }


def test_a_run_summary_counts_only_its_own_trials() -> None:
    mine = {"session": "me"}
    study = _study(
        (TrialState.COMPLETE, 0.9, {"session": "earlier"}),
        (TrialState.FAIL, None, {**mine, "fail_reason": "worker killed by SIGKILL"}),
        (TrialState.PRUNED, None, {**mine, "fail_reason": "diverged"}),
        (TrialState.COMPLETE, 0.4, {**mine, "retry_of": 1}),
    )
    summary = summarize(study, "me", 1.5)
    assert summary.ran == {Outcome.FAILED: 1, Outcome.DIVERGED: 1, Outcome.COMPLETE: 1}
    assert [(f.number, f.outcome, f.reason) for f in summary.failures] == [
        (1, Outcome.FAILED, "worker killed by SIGKILL"),
        (2, Outcome.DIVERGED, "diverged"),
    ]
    assert summary.retried == {1: 3}
    assert summary.best.number == 0, "the best of the whole study"
    assert not summary.nothing_finished


@pytest.mark.parametrize(
    ("states", "expected"),
    [([], False), ([TrialState.FAIL], True), ([TrialState.FAIL, TrialState.PRUNED], False)],
)
def test_nothing_finished_means_every_trial_failed(states: list, expected: bool) -> None:
    study = _study(*[(s, None, {"session": "me"}) for s in states])
    assert summarize(study, "me", 0.0).nothing_finished is expected
