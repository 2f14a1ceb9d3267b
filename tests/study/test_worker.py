"""The worker loop in this process, on real stores and real signals."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from tuner import _optuna, interrupts
from tuner.data import load_train_val
from tuner.objective import StudyContext, TrialRun
from tuner.records import Outcome
from tuner.spec import parse
from tuner.study.setup import create, open_study
from tuner.study.worker import Budget, run_one
from tuner.train import EpochStats, TrainResult

from ..conftest import TINY_STUDY

SPEC = parse({**TINY_STUDY, "train": {**TINY_STUDY["train"], "epochs": 1},
              "pruner": {"type": "none"}})  # fmt: skip


@pytest.fixture(scope="module")
def data(fake_cifar: Path):
    return load_train_val(fake_cifar, SPEC.data, SPEC.seed, torch.device("cpu"))


@pytest.fixture
def setup(stores, data, request: pytest.FixtureRequest):
    """A study of its own for each test."""
    spec = SPEC.model_copy(update={"name": f"worker-{request.node.name[:50]}"})
    created = create(spec, stores)
    return open_study(spec, stores), StudyContext(spec, data, created.tracker, created.runs)


def test_trials_more_counts_this_runs_trials_once_each(setup) -> None:
    """`--trials 2`: two more, counted once each."""
    study, _ = setup
    budget = Budget("me", trials=2, deadline=None, more=True)
    assert not budget.spent(study)
    study.enqueue_trial({}, user_attrs={"session": "other"})
    study.tell(_optuna.ask(study), 0.5)  # another run's trial
    lost = _optuna.ask(study)
    lost.set_user_attr("session", "me")
    study.tell(lost, state=TrialState.FAIL)
    study.enqueue_trial({}, user_attrs={"session": "me", "retry_of": lost.number})
    assert not budget.spent(study), "a lost trial and its queued retry count once, later"
    retry = _optuna.ask(study)
    study.tell(retry, 0.4)
    assert not budget.spent(study)
    done = _optuna.ask(study)
    done.set_user_attr("session", "me")
    study.tell(done, 0.3)
    assert budget.spent(study)
    assert Budget("new", trials=5, deadline=time.time() - 1).spent(study), "past the --timeout"


def test_the_files_trials_are_what_the_study_aims_at_whoever_ran_them(setup) -> None:
    """Run again after a stop, a study runs the trials left of its budget, not a new budget;
    a trial queued again (interrupted, lost) counts once it has run again."""
    study, _ = setup
    aim = Budget("second", trials=4, deadline=None)
    for value in (0.5, 0.6):  # an earlier run's
        trial = _optuna.ask(study)
        trial.set_user_attr("session", "first")
        study.tell(trial, value)
    stopped = _optuna.ask(study)
    stopped.set_user_attr("session", "first")
    study.tell(stopped, state=TrialState.FAIL)
    study.enqueue_trial(stopped.params, user_attrs={"retry_of": stopped.number})
    assert aim.left(study) == 2, "two of four counted; the stopped one runs again"
    running = _optuna.ask(study)  # the retry, on another worker or node
    assert aim.left(study) == 1
    study.tell(running, 0.7)
    assert aim.left(study) == 1 and aim.counted(study) == 3
    assert Budget("third", trials=4, deadline=None, more=True).left(study) == 4


def test_a_trial_stopped_by_a_signal_never_counts_even_before_its_retry_is_queued(setup) -> None:
    """Seen: `(2/8 done)` in the moment between a stopped trial's end and its retry."""
    study, _ = setup
    stopped = _optuna.ask(study)
    stopped.set_user_attr("fail_reason", "terminated")
    study.tell(stopped, state=TrialState.FAIL)
    assert Budget("me", 4, None).counted(study) == 0


def test_a_retry_trains_with_the_seed_of_its_points_first_trial(setup) -> None:
    from tuner.retries import queue_again

    study, _ = setup
    first = _optuna.ask(study)
    study.tell(first, state=TrialState.FAIL)
    queue_again(study, first, {})
    second = _optuna.ask(study)  # the retry
    study.tell(second, state=TrialState.FAIL)
    queue_again(study, second, {})
    third = _optuna.ask(study)
    assert third.user_attrs["first_of_point"] == first.number
    assert third.user_attrs["retry_of"] == second.number


def test_a_budget_of_queued_trials_never_asks_the_sampler(setup) -> None:
    """Refits: what is queued is the budget, whatever is left of the count."""
    study, _ = setup
    budget = Budget("me", trials=5, deadline=None, more=True, queued_only=True)
    assert budget.left(study) == 0 and budget.spent(study)
    for lr in (0.1, 0.2):
        study.enqueue_trial({"lr_sgd": lr})
    assert budget.left(study) == 2
    taken = _optuna.ask(study)
    taken.set_user_attr("session", "me")
    assert budget.left(study) == 1
    study.tell(taken, 0.5)
    assert budget.left(study) == 1 and Budget("me", 5, None, more=True).left(study) == 4


