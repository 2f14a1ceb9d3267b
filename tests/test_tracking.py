from __future__ import annotations

import pytest

from tuner.errors import ConfigError
from tuner.stores import resolve
from tuner.tracking import Tracker, provenance


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    folder = tmp_path_factory.mktemp("mlruns")
    return Tracker(resolve(mlruns=folder, tracking_uri=f"sqlite:///{folder}/mlflow.db"))


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


def test_trial_run_states_map_to_mlflow_statuses(tracker: Tracker) -> None:
    experiment_id = tracker.experiment_id("states", create=True)
    parent = tracker.create_parent(experiment_id, {"name": "states", "seed": 0}, "sqlite://")
    expected = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED",
                "killed": "KILLED"}  # fmt: skip
    for number, (state, status) in enumerate(expected.items()):
        run_id = tracker.start_trial(experiment_id, parent, "states", number, {"depth": "vgg11"},
                                     {"train": {"epochs": 2}})  # fmt: skip
        tracker.end_trial(run_id, state, reason="why" if state == "failed" else None, epochs=1)
        run = tracker.client.get_run(run_id)
        assert run.info.status == status
        assert run.data.tags["tuner.state"] == state
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.params["train.epochs"] == "2"


def test_provenance_names_versions() -> None:
    tags = provenance()
    assert tags["tuner.version"] and tags["torch.version"]
