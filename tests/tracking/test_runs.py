from __future__ import annotations

import pytest

from tuner.errors import ConfigError
from tuner.records import Outcome
from tuner.spec import parse
from tuner.tracking import StudyRuns, Tracker

from ..conftest import TINY_STUDY


def test_experiments_keep_artifacts_under_mlruns(tracker: Tracker) -> None:
    experiment_id = tracker.experiment_id("kept", create=True)
    assert tracker.experiment_id("kept", create=False) == experiment_id
    location = tracker.client.get_experiment(experiment_id).artifact_location
    assert location == tracker.stores.artifact_root


def test_a_deleted_experiment_is_explained(tracker: Tracker) -> None:
    experiment_id = tracker.experiment_id("gone", create=True)
    tracker.client.delete_experiment(experiment_id)
    with pytest.raises(ConfigError, match="was deleted; restore it"):
        tracker.experiment_id("gone", create=True)


def test_the_parent_run_holds_the_resolved_study_file(tracker: Tracker) -> None:
    spec = parse({**TINY_STUDY, "name": "parent"})
    experiment_id = tracker.experiment_id("parent", create=True)
    run = tracker.client.get_run(tracker.create_parent(experiment_id, spec, "sqlite://"))
    assert run.data.params["train.epochs"] == "2" and run.data.params["pruner.type"] == "median"
    assert run.data.params["limits.grace"] == "60", "defaults filled in"
    assert run.data.tags["tuner.role"] == "study" and run.info.run_name == "parent"


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (Outcome.COMPLETE, "FINISHED"),
        (Outcome.PRUNED, "FINISHED"),
        (Outcome.DIVERGED, "FAILED"),
        (Outcome.FAILED, "FAILED"),
        (Outcome.KILLED, "KILLED"),
    ],
)
def test_trial_run_states_map_to_mlflow_statuses(
    tracker: Tracker, outcome: Outcome, status: str
) -> None:
    spec = parse({**TINY_STUDY, "name": "states"})
    experiment_id = tracker.experiment_id("states", create=True)
    runs = StudyRuns(experiment_id, tracker.create_parent(experiment_id, spec, "sqlite://"))
    ref = tracker.start_trial(runs, "states", 3, {"depth": "vgg11"}, spec.trial_settings(),
                              "vgg11 sgd")  # fmt: skip
    run_id = ref.run_id
    assert ref.name == "0003 vgg11 sgd", "the number first: the runs table cuts names short"
    tracker.log_epochs(run_id, [(1, {"val_acc": 0.5})])
    summary = {"objective": 0.5, "best_val_acc": 0.5, "epochs_trained": 1.0}
    tracker.end_trial(run_id, outcome, reason="why" if status != "FINISHED" else None, epochs=1,
                      summary=summary, name=ref.name)  # fmt: skip
    run = tracker.client.get_run(run_id)
    assert run.info.status == status
    assert run.data.tags["tuner.state"] == outcome.value
    assert run.data.params["state"] == outcome.value, "a parameter too: to filter and plot by"
    assert run.data.tags["mlflow.parentRunId"] == runs.parent_run_id
    assert run.data.params["train.epochs"] == "2" and run.data.params["depth"] == "vgg11"
    assert {k: run.data.metrics[k] for k in summary} == summary
    marker = "" if outcome is Outcome.COMPLETE else f" [{outcome.value}]"
    assert run.info.run_name == f"0003 vgg11 sgd{marker}"
    key = "tuner.pruned_at_epoch" if outcome is Outcome.PRUNED else "tuner.epochs_run"
    assert run.data.tags[key] == "1"
    if status != "FINISHED":
        assert run.data.tags["tuner.fail_reason"] == "why"


def test_a_run_closed_twice_keeps_its_first_state(tracker: Tracker) -> None:
    """A trial failed from outside and then recorded by its worker (or the other way round):
    the second close does not fail on the `state` parameter, which MLflow will not change."""
    spec = parse({**TINY_STUDY, "name": "twice"})
    experiment_id = tracker.experiment_id("twice", create=True)
    runs = StudyRuns(experiment_id, tracker.create_parent(experiment_id, spec, "sqlite://"))
    run_id = tracker.start_trial(runs, "twice", 0, {}, {}).run_id
    tracker.end_trial(run_id, Outcome.KILLED, reason="worker died")
    tracker.end_trial(run_id, Outcome.FAILED, reason="timeout")
    run = tracker.client.get_run(run_id)
    assert run.data.params["state"] == "killed" and run.info.status == "FAILED"


def test_orphaned_runs_are_found_by_status(tracker: Tracker) -> None:
    spec = parse({**TINY_STUDY, "name": "orphans"})
    experiment_id = tracker.experiment_id("orphans", create=True)
    runs = StudyRuns(experiment_id, tracker.create_parent(experiment_id, spec, "sqlite://"))
    live = tracker.start_trial(runs, "orphans", 0, {}, {}).run_id
    done = tracker.start_trial(runs, "orphans", 1, {}, {}).run_id
    tracker.end_trial(done, Outcome.COMPLETE, value=0.5)
    assert [r.info.run_id for r in tracker.running_trial_runs(experiment_id)] == [live]
