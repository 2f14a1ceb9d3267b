"""What dead processes leave behind: trials still RUNNING (failed and queued again once), and
MLflow runs still RUNNING (closed as KILLED, since MLflow has no heartbeat): trial runs whose
trial ended, ensemble runs whose process is gone, and a parent run with no live trial."""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import _optuna, background, interrupts
from tuner.records import (
    PROCESS_TAG,
    REASON_ATTR,
    RUN_ID_ATTR,
    TRIAL_NUMBER_TAG,
    WORKER_ATTR,
    WORKER_DIED,
    Outcome,
    Role,
    trial_role,
    worker_alive,
)
from tuner.retries import lost
from tuner.store_errors import patiently

if TYPE_CHECKING:
    from tuner.tracking import StudyRuns, Tracker

log = logging.getLogger(__name__)


STALE = f"{WORKER_DIED} (no heartbeat within the grace period)"


def fail_stale(study: optuna.Study, tracker: Tracker | None = None) -> list[int]:
    """Fail the trials whose heartbeat stopped and queue their points again (`lost`), except
    those whose worker runs on this host and is alive (the same process: its start time
    matches): a live trial is never failed, its heartbeat can be late on a loaded machine.
    With `tracker`, their MLflow runs are closed as KILLED at once. The numbers of those
    failed."""
    failed = []
    for trial in _optuna.stale_trials(study):
        if _alive_here(trial):
            continue
        with interrupts.shielded():  # failed and queued again, or neither: no point lost
            if not _optuna.fail_from_outside(study, trial, REASON_ATTR, STALE):
                continue
            lost(study, trial)
        failed.append(trial.number)
        if tracker is not None:
            _close_run(tracker, trial, STALE)
    return failed


