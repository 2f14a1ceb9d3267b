"""A trial's life on real stores (Optuna in memory, MLflow on SQLite): whatever training does,
`finish` writes the same ending to Optuna, to MLflow and to the console."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState

from tuner import console, objective
from tuner.data import load_train_val
from tuner.interrupts import Terminated, TrialTimeout
from tuner.objective import Ending, StudyContext, TrialRun, ending_for
from tuner.records import Outcome
from tuner.spec import parse
from tuner.study.setup import create
from tuner.train import Diverged, EpochStats

from .conftest import TINY_STUDY

SPEC = parse({**TINY_STUDY, "name": "objective", "train": {**TINY_STUDY["train"], "epochs": 2}})


@pytest.fixture(scope="module")
def ctx(stores, fake_cifar: Path) -> StudyContext:
    created = create(SPEC, stores)
    data = load_train_val(fake_cifar, SPEC.data, SPEC.seed, torch.device("cpu"))
    return StudyContext(SPEC, data, created.tracker, created.runs)


@pytest.fixture
def shown(capsys: pytest.CaptureFixture[str]) -> pytest.CaptureFixture[str]:
    console.show()
    capsys.readouterr()
    return capsys


def run_trial(
    ctx: StudyContext, pruner: optuna.pruners.BasePruner | None = None
) -> tuple[TrialRun, Ending, optuna.trial.FrozenTrial]:
    """Trial 0 of a fresh study, from `attempt` to `finish`, as a worker runs it."""
    study = optuna.create_study(direction="maximize", pruner=pruner or optuna.pruners.NopPruner())
    run = TrialRun(ctx, study.ask())
    ending = run.attempt()
    run.record(ending)
    return run, ending, study.trials[run.trial.number]


def mlflow_run(ctx: StudyContext, run: TrialRun) -> mlflow.entities.Run:
    return ctx.tracker.client.get_run(run.run_id)


def test_a_complete_trial_is_recorded_everywhere(ctx: StudyContext, shown) -> None:
    run, ending, trial = run_trial(ctx)
    assert ending.outcome is Outcome.COMPLETE and trial.state == TrialState.COMPLETE
    assert trial.value == ending.result.history[-1].val_acc
    assert list(trial.intermediate_values) == [1, 2]
    stored = mlflow_run(ctx, run)
    assert stored.info.status == "FINISHED" and stored.data.tags["tuner.state"] == "complete"
    assert stored.data.metrics["final_val_acc"] == pytest.approx(trial.value)
    assert stored.data.tags["tuner.weights_sha256"]
    assert trial.user_attrs["mlflow_run_id"] == run.run_id
    history = [s.val_acc for s in ending.result.history]
    assert stored.data.metrics["objective"] == pytest.approx(trial.value)
    assert stored.data.metrics["best_val_acc"] == pytest.approx(max(history))
    assert stored.data.metrics["epochs_trained"] == 2 and stored.data.params["state"] == "complete"
    # the trial's time outside its epochs (model, run, weights): measured, never negative
    assert stored.data.metrics["overhead_seconds"] > 0
    assert stored.info.run_name == f"0000 {run.params.label()}"  # e.g. `0000 vgg11-bn sgd`
    assert float(stored.data.params["log10_lr"]) == pytest.approx(math.log10(run.params.lr))
    files = {a.path for a in ctx.tracker.client.list_artifacts(run.run_id, "model")}
    assert files == {"model/state_dict.pt", "model/architecture.json"}
    out = shown.readouterr().out
    assert f"[trial 0] start: {run.params.describe()}" in out
    assert "[trial 0] epoch 2/2" in out and f"[trial 0] complete: val_acc {trial.value:.4f}" in out


def test_a_pruned_trial_says_where_it_stopped(ctx: StudyContext, shown) -> None:
    always = optuna.pruners.ThresholdPruner(lower=2.0)  # val_acc is never 2: prune at once
    run, ending, trial = run_trial(ctx, always)
    assert trial.state == TrialState.PRUNED and trial.user_attrs["pruned_at_epoch"] == 1
    # the pruner answers while epoch 2 trains; epoch 2 is never recorded, as if asked in line
    assert list(trial.intermediate_values) == [1]
    history = ctx.tracker.client.get_metric_history(run.run_id, "val_acc")
    assert [m.step for m in history] == [1]
    stored = mlflow_run(ctx, run)
    assert stored.info.status == "FINISHED" and stored.data.tags["tuner.state"] == "pruned"
    assert stored.data.tags["tuner.pruned_at_epoch"] == "1"
    assert "[trial 0] pruned after epoch 1" in shown.readouterr().out
    # no `final_val_acc`: compared on `objective`, it is the value Optuna holds for it
    assert "final_val_acc" not in stored.data.metrics
    assert stored.data.metrics["objective"] == pytest.approx(trial.intermediate_values[1])
    assert stored.data.metrics["epochs_trained"] == 1 and stored.data.params["state"] == "pruned"
    assert stored.info.run_name.endswith(" [pruned]")


def _raising(exc: BaseException):
    """A training loop that finishes epoch 1, then raises `exc`."""

    def fake_train(model, data, config, on_epoch, between_steps):
        on_epoch(EpochStats(1, 2.3, 2.3, 0.1, config.lr, 0.01))
        raise exc

    return fake_train


ROWS = {  # what training raised: Optuna state, fail reason, MLflow status, tuner.state
    "diverged": (Diverged(1, 10, math.nan), TrialState.PRUNED, "diverged", "FAILED", "diverged"),
    "timeout": (TrialTimeout(), TrialState.FAIL, "timeout", "FAILED", "failed"),
    "out of memory": (torch.OutOfMemoryError("CUDA out of memory"), TrialState.FAIL,
                      "out_of_memory", "FAILED", "failed"),
    "error": (ValueError("boom"), TrialState.FAIL, "error: ValueError: boom", "FAILED", "failed"),
    "Ctrl-C": (KeyboardInterrupt(), TrialState.FAIL, "interrupted", "KILLED", "killed"),
    "SIGTERM": (Terminated(), TrialState.FAIL, "terminated", "KILLED", "killed"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROWS))
def test_each_ending_is_written_the_same_to_optuna_mlflow_and_the_console(
    ctx: StudyContext, shown, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    raised, state, reason, status, word = ROWS[case]
    ctx = replace(ctx, trainer=_raising(raised))
    run, ending, trial = run_trial(ctx)
    assert trial.state == state and trial.user_attrs["fail_reason"] == reason
    stored = mlflow_run(ctx, run)
    assert (stored.info.status, stored.data.tags["tuner.state"]) == (status, word)
    assert stored.data.tags["tuner.fail_reason"].startswith(reason)
    assert stored.data.tags["tuner.epochs_run"] == "1"
    assert f"[trial 0] {word}" in shown.readouterr().out
    assert stored.data.params["state"] == word and stored.info.run_name.endswith(f" [{word}]")
    metrics = {k: stored.data.metrics.get(k) for k in ("objective", "best_val_acc")}
    assert metrics == {"objective": 0.1 if case == "diverged" else None, "best_val_acc": 0.1}
    assert stored.data.metrics["epochs_trained"] == 1
    assert (ending.stop is raised) == (status == "KILLED"), "a stop is raised again after"
    if case == "diverged":
        assert trial.constraints == {"diverged": 1.0}, "the sampler is told to avoid it"
    if case == "error":
        error = ctx.tracker.client.download_artifacts(run.run_id, "error.txt")
        assert (
            "ValueError: boom" in Path(error).read_text()
            and "Traceback" in Path(error).read_text()
        )


def test_out_of_memory_queues_the_point_once_at_half_the_batch(
    ctx: StudyContext, shown, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = replace(ctx, trainer=_raising(torch.OutOfMemoryError("out of memory")))
    study = optuna.create_study(direction="maximize")
    for _ in range(2):  # the trial, then its retry, which runs out of memory too
        run = TrialRun(ctx, study.ask())
        run.record(run.attempt())
    first, retry = study.trials
    assert retry.user_attrs["grad_accumulation"] == 2 and retry.user_attrs["retry_of"] == 0
    assert retry.params == first.params
    assert len(study.trials) == 2, "a retry that runs out of memory again is not queued"
    out = shown.readouterr().out
    assert "[trial 0] out of memory: queued a retry at batch 16 × 2 accumulation steps" in out
    assert "(retry of trial 0) at batch 16 × 2 steps" in out
    assert "[trial 1] failed: out_of_memory; not retried" in out


def test_what_is_no_trials_business_is_not_an_ending(ctx: StudyContext) -> None:
    study = optuna.create_study()
    run = TrialRun(ctx, study.ask())
    assert ending_for(run, SystemExit(0)) is None
    assert ending_for(run, KeyboardInterrupt()).outcome is Outcome.KILLED


def test_train_config_takes_the_fixed_settings_and_the_drawn_point() -> None:
    from tuner.space import decode

    params = decode({"depth": "vgg11", "batch_norm": True, "dropout": 0.1, "optimizer": "adam",
                     "lr_adam": 1e-3, "weight_decay": 1e-4, "augment": "flip"})  # fmt: skip
    config = objective.train_config(SPEC, params, seed=5, accumulation=2)
    assert (config.optimizer, config.lr, config.augment) == ("adam", 1e-3, "flip")
    assert (config.epochs, config.batch_size, config.seed, config.accumulation) == (2, 32, 5, 2)


def test_a_hung_trial_is_recorded_from_the_watchdog_as_a_timeout(ctx: StudyContext) -> None:
    """`record_hang` (the watchdog thread, before the process ends): failed in Optuna, its run
    FAILED with the reason, the epochs it had and the same summary metrics as any trial."""
    study = optuna.create_study(direction="maximize")
    run = TrialRun(ctx, study.ask())
    run.start()
    run.on_epoch(EpochStats(1, 2.3, 2.3, 0.25, 0.01, 0.1))
    run.record_hang()
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[0].user_attrs["fail_reason"] == "timeout"
    stored = mlflow_run(ctx, run)
    assert stored.info.status == "FAILED" and stored.data.tags["tuner.fail_reason"] == "timeout"
    assert stored.data.tags["tuner.epochs_run"] == "1" and stored.info.run_name.endswith(
        "[failed]"
    )
    assert stored.data.metrics["best_val_acc"] == 0.25 and "objective" not in stored.data.metrics
    error = ctx.tracker.client.download_artifacts(run.run_id, "error.txt")
    assert "hung past limits.trial_timeout" in Path(error).read_text()


def test_a_trial_that_trained_every_epoch_is_complete_whatever_the_pruner_says(
    ctx: StudyContext, shown
) -> None:
    always = optuna.pruners.ThresholdPruner(lower=2.0)  # it would prune at every epoch
    one = ctx.spec.model_copy(update={"train": ctx.spec.train.model_copy(update={"epochs": 1})})
    run, ending, trial = run_trial(replace(ctx, spec=one), always)
    assert ending.outcome is Outcome.COMPLETE and trial.state == TrialState.COMPLETE
    assert "[trial 0] complete: val_acc" in shown.readouterr().out
