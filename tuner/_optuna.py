"""What tuner needs from Optuna that its public API does not offer, in one place.

Optuna's public API ends a trial only from the process that asked for it (`study.tell`), shows
a running trial's system attributes only through a full reload of the study, and starts the
heartbeat thread only inside `study.optimize`. tuner's workers drive `ask`/`tell` themselves
(so that one place records a trial in Optuna, MLflow and on the console), and its supervisor
fails the trials of workers that died. Each private name used is here, with why.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import background

log = logging.getLogger(__name__)


def ask(study: optuna.Study) -> optuna.Trial:
    """`study.ask()`, without the warning that heartbeats are meant for `study.optimize`: the
    worker runs `heartbeat` around each trial itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


def frozen(trial: optuna.Trial) -> FrozenTrial:
    """The stored record of a running trial, with its system attributes (`Trial` hides them;
    the public way, `study.get_trials()`, loads every trial of the study)."""
    return trial.storage.get_trial(trial._trial_id)


@contextlib.contextmanager
def heartbeat(trial: optuna.Trial, tag: str) -> Iterator[None]:
    """Record the trial's heartbeat every `heartbeat_interval` seconds while the block runs, as
    `study.optimize` does: a worker that dies stops it, and the trial is failed after `grace`.
    Unlike Optuna's thread, a store that fails a beat (locked, unreachable) does not end it:
    one line says so, and it beats again."""
    storage = trial.storage
    interval = storage.get_heartbeat_interval()
    if interval is None:
        yield
        return
    with background.repeating(
        lambda: storage.record_heartbeat(trial._trial_id),
        interval,
        "tuner-heartbeat",
        failed=lambda exc: (
            f"{tag} its heartbeat could not be recorded "
            f"({type(exc).__name__}); trying again every {interval} s"
        ),
        recovered=f"{tag} its heartbeat is recorded again",
        at_once=True,
    ):
        yield


def failed_stale(
    study: optuna.Study, key: str, reason: str, alive: Callable[[FrozenTrial], bool]
) -> list[int]:
    """Fail the RUNNING trials whose heartbeat went stale, with user attribute `key` = `reason`,
    and queue each again (the storage's callback), as `study.optimize` does before each trial;
    the numbers of those failed. A trial that `alive` says is still running is spared: its
    heartbeat is only late (a loaded machine, a store that was locked). Optuna's own
    `fail_stale_trials` cannot spare one; the stale ids come from the storage's private
    `_get_stale_trial_ids`."""
    storage = study._storage
    if storage.get_heartbeat_interval() is None:
        return []
    callback = storage.get_heartbeat_stale_trial_callback()
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        trial = storage.get_trial(trial_id)
        if trial.state != TrialState.RUNNING or alive(trial):
            continue
        if fail_from_outside(study, trial, key, reason):
            failed.append(trial.number)
            if callback is not None:
                callback(study, storage.get_trial(trial_id))
    return failed


def fail_from_outside(study: optuna.Study, trial: FrozenTrial, key: str, reason: str) -> bool:
    """Mark a RUNNING trial of another process FAIL, with user attribute `key` = `reason`;
    False when it had already ended. `study.tell` would do the state, but no public call sets
    an attribute on a trial this process did not ask for, and it must be set first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, key, reason)  # while it may still be set
        return storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def retry_dead(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial again as the storage's stale-heartbeat callback would (once)."""
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    callback(study, study._storage.get_trial(trial._trial_id))


def claim_user_attr(
    storage: optuna.storages.RDBStorage, study_id: int, key: str, value: str
) -> str:
    """Set a study's user attribute unless some process already has; the value stored.

    The first writer wins, atomically across machines: the row is inserted, and the table's
    own unique (study, key) constraint refuses the others. `set_study_user_attr` would
    overwrite, and ignores the conflict of two inserts at once; the table
    (`models.StudyUserAttributeModel`, private) is written directly."""
    import json

    import sqlalchemy
    from optuna.storages._rdb import models

    table = models.StudyUserAttributeModel.__table__
    row = {"study_id": study_id, "key": key, "value_json": json.dumps(value)}
    try:
        with storage.engine.begin() as connection:
            connection.execute(table.insert().values(**row))
    except sqlalchemy.exc.IntegrityError:
        pass  # another process got there first
    return storage.get_study_user_attrs(study_id)[key]
