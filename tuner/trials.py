"""What tuner records on an Optuna trial, in one place: the attribute names, which worker runs
it, which trial it retries, and how a trial is failed from outside its objective (a watchdog, or
the supervisor of a worker that died). Imports Optuna only: `tuner study status` stays fast."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import optuna

RUN_ID_ATTR = "mlflow_run_id"
REASON_ATTR = "fail_reason"
WORKER_ATTR = "worker"  # host:pid of the process running the trial
SESSION_ATTR = "session"  # which `tuner study run` ran the trial (its budget counts it)
ACCUMULATION_ATTR = "grad_accumulation"  # on the retry of a trial that ran out of memory
RETRY_OF_ATTR = "retry_of"  # on that retry: the trial it repeats
HEARTBEAT_RETRY_OF = "failed_trial"  # the system attribute Optuna's heartbeat retry sets
DIVERGED = "diverged"  # a fail reason, and the name of the constraint a diverged trial violates


def worker_id(pid: int | None = None) -> str:
    """The WORKER_ATTR value of process `pid` (this process when None) on this host."""
    return f"{socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def retry_origin(user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]) -> int | None:
    """The trial this one repeats (after out-of-memory, or a dead worker), if any."""
    origin = user_attrs.get(RETRY_OF_ATTR, system_attrs.get(HEARTBEAT_RETRY_OF))
    return int(origin) if origin is not None else None


def fail_from_outside(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with `reason`; False when it had already ended. The public
    Study can only end the trial its own objective runs, hence the storage."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial_id, REASON_ATTR, reason)  # while it may still be set
        return storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