def test_run_one_takes_a_trial_until_the_budget_is_spent(setup, signal_handlers) -> None:
    study, ctx = setup
    budget = Budget("me", trials=1, deadline=None)
    assert run_one(study, ctx, budget)
    assert not run_one(study, ctx, budget)
    [trial] = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["session"] == "me"
    run = ctx.tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED", "recorded before run_one returns"


def test_sigterm_while_training_kills_the_trial_queues_its_point_and_stops_the_worker(
    setup, signal_handlers
) -> None:
    study, ctx = setup
    budget = Budget("me", 3, None)

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    with pytest.raises(interrupts.Terminated):
        run_one(study, replace(ctx, trainer=interrupted), budget)
    trial, again = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "terminated"
    run = ctx.tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert again.state == TrialState.WAITING and again.user_attrs["retry_of"] == trial.number
    assert study._storage.get_trial(again._trial_id).system_attrs["fixed_params"] == trial.params
    assert budget.counted(study) == 0, "it counts once it has run again"


def test_sigterm_mid_trial_leaves_every_epoch_it_trained_in_both_stores(
    setup, signal_handlers
) -> None:
    study, ctx = setup
    five = SPEC.train.model_copy(update={"epochs": 5})

    def three_epochs_then_sigterm(model, data, config, on_epoch, between_steps):
        for epoch in (1, 2, 3):
            on_epoch(EpochStats(epoch, 1.0, 1.0, epoch / 10, 0.01, 0.1))
        signal.raise_signal(signal.SIGTERM)

    ctx = replace(ctx, spec=ctx.spec.model_copy(update={"train": five}),
                  trainer=three_epochs_then_sigterm)  # fmt: skip
    with pytest.raises(interrupts.Terminated):
        run_one(study, ctx, Budget("me", 3, None))
    trial, _again = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}
    history = ctx.tracker.client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_sigterm_while_a_completed_trial_is_recorded_leaves_it_whole(
    setup, signal_handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, ctx = setup
    save = TrialRun._save

    def interrupted_save(self, result):
        os.kill(os.getpid(), signal.SIGTERM)  # as its weights are being saved (`kill`)
        return save(self, result)

    monkeypatch.setattr(TrialRun, "_save", interrupted_save)
    with pytest.raises(interrupts.Terminated):
        while run_one(study, ctx, Budget("me", 3, None)):  # as `work` runs trials
            pass
    [trial] = study.get_trials()
    assert trial.state == TrialState.COMPLETE, "recorded whole, then the worker stops"
    run = ctx.tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED"


def test_a_signal_that_came_between_trials_starts_no_new_one(setup, signal_handlers) -> None:
    study, ctx = setup
    interrupts.defer()
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_one(study, ctx, Budget("me", 3, None))
    assert study.get_trials() == [], "no trial was asked for"


def test_a_time_limit_does_not_count_the_wait_for_a_store(setup, signal_handlers) -> None:
    """An epoch's records wait 1.5 s for a store (as a locked one makes them) with a limit of
    1 s: the trial trained 0.2 s, well inside it, and completes."""
    study, ctx = setup
    limits = ctx.spec.limits.model_copy(update={"trial_timeout": 1.0})
    spec = ctx.spec.model_copy(update={"limits": limits})

    def slow_store_epoch(model, data, config, on_epoch, between_steps):
        time.sleep(0.2)
        with interrupts.writing():
            time.sleep(1.5)  # the store is locked
        on_epoch(EpochStats(1, 1.0, 1.0, 0.5, 0.01, 0.2))
        return TrainResult((EpochStats(1, 1.0, 1.0, 0.5, 0.01, 0.2),), None, {})

    ctx = replace(ctx, spec=spec, trainer=slow_store_epoch)
    run = TrialRun(ctx, _optuna.ask(study))
    ending = run.attempt()
    assert ending.outcome is Outcome.COMPLETE, ending
    assert not interrupts.pending()


def test_a_limit_that_came_during_a_write_ends_that_trial_not_the_next(
    setup, signal_handlers
) -> None:
    study, ctx = setup
    limits = ctx.spec.limits.model_copy(update={"trial_timeout": 0.3})
    spec = ctx.spec.model_copy(update={"limits": limits})

    def past_its_limit_then_a_write(model, data, config, on_epoch, between_steps):
        with interrupts.shielded():  # the alarm comes inside a write that is not a store wait
            time.sleep(0.6)
        pytest.fail("the limit is raised when the write is done")

    ctx = replace(ctx, spec=spec, trainer=past_its_limit_then_a_write)
    assert TrialRun(ctx, _optuna.ask(study)).attempt().reason == "timeout"
    assert not interrupts.pending(), "nothing is left for the next trial"
