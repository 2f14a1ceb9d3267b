"""What dead workers leave behind: trials still RUNNING (failed and queued again once) and MLflow
runs still RUNNING (closed as KILLED, since MLflow has no heartbeat)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from tuner import _optuna
from tuner.records import (
    REASON_ATTR,
    TRIAL_NUMBER_TAG,
    WORKER_ATTR,
    WORKER_DIED,
    Outcome,
    worker_id,
)

if TYPE_CHECKING:
    from tuner.tracking import StudyRuns, Tracker

log = logging.getLogger(__name__)


def recover_stale(study: optuna.Study, tracker: Tracker, runs: StudyRuns) -> None:
    """Trials whose heartbeat stopped are failed and queued again (Optuna's callback), and
    MLflow runs left RUNNING by dead workers are closed as KILLED."""
    for number in _optuna.failed_stale(study):
        log.info(
            f"[trial {number}] its worker stopped sending heartbeats; failed and queued again"
        )
    reconcile_runs(study, tracker, runs)


def recover_dead_worker(
    study: optuna.Study, tracker: Tracker, runs: StudyRuns, pid: int, how: str
) -> None:
    """The trial a dead worker was running: failed and queued again at once (no need to wait
    for its heartbeat to go stale), and its MLflow run KILLED. `how`: "killed by SIGKILL"."""
    worker = worker_id(pid)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) != worker:
            continue
        if _optuna.fail_from_outside(study, trial, REASON_ATTR, f"worker {how}"):
            _optuna.retry_dead(study, trial)
            log.info(f"[trial {trial.number}] lost with its worker ({how}); queued again")
    reconcile_runs(study, tracker, runs)


def reconcile_runs(study: optuna.Study, tracker: Tracker, runs: StudyRuns) -> None:
    """An MLflow trial run still RUNNING whose Optuna trial has ended belonged to a worker that
    died: close it as KILLED, with the reason."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    alive = (TrialState.RUNNING, TrialState.WAITING)
    for run in tracker.running_trial_runs(runs.experiment_id):
        number = int(run.data.tags.get(TRIAL_NUMBER_TAG, -1))
        if number in trials and trials[number].state in alive:
            continue
        why = f"{WORKER_DIED} (killed, or no heartbeat within the grace period)"
        tracker.end_trial(run.info.run_id, Outcome.KILLED, reason=why)
        log.info(
            f"[trial {number}] MLflow run {run.info.run_id} was left RUNNING by a dead "
            "worker: closed as KILLED"
        )