def _close_run(tracker: Tracker, trial: FrozenTrial, why: str) -> None:
    """The MLflow run of a trial just failed because its worker died: KILLED, if still open."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id and tracker.client.get_run(run_id).info.status == "RUNNING":
        tracker.end_trial(run_id, Outcome.KILLED, reason=why)


def _alive_here(trial: FrozenTrial) -> bool:
    return worker_alive(str(trial.user_attrs.get(WORKER_ATTR, ""))) is True


def recover_stale(
    study: optuna.Study, tracker: Tracker, runs: StudyRuns, *, starting: bool = True
) -> None:
    """Trials whose heartbeat stopped are failed and queued again, and MLflow runs left
    RUNNING by dead workers are closed as KILLED; `starting`: and a parent run left RUNNING by
    a `study run` that died is closed."""
    _fail_stale_said(study, tracker)
    reconcile_runs(study, tracker, runs)
    if starting:
        close_idle_parent(study, tracker, runs)


def _fail_stale_said(study: optuna.Study, tracker: Tracker) -> None:
    for number in fail_stale(study, tracker):
        log.info(f"[trial {number}] its worker stopped sending heartbeats; failed and queued "
                 "again")  # fmt: skip


def recover_dead_worker(
    study: optuna.Study, tracker: Tracker, runs: StudyRuns, worker: str, how: str
) -> None:
    """The trials of a worker that died (`worker`: its `worker_id`; `how`: "killed by
    SIGKILL"): failed at once (no need to wait for their heartbeat to go stale) and their
    points queued again (`lost`), their MLflow runs KILLED."""
    for trial in _optuna.trials_in(study, (TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) != worker:
            continue
        with interrupts.shielded():  # failed and queued again, or neither: no point lost
            if not _optuna.fail_from_outside(study, trial, REASON_ATTR, f"worker {how}"):
                continue
            said = "queued again" if lost(study, trial) else "not queued again (lost twice)"
        _close_run(tracker, trial, f"{WORKER_DIED} ({how})")
        log.info(f"[trial {trial.number}] lost with its worker ({how}); {said}")
    reconcile_runs(study, tracker, runs)


def reconcile_runs(study: optuna.Study, tracker: Tracker, runs: StudyRuns) -> None:
    """MLflow runs left RUNNING by processes that died are closed as KILLED, with the reason:
    trial runs whose Optuna trial has ended, and ensemble runs whose process is gone."""
    _reconcile_trial_runs(study, tracker, runs)
    for run in tracker.running_runs(runs.experiment_id, Role.ENSEMBLE):
        process = run.data.tags.get(PROCESS_TAG, "")
        if worker_alive(process) is False:  # on another host: its own host closes it
            tracker.end_run(run.info.run_id, Outcome.KILLED, f"its process {process} died")
            log.info(f"ensemble run {run.info.run_id} was left RUNNING by a process that died: "
                     "closed as KILLED")  # fmt: skip


def close_idle_parent(study: optuna.Study, tracker: Tracker, runs: StudyRuns) -> None:
    """A parent run left RUNNING by a `study run` that died, with no trial running now, is
    closed (FINISHED: the study itself is fine)."""
    if _optuna.trials_in(study, (TrialState.RUNNING,)):
        return
    if tracker.parent_is_running(runs.parent_run_id):
        tracker.parent_running(runs.parent_run_id, False)
        log.info(f"parent run {runs.parent_run_id} was left RUNNING with no trial running: closed")


def _reconcile_trial_runs(study: optuna.Study, tracker: Tracker, runs: StudyRuns) -> None:
    # the trials' states first, then the runs: a trial that ends in between shows as running,
    # and one newer than the snapshot is not known yet: both are spared. A trial that has
    # ended may still have its worker closing its run (Optuna is told first, MLflow follows,
    # within the store wait): its run is closed only once that worker is dead, or, on another
    # host, once the trial ended longer ago than the grace period
    states = patiently(lambda: _optuna.trial_states(study), "the Optuna storage")
    alive = (TrialState.RUNNING, TrialState.WAITING)
    role = trial_role(study.study_name)  # the search's trial runs, or the refits'
    grace = datetime.timedelta(seconds=_optuna.grace_period(study))
    for run in tracker.running_trial_runs(runs.experiment_id, role):  # few: the live, the lost
        number = int(run.data.tags.get(TRIAL_NUMBER_TAG, -1))
        if states.get(number, TrialState.RUNNING) in alive:
            continue
        trial = _optuna.trial_numbered(study, number)
        worker = worker_alive(str(trial.user_attrs.get(WORKER_ATTR, "")))
        ended = trial.datetime_complete or datetime.datetime.now()
        if worker or (worker is None and datetime.datetime.now() - ended < grace):
            continue  # its worker is closing it
        _close_as_recorded(tracker, run.info.run_id, trial, search=role is Role.TRIAL)
        log.info(
            f"[trial {number}] MLflow run {run.info.run_id} was left RUNNING by a dead "
            f"worker: closed as {trial.state.name} in Optuna"
        )


def _close_as_recorded(
    tracker: Tracker, run_id: str, trial: FrozenTrial, search: bool = True
) -> None:
    """A run left RUNNING by a worker that died, closed as its trial stands in Optuna (MLflow
    follows): a trial told complete or pruned before its worker died keeps its outcome and
    value; a failed one is KILLED, with the reason Optuna holds."""
    outcome = Outcome.of(trial)
    reason = trial.user_attrs.get(REASON_ATTR)
    if outcome in (Outcome.FAILED, Outcome.RUNNING, Outcome.WAITING):
        outcome = Outcome.KILLED
        reason = reason or f"{WORKER_DIED} (killed, or no heartbeat within the grace period)"
    # `final_val_acc` and `objective`; a refit's value is a training loss, not logged as such
    value = trial.value if outcome is Outcome.COMPLETE and search else None
    summary = {"objective": value} if value is not None else None
    tracker.end_trial(run_id, outcome, value=value, reason=reason, summary=summary)


@contextlib.contextmanager
def watchdog(study: optuna.Study, tracker: Tracker, runs: StudyRuns) -> Iterator[None]:
    """While a `study run` works, every heartbeat interval: the trials whose worker died, on
    this node or any other, are failed and queued again, and their MLflow runs closed as
    KILLED, without waiting for some trial to start or end; and the parent run is RUNNING
    (another node that ended may have closed it). A store that fails a round is one line,
    and the next round tries again."""
    interval = study._storage.get_heartbeat_interval()
    if not interval:
        yield
        return

    search = trial_role(study.study_name) is Role.TRIAL  # refits leave the parent as it is

    def round_() -> None:
        _fail_stale_said(study, tracker)
        reconcile_runs(study, tracker, runs)
        if search and not tracker.parent_is_running(runs.parent_run_id):
            tracker.parent_running(runs.parent_run_id, True)

    with background.repeating(
        round_,
        interval,
        "tuner-watchdog",
        failed=lambda exc: (
            f"could not look for dead workers ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); trying again every {interval} s"
        ),
        join_timeout=60,
    ):
        yield
