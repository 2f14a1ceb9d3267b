"""Refits: the best configurations trained again on train + validation, by the study's own
worker loop, as nested MLflow runs of their own role (one epoch, tiny models, real stores)."""

from __future__ import annotations

import pytest
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from tuner import _optuna
from tuner.data import load_train_val
from tuner.ensemble import EnsembleRequest, evaluate
from tuner.errors import TunerError
from tuner.objective import StudyContext, TrialRun
from tuner.records import ROLE_TAG, TRIAL_NUMBER_TAG, Role
from tuner.spec import parse
from tuner.study import refit
from tuner.study.recovery import reconcile_runs
from tuner.study.session import RunRequest, run_refit
from tuner.study.setup import create, open_study
from tuner.study.summary import ranked

from ..conftest import TINY_STUDY

SPEC = parse({**TINY_STUDY, "name": "refits", "train": {**TINY_STUDY["train"], "epochs": 1},
              "pruner": {"type": "none"}})  # fmt: skip
CPU = torch.device("cpu")
pytestmark = pytest.mark.slow  # trains a study and its refits: seconds, not a fast test


@pytest.fixture(scope="module")
def refitted(stores, fake_cifar, tmp_path_factory):
    """Three search trials trained as a worker trains them; then `tuner refit --top 2
    --epochs 2`, in this process, as one job does."""
    created = create(SPEC, stores)
    data = load_train_val(fake_cifar, SPEC.data, SPEC.seed, CPU)
    ctx = StudyContext(SPEC, data, created.tracker, created.runs)
    study = open_study(SPEC, stores)
    for _ in range(3):
        run = TrialRun(ctx, _optuna.ask(study))
        run.record(run.attempt())
    before = [(t.number, t.state, t.value) for t in study.get_trials()]
    request = RunRequest(devices=(CPU,), data_dir=fake_cifar)
    summary = run_refit(SPEC, stores, request, top=2, epochs=2)
    return created, study, before, summary


def test_the_best_configurations_are_retrained_as_refit_runs(refitted, stores) -> None:
    created, study, _, summary = refitted
    best = ranked(study.get_trials(), 2)
    assert sorted(summary.refits) == sorted(t.number for t in best)
    client = created.tracker.client
    for trial in best:
        found = summary.refits[trial.number]
        run = client.get_run(found.run_id)
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags[ROLE_TAG] == Role.REFIT and tags["tuner.refit_of"] == str(trial.number)
        assert tags[MLFLOW_PARENT_RUN_ID] == created.runs.parent_run_id
        assert tags["tuner.refit_of_run"] == trial.user_attrs["mlflow_run_id"]
        assert run.info.run_name.startswith(f"refit {trial.number:04d} ")
        assert params["lr"] == str(trial.params[f"lr_{trial.params['optimizer']}"])
        assert params["train.epochs"] == "2" and found.epochs == 2
        assert metrics["epochs_trained"] == 2 and "final_train_loss" in metrics
        assert "val_acc" not in metrics  # nothing is held out
        files = {f.path for f in client.list_artifacts(found.run_id, "model")}
        assert files == {"model/state_dict.pt", "model/architecture.json"}
        assert not client.list_artifacts(found.run_id, "predictions")


def test_refits_train_on_train_and_validation(fake_cifar) -> None:
    data = load_train_val(fake_cifar, SPEC.data, SPEC.seed, CPU)
    merged = data.merged()
    assert len(merged.train) == len(data.train) + len(data.val) and len(merged.val) == 0
    assert torch.equal(merged.train.labels[len(data.train) :], data.val.labels)


def test_the_search_is_untouched_by_its_refits(refitted, stores) -> None:
    _, study, before, summary = refitted
    assert [(t.number, t.state, t.value) for t in open_study(SPEC, stores).get_trials()] == before
    assert summary.run.ran == {"complete": 2}


def test_a_refit_done_is_not_queued_again_but_one_of_other_epochs_is(refitted, stores) -> None:
    again = refit.prepare(SPEC, stores, top=2, epochs=2)
    assert again.sources == () and len(again.done) == 2 and again.waiting == 0
    longer = refit.prepare(SPEC, stores, top=1, epochs=5)
    assert len(longer.sources) == 1 and longer.waiting == 1
    queued = open_study(longer.spec, stores).get_trials(states=(TrialState.WAITING,))
    assert queued[0].user_attrs["refit_epochs"] == 5


