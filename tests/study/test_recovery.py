"""Recovery on real stores: a trial and a run left RUNNING by a worker that is gone."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from tuner import _optuna
from tuner.records import WORKER_ATTR, worker_id
from tuner.spec import parse
from tuner.study.recovery import reconcile_runs, recover_dead_worker
from tuner.study.setup import create, open_study

from ..conftest import TINY_STUDY


@pytest.fixture
def setup(stores, request: pytest.FixtureRequest):
    """A study of its own for each test, in the module's stores."""
    spec = parse({**TINY_STUDY, "name": f"recovery-{request.node.name[:50]}"})
    created = create(spec, stores)
    return open_study(spec, stores), created.tracker, created.runs


def _started(study, tracker, runs, pid: int):
    """A trial as a worker `pid` starts it: RUNNING in Optuna, with a RUNNING MLflow run."""
    trial = _optuna.ask(study)
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr(WORKER_ATTR, worker_id(pid))
    run_id = tracker.start_trial(runs, "tiny", trial.number, {}, {}).run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    return trial, run_id


def test_a_dead_workers_trial_is_failed_queued_and_its_run_killed(setup) -> None:
    study, tracker, runs = setup
    dead, dead_run = _started(study, tracker, runs, pid=11)
    alive, alive_run = _started(study, tracker, runs, pid=22)
    recover_dead_worker(study, tracker, runs, pid=11, how="killed by SIGKILL")
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[dead.number].user_attrs["fail_reason"] == "worker killed by SIGKILL"
    assert trials[alive.number].state == TrialState.RUNNING, "another worker's trial is left"
    queued = trials[-1]
    assert queued.state == TrialState.WAITING and queued.params == trials[dead.number].params
    assert tracker.client.get_run(dead_run).info.status == "KILLED"
    assert tracker.client.get_run(alive_run).info.status == "RUNNING"


def test_a_trial_a_dead_worker_asked_for_but_never_started_is_queued_as_it_was(setup) -> None:
    """Asked ahead (drawn, no run yet): nothing of it failed, so nothing is failed; the next
    ask takes it, with its point."""
    study, tracker, runs = setup
    ahead = _optuna.ask(study)
    ahead.suggest_float("x", 0, 1)
    ahead.set_user_attr(WORKER_ATTR, worker_id(44))
    recover_dead_worker(study, tracker, runs, pid=44, how="killed by SIGKILL")
    [trial] = study.get_trials()
    assert trial.state == TrialState.WAITING and "fail_reason" not in trial.user_attrs
    again = _optuna.ask(study)
    assert again.number == trial.number and again.suggest_float("x", 0, 1) == trial.params["x"]


def test_a_run_whose_trial_ended_elsewhere_is_closed(setup) -> None:
    study, tracker, runs = setup
    trial, run_id = _started(study, tracker, runs, pid=33)
    study.tell(trial, state=TrialState.FAIL)  # e.g. failed by the heartbeat check
    reconcile_runs(study, tracker, runs)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "KILLED" and "worker died" in run.data.tags["tuner.fail_reason"]


def test_a_run_whose_trial_began_after_the_snapshot_is_spared(setup) -> None:
    """The reconciler reads the trials' states, then the RUNNING runs: a trial that began in
    between (unknown to the snapshot) is live, and its run must not be closed."""
    study, tracker, runs = setup
    newer = tracker.start_trial(runs, "tiny", 99, {}, {}).run_id  # no trial 99 in the snapshot
    reconcile_runs(study, tracker, runs)
    assert tracker.client.get_run(newer).info.status == "RUNNING"
