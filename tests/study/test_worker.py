"""The worker loop in this process, on real stores and real signals."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from tuner import _optuna, interrupts, objective
from tuner.data import load_train_val
from tuner.objective import StudyContext, TrialRun
from tuner.records import Outcome
from tuner.space import lr_name, suggest
from tuner.spec import parse
from tuner.study.setup import create, open_study
from tuner.study.worker import Ahead, Budget, run_one
from tuner.train import EpochStats

from ..conftest import TINY_STUDY
from ..helpers import wait_until

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


def test_a_budget_of_queued_trials_never_asks_the_sampler(setup) -> None:
    """Refits: what is queued is the budget, whatever is left of the count."""
    study, _ = setup
    budget = Budget("me", trials=5, deadline=None, queued_only=True)
    assert budget.left(study) == 0 and budget.spent(study)
    for lr in (0.1, 0.2):
        study.enqueue_trial({"lr_sgd": lr})
    assert budget.left(study) == 2
    taken = _optuna.ask(study)
    taken.set_user_attr("session", "me")
    assert budget.left(study) == 1
    study.tell(taken, 0.5)
    assert budget.left(study) == 1 and Budget("me", 5, None).left(study) == 4


def test_the_last_trials_are_asked_for_in_line_one_per_worker(setup) -> None:
    """Asked ahead, the last of the budget would wait behind one worker's trial while another
    worker found the budget spent: with 2 workers, one is asked ahead only while 2 are left."""
    study, _ = setup
    budget = Budget("me", trials=4, deadline=None, workers=2)
    for expected in (True, True, True, False):
        assert budget.enough_to_ask_ahead(study) is expected
        _optuna.ask(study).set_user_attr("session", "me")
    assert budget.spent(study) and budget.left(study) == 0


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


# -- the next trial, asked for while one trains -------------------------------------------------


def _states(study) -> dict[int, TrialState]:
    return {t.number: t.state for t in study.get_trials()}


def test_the_next_trial_is_asked_while_one_trains_knowing_the_one_before(
    setup, signal_handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial 1 is asked for and drawn while trial 0 trains; trial 2 once trial 0 is recorded
    (what the sampler would know asked in line). The budget holds: three trials, all trained."""
    study, ctx = setup
    real_train, real_ask = objective.train, _optuna.ask
    seen_at_ask: dict[int, dict[int, TrialState]] = {}

    def ask(study):
        before = _states(study)
        trial = real_ask(study)
        seen_at_ask[trial.number] = before
        return trial

    trained: list[int] = []

    def train(model, data, config, on_epoch, between_steps):
        number = len(trained)  # trials train in the order they were asked
        trained.append(number)
        if number < 2:  # the last is asked for with nothing after it
            wait_until(
                lambda: (
                    len(study.get_trials()) > number + 1 and study.get_trials()[number + 1].params
                ),
                "the next trial drawn",
                20,
            )
        return real_train(model, data, config, on_epoch, between_steps)

    monkeypatch.setattr(_optuna, "ask", ask)
    monkeypatch.setattr(objective, "train", train)
    ahead = Ahead()
    budget = Budget("me", trials=3, deadline=None)
    while run_one(study, ctx, budget, threading.Lock(), ahead):
        pass
    ahead.give_back()
    ctx.recorder.flush()
    assert _states(study) == dict.fromkeys(range(3), TrialState.COMPLETE)
    assert seen_at_ask[1] == {0: TrialState.RUNNING}, "asked while trial 0 trained"
    assert seen_at_ask[2][0] == TrialState.COMPLETE, "asked once trial 0 was recorded"


def test_a_signal_while_training_puts_the_trial_asked_ahead_back_with_its_point(
    setup, signal_handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, ctx = setup

    def interrupted(*args, **kwargs):
        wait_until(lambda: len(study.get_trials()) == 2 and study.get_trials()[1].params,
                   "the next trial drawn")  # fmt: skip
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(objective, "train", interrupted)
    ahead = Ahead()
    with pytest.raises(interrupts.Terminated):
        try:  # as `work` runs trials
            run_one(study, ctx, Budget("me", 3, None), threading.Lock(), ahead)
        except BaseException:
            ahead.give_back()
            raise
    stopped, back = study.get_trials()
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "terminated"
    assert back.state == TrialState.WAITING and "mlflow_run_id" not in back.user_attrs
    taken = _optuna.ask(study)
    assert taken.number == back.number, "the next ask takes it"
    drawn = suggest(taken, ctx.spec.space).as_dict()
    assert drawn["lr"] == back.params[lr_name(drawn["optimizer"])], "with its point"
    assert drawn["dropout"] == back.params["dropout"]
    assert _optuna.frozen(taken).params == back.params


def test_a_time_limit_that_passes_while_training_puts_the_trial_asked_ahead_back(
    setup, signal_handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, ctx = setup
    real_train = objective.train
    over = threading.Event()
    monkeypatch.setattr(Budget, "expired", lambda self: over.is_set())

    def train(*args):
        wait_until(lambda: len(study.get_trials()) == 2, "the next trial asked")
        over.set()  # the run's --timeout passes while trial 0 trains
        return real_train(*args)

    monkeypatch.setattr(objective, "train", train)
    ahead = Ahead()
    budget = Budget("me", 3, None)
    assert run_one(study, ctx, budget, threading.Lock(), ahead)
    assert not run_one(study, ctx, budget, threading.Lock(), ahead), "no trial starts"
    ctx.recorder.flush()
    assert _states(study) == {0: TrialState.COMPLETE, 1: TrialState.WAITING}


def test_work_after_a_record_that_stops_the_worker_is_cancelled() -> None:
    from tuner.errors import StoreError

    class Run:  # the one call the recorder makes on a trial it records
        def finish(self, ending):
            return objective.Ending(Outcome.COMPLETE, stop=StoreError("disk full"))

    done = []
    after = objective.After(lambda: done.append(1))
    with pytest.raises(StoreError, match="disk full"):
        objective.record_completed(
            [objective.Completed(Run(), objective.Ending(Outcome.COMPLETE), ExitStack()), after]
        )
    assert after.future.cancelled() and not done
