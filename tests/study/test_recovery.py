"""Recovery on real stores: a trial and a run left RUNNING by a worker that is gone."""

from __future__ import annotations

import os
import socket
from unittest import mock

import pytest
from optuna.trial import TrialState

from tuner import _optuna
from tuner.records import WORKER_ATTR, worker_id
from tuner.spec import parse
from tuner.study.recovery import fail_stale, reconcile_runs, recover_dead_worker
from tuner.study.setup import create, open_study

from ..conftest import TINY_STUDY


@pytest.fixture
def setup(stores, request: pytest.FixtureRequest):
    """A study of its own for each test, in the module's stores."""
    spec = parse({**TINY_STUDY, "name": f"recovery-{request.node.name[:50]}"})
    created = create(spec, stores)
    return open_study(spec, stores), created.tracker, created.runs


def _started(study, tracker, runs, pid: int, run: bool = True):
    """A trial as worker `pid` starts it: RUNNING in Optuna, with a RUNNING MLflow run (none,
    without `run`: asked for, not started)."""
    trial = _optuna.ask(study)
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{pid}:1")
    if not run:
        return trial, None
    run_id = tracker.start_trial(runs, "tiny", trial.number, {}, {}).run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    return trial, run_id


def test_a_dead_workers_trial_is_failed_queued_and_its_run_killed(setup) -> None:
    study, tracker, runs = setup
    dead, dead_run = _started(study, tracker, runs, pid=11)
    alive, alive_run = _started(study, tracker, runs, pid=22)
    worker = dead.user_attrs[WORKER_ATTR]
    recover_dead_worker(study, tracker, runs, worker, how="killed by SIGKILL")
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[dead.number].user_attrs["fail_reason"] == "worker killed by SIGKILL"
    assert trials[alive.number].state == TrialState.RUNNING, "another worker's trial is left"
    queued = trials[-1]
    assert queued.state == TrialState.WAITING
    assert queued.system_attrs["fixed_params"] == trials[dead.number].params
    assert queued.user_attrs == {"grad_accumulation": 1, "retry_of": dead.number,
                                 "lost_attempts": 1, "first_of_point": dead.number}, (
        "the point (and the seed it trained with), not the past")  # fmt: skip
    assert tracker.client.get_run(dead_run).info.status == "KILLED"
    assert tracker.client.get_run(alive_run).info.status == "RUNNING"


def test_a_point_lost_before_it_trained_is_queued_again_whatever_came_before(setup) -> None:
    """A retry asked for and killed before it started is queued once more (it was never
    trained); one lost while training a second time is left failed."""
    study, tracker, runs = setup
    first, _ = _started(study, tracker, runs, pid=44)
    recover_dead_worker(study, tracker, runs, first.user_attrs[WORKER_ATTR], "killed")
    retry, _ = _started(study, tracker, runs, pid=45, run=False)  # pops the retry
    assert retry.user_attrs["retry_of"] == first.number and "mlflow_run_id" not in retry.user_attrs
    recover_dead_worker(study, tracker, runs, retry.user_attrs[WORKER_ATTR], "killed")
    again, _ = _started(study, tracker, runs, pid=46)
    assert again.params == first.params and again.user_attrs["lost_attempts"] == 1
    recover_dead_worker(study, tracker, runs, again.user_attrs[WORKER_ATTR], "killed")
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL] * 3, "lost twice while training: not queued again"


def test_a_stale_trial_whose_worker_lives_is_spared_and_one_whose_pid_was_reused_is_not(
    setup,
) -> None:
    study, tracker, runs = setup
    live, _ = _started(study, tracker, runs, pid=0)
    live.set_user_attr(WORKER_ATTR, worker_id())  # this process: alive
    reused, _ = _started(study, tracker, runs, pid=os.getpid())  # same pid, other start time
    with mock.patch.object(_optuna, "stale_trials", lambda s: [
            _optuna.frozen(live), _optuna.frozen(reused)]):  # fmt: skip
        assert fail_stale(study) == [reused.number]
    assert _optuna.frozen(live).state == TrialState.RUNNING


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


def test_a_run_whose_worker_died_after_telling_optuna_follows_optuna(setup) -> None:
    """Killed between `tell` and closing its run: the run is closed as Optuna holds the
    trial, complete with its value, not as killed."""
    study, tracker, runs = setup
    trial, run_id = _started(study, tracker, runs, pid=34)
    study.tell(trial, 0.75)
    reconcile_runs(study, tracker, runs)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["tuner.state"] == "complete"
    assert run.data.metrics["final_val_acc"] == 0.75 == run.data.metrics["objective"]


def test_a_run_whose_trial_just_ended_on_a_live_worker_is_left_to_it(setup) -> None:
    """Optuna is told first, then the worker closes its run: in between, the run is its."""
    study, tracker, runs = setup
    trial, run_id = _started(study, tracker, runs, pid=0)
    trial.set_user_attr(WORKER_ATTR, worker_id())  # this process: alive
    study.tell(trial, 0.5)
    reconcile_runs(study, tracker, runs)
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
