"""The worker loop in this process, on real stores and real signals."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from tuner import _optuna, interrupts, objective
from tuner.data import load_train_val
from tuner.objective import StudyContext, TrialRun
from tuner.spec import parse
from tuner.study.setup import create, open_study
from tuner.study.worker import Budget, run_one
from tuner.train import EpochStats

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


def test_the_budget_counts_this_runs_trials_once_each(setup) -> None:
    study, _ = setup
    budget = Budget("me", trials=2, deadline=None)
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


def test_run_one_takes_a_trial_until_the_budget_is_spent(setup, signal_handlers) -> None:
    study, ctx = setup
    budget = Budget("me", trials=1, deadline=None)
    assert run_one(study, ctx, budget, threading.Lock())
    assert not run_one(study, ctx, budget, threading.Lock())
    ctx.recorder.flush()  # a completed trial is recorded beside the next (`work` waits for it)
    [trial] = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["session"] == "me"


def test_sigterm_while_training_fails_the_trial_and_stops_the_worker(
    setup, signal_handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, ctx = setup

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(objective, "train", interrupted)
    with pytest.raises(interrupts.Terminated):
        run_one(study, ctx, Budget("me", 3, None), threading.Lock())
    [trial] = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "terminated"
    run = ctx.tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"


def test_sigterm_mid_trial_leaves_every_epoch_it_trained_in_both_stores(
    setup, signal_handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, ctx = setup
    three = SPEC.train.model_copy(update={"epochs": 5})
    ctx = StudyContext(ctx.spec.model_copy(update={"train": three}), ctx.data, ctx.tracker,
                       ctx.runs)  # fmt: skip

    def three_epochs_then_sigterm(model, data, config, on_epoch, between_steps):
        for epoch in (1, 2, 3):  # handed to the epoch writer, which writes in its own thread
            on_epoch(EpochStats(epoch, 1.0, 1.0, epoch / 10, 0.01, 0.1))
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(objective, "train", three_epochs_then_sigterm)
    with pytest.raises(interrupts.Terminated):
        run_one(study, ctx, Budget("me", 3, None), threading.Lock())
    [trial] = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}
    history = ctx.tracker.client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_sigterm_while_a_completed_trial_is_recorded_leaves_it_whole(
    setup, signal_handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, ctx = setup
    finish = TrialRun.finish

    def interrupted_finish(self, ending):
        if self.trial.number == 0:  # as its weights are being saved, to the process (`kill`)
            os.kill(os.getpid(), signal.SIGTERM)
        return finish(self, ending)

    monkeypatch.setattr(TrialRun, "finish", interrupted_finish)
    with pytest.raises(interrupts.Terminated):
        try:  # as `work` runs trials
            while run_one(study, ctx, Budget("me", 3, None), threading.Lock()):
                pass
        finally:
            ctx.recorder.flush()
    first, *rest = study.get_trials()
    assert first.state == TrialState.COMPLETE, "recorded whole, then the worker stops"
    run = ctx.tracker.client.get_run(first.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert all(t.state == TrialState.FAIL for t in rest), "the next trial, if begun, is failed"


def test_a_signal_that_came_between_trials_starts_no_new_one(setup, signal_handlers) -> None:
    study, ctx = setup
    interrupts.defer()
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_one(study, ctx, Budget("me", 3, None), threading.Lock())
    assert study.get_trials() == [], "no trial was asked for"