def test_the_ensemble_from_refits_scores_the_refits_weights(refitted, stores, fake_cifar) -> None:
    _, _, _, summary = refitted
    request = EnsembleRequest(k=2, source="refit")
    report = evaluate(SPEC, stores, request, data_dir=fake_cifar, device=CPU)
    refit_runs = {r.run_id for r in summary.refits.values()}
    assert report.candidates == 2 and {m.run_id for m in report.members} <= refit_runs
    assert report.single.run_id in refit_runs
    assert all(m.refit_epochs == 2 for m in report.members)


def test_a_retried_refit_keeps_what_it_refits(refitted, stores, fake_cifar) -> None:
    """Out of memory, a refit is queued again at half the batch: still the same refit."""
    created, *_ = refitted
    rspec = refit.refit_spec(SPEC)
    study = open_study(rspec, stores)
    trial = _optuna.ask(study)  # the refit of 5 epochs queued by the test before (or any)
    data = load_train_val(fake_cifar, SPEC.data, SPEC.seed, CPU).merged()
    run = TrialRun(StudyContext(rspec, data, created.tracker, created.runs), trial)
    assert run.refit_of is not None and run.spec.train.epochs == trial.user_attrs["refit_epochs"]
    run._retry_smaller()
    [retry] = study.get_trials(states=(TrialState.WAITING,))
    for key in ("refit_of", "refit_epochs", "refit_of_run"):
        assert retry.user_attrs[key] == trial.user_attrs[key]
    assert retry.user_attrs["grad_accumulation"] == 2
    study.tell(trial, state=TrialState.FAIL)


def test_refit_runs_are_reconciled_against_the_refits_not_the_search(refitted, stores) -> None:
    """A live refit's run and a search trial may share a number: the search's recovery must
    not close the refit's run as one whose trial has ended."""
    created, study, *_ = refitted
    client = created.tracker.client
    live = client.create_run(
        created.runs.experiment_id,
        tags={
            ROLE_TAG: Role.REFIT,
            TRIAL_NUMBER_TAG: "0",
            MLFLOW_PARENT_RUN_ID: created.runs.parent_run_id,
        },
    )
    reconcile_runs(study, created.tracker, created.runs)  # search trial 0 is complete
    assert client.get_run(live.info.run_id).info.status == "RUNNING"
    client.set_terminated(live.info.run_id, "FINISHED")


def test_a_study_without_completed_trials_has_nothing_to_refit(stores) -> None:
    empty = parse({**TINY_STUDY, "name": "refit-empty"})
    create(empty, stores)
    with pytest.raises(TunerError, match="no completed trials to refit; run `tuner study run"):
        refit.prepare(empty, stores, top=2, epochs=1)


def test_a_study_named_like_the_refits_is_a_study_of_its_own(refitted, stores, fake_cifar):
    """A study file may name its study `refits.refit`: it trains as any study does, and the
    refits of `refits` are neither in it nor touched by it."""
    created, *_ = refitted
    refits_before = [
        (t.number, t.state) for t in open_study(refit.refit_spec(SPEC), stores).trials
    ]
    other = parse({**TINY_STUDY, "name": "refits.refit", "pruner": {"type": "none"},
                   "train": {**TINY_STUDY["train"], "epochs": 1}})  # fmt: skip
    made = create(other, stores)
    data = load_train_val(fake_cifar, other.data, other.seed, CPU)
    study = open_study(other, stores)
    run = TrialRun(StudyContext(other, data, made.tracker, made.runs), _optuna.ask(study))
    run.record(run.attempt())
    [trial] = study.get_trials()
    assert trial.state == TrialState.COMPLETE and 0 <= trial.value <= 1, trial.user_attrs
    assert made.runs.experiment_id != created.runs.experiment_id
    after = [(t.number, t.state) for t in open_study(refit.refit_spec(SPEC), stores).trials]
    assert after == refits_before
