"""What tuner needs from Optuna that its public API does not offer, in one place.

Optuna's public API ends a trial only from the process that asked for it (`study.tell`), shows
a running trial's system attributes only through a full reload of the study, and starts the
heartbeat thread only inside `study.optimize`. tuner's workers drive `ask`/`tell` themselves
(so that one place records a trial in Optuna, MLflow and on the console), and its supervisor
fails the trials of workers that died. Each private name used is here, with why.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread  # private: see the docstring
from optuna.trial import FrozenTrial, TrialState


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
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat every `heartbeat_interval` seconds while the block runs, as
    `study.optimize` does: a worker that dies stops it, and the trial is failed after `grace`."""
    with get_heartbeat_thread(trial._trial_id, trial.storage):
        yield


def fail_stale(study: optuna.Study) -> None:
    """Fail the trials whose heartbeat went stale and queue them again (the storage's callback),
    as `study.optimize` does before each trial. Public but experimental: it warns every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def failed_stale(study: optuna.Study) -> list[int]:
    """`fail_stale`, and the numbers of the trials it failed (Optuna says nothing of them: the
    trials running before are read again, one by one)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    fail_stale(study)
    storage = study._storage
    return [t.number for t in running if storage.get_trial(t._trial_id).state == TrialState.FAIL]


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
