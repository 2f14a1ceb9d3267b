"""The words of the trade, each spelled once: how a trial ends (`Outcome`), the one map from an
outcome to Optuna's state, MLflow's status and the console's word, and every key tuner writes
to an Optuna trial or study and to an MLflow run. Imports nothing heavy: `study status` reads
Optuna's tables without importing Optuna (a quarter of a second), so states go by name here.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial, TrialState


class Outcome(enum.StrEnum):
    COMPLETE = "complete"
    PRUNED = "pruned"  # stopped by the pruner
    DIVERGED = "diverged"  # the loss became NaN or infinite
    FAILED = "failed"  # an error, a timeout, out of memory
    KILLED = "killed"  # Ctrl-C, SIGTERM, or its worker died
    RUNNING = "running"
    WAITING = "waiting"  # queued (a retry), not started

    @classmethod
    def of(cls, trial: FrozenTrial) -> Outcome:
        """A stored trial's outcome. Optuna keeps one FAIL state for failed and killed trials
        (the reason tells them apart); a diverged trial is PRUNED with its reason."""
        return cls.of_state(trial.state, trial.user_attrs.get(REASON_ATTR))

    @classmethod
    def of_state(cls, state: TrialState | str, reason: str | None = None) -> Outcome:
        """The outcome of a trial in Optuna state `state` (or its name) with the fail reason
        `reason`."""
        if reason == DIVERGED:
            return cls.DIVERGED
        return _FROM_STATE.get(getattr(state, "name", state), cls.FAILED)


@dataclass(frozen=True)
class Record:
    """How one outcome is written down in each place."""

    state: str  # Optuna's `TrialState`, by name
    mlflow: str  # run status
    word: str  # on the console, in `study status` and in the `tuner.state` tag

    @property
    def optuna(self) -> TrialState:
        from optuna.trial import TrialState

        return TrialState[self.state]


RECORDS: dict[Outcome, Record] = {
    Outcome.COMPLETE: Record("COMPLETE", "FINISHED", "complete"),
    Outcome.PRUNED: Record("PRUNED", "FINISHED", "pruned"),
    # PRUNED with a violated constraint, not FAIL: TPE learns only from finished trials, and
    # ranks infeasible ones below every feasible one
    Outcome.DIVERGED: Record("PRUNED", "FAILED", "diverged"),
    Outcome.FAILED: Record("FAIL", "FAILED", "failed"),
    Outcome.KILLED: Record("FAIL", "KILLED", "killed"),
    Outcome.RUNNING: Record("RUNNING", "RUNNING", "running"),
    Outcome.WAITING: Record("WAITING", "SCHEDULED", "waiting"),
}
_FROM_STATE = {
    "COMPLETE": Outcome.COMPLETE,
    "PRUNED": Outcome.PRUNED,
    "FAIL": Outcome.FAILED,
    "RUNNING": Outcome.RUNNING,
    "WAITING": Outcome.WAITING,
}
# what `study status` counts, in this order (killed trials are FAIL in Optuna: failed)
COUNTED = (
    Outcome.COMPLETE,
    Outcome.PRUNED,
    Outcome.DIVERGED,
    Outcome.FAILED,
    Outcome.RUNNING,
    Outcome.WAITING,
)

# -- fail reasons (an Optuna user attribute and an MLflow tag) ---------------------------------
DIVERGED = "diverged"  # also the name of the constraint a diverged trial violates
TIMEOUT = "timeout"
OUT_OF_MEMORY = "out_of_memory"
TERMINATED = "terminated"  # SIGTERM
INTERRUPTED = "interrupted"  # Ctrl-C
WORKER_DIED = "worker died"  # its heartbeat went stale; the pool says how it died
STORE_ERROR = "store error"  # + ": the error": the trial is queued again

# -- Optuna trial user attributes ---------------------------------------------------------------
RUN_ID_ATTR = "mlflow_run_id"
REASON_ATTR = "fail_reason"
WORKER_ATTR = "worker"  # host:pid of the process running the trial
SESSION_ATTR = "session"  # which `tuner study run` ran the trial (its budget counts it)
ACCUMULATION_ATTR = "grad_accumulation"  # on the retry of a trial that ran out of memory
RETRY_OF_ATTR = "retry_of"  # on a retry (out of memory, a lost trial): the trial it repeats
LOST_ATTR = "lost_attempts"  # on a retry: attempts of its point that died while training
# on a retry: the number of the first trial of its point, which seeds its training: a retry
# trains as the trial it repeats did (a baseline that diverged diverges again)
FIRST_OF_POINT_ATTR = "first_of_point"
PRUNED_AT_ATTR = "pruned_at_epoch"
BASELINE_ATTR = "baseline"  # a trial enqueued from the study file's `baselines`: its name
SETTINGS_ATTR = "settings_sha256"  # the fixed settings the trial trained with (see SETTINGS_KEYS)
SAMPLER_SEED_ATTR = "sampler_seed"  # the seed of the sampler that drew the trial's point
# a refit (in the study's refit study): the search trial it retrains, and for how many epochs
REFIT_OF_ATTR = "refit_of"
REFIT_EPOCHS_ATTR = "refit_epochs"
REFIT_OF_RUN_ATTR = "refit_of_run"  # the search trial's MLflow run
# what a trial queued again (a retry) keeps of the one it repeats
CARRIED_ATTRS = (BASELINE_ATTR, REFIT_OF_ATTR, REFIT_EPOCHS_ATTR, REFIT_OF_RUN_ATTR)
# system attributes Optuna's heartbeat retry sets (RetryHeartbeatStaleTrialCallback)
HEARTBEAT_RETRY_OF = "failed_trial"
HEARTBEAT_RETRY_HISTORY = "retry_history"

# -- Optuna study user attributes: where `study run` finds what `study create` made -------------
PARENT_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
SPEC_ATTR = "spec_sha256"
SPEC_JSON_ATTR = "spec"  # the resolved study file the study was created with: its contract
SETTINGS_PREFIX = "settings:"  # + a SETTINGS_ATTR value: the fixed settings it stands for
OBJECTIVE_ATTR = "objective"
# + the time it was logged and its run id: what `study status` shows of each ensemble scored
# (its name, test accuracy and gain), without reading MLflow
ENSEMBLE_PREFIX = "ensemble:"
# the refits of study NAME are the trials of the Optuna study NAME + REFIT_SUFFIX, in the same
# storage: their own sampler and budget, none of the search's ranking, pruning or counts. A
# study name cannot hold ":" (spec.NAME_PATTERN): no study file names a study of tuner's own
REFIT_SUFFIX = ":refit"
# ... and was NAME + LEGACY_REFIT_SUFFIX before: `refit.adopt_legacy` renames such a study, made
# by `tuner refit NAME` (its REFITS_OF_ATTR names NAME), where no NAME:refit exists yet
LEGACY_REFIT_SUFFIX = ".refit"
REFITS_OF_ATTR = "refits_of_study"  # on the refit study: the search it belongs to

# -- MLflow trial run parameters and metrics, besides the drawn point and the settings ----------
STATE_PARAM = "state"  # the outcome's word: parallel coordinates and filters can use it
LOG10_PREFIX = "log10_"  # a log-scale parameter's twin, for axes that read right
SUMMARY_METRICS = ("objective", "best_val_acc", "epochs_trained")  # every trial logs them

# -- MLflow tags --------------------------------------------------------------------------------
# the experiment's kind: MLflow 3's UI opens a "custom model development" experiment on its
# runs, where it would open a GenAI one (or one it cannot tell) on traces
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
ROLE_TAG = "tuner.role"  # study | trial | refit | ensemble
STATE_TAG = "tuner.state"  # an outcome's word (trial runs)
REASON_TAG = "tuner.fail_reason"
PRUNED_AT_TAG = "tuner.pruned_at_epoch"
EPOCHS_TAG = "tuner.epochs_run"
WEIGHTS_SHA256_TAG = "tuner.weights_sha256"  # checked before the weights are loaded
PREDICTIONS_SHA256_TAG = "tuner.val_predictions_sha256"  # and before the predictions are read
ARCHITECTURE_SHA256_TAG = "tuner.architecture_sha256"  # and the architecture
MEMBERS_TAG = "tuner.members"  # an ensemble's trial runs
TRIAL_NUMBER_TAG = "optuna.trial_number"
STUDY_TAG = "optuna.study"
STORAGE_TAG = "optuna.storage"
BEST_TAG_PREFIX = "best."  # the parent's best trial and its parameters
VERSION_TAG = "tuner.version"  # provenance, on every run
TORCH_VERSION_TAG = "torch.version"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: the UI links it
PROCESS_TAG = "tuner.process"  # host:pid that writes a run outside trials (an ensemble)
REFIT_OF_TAG = "tuner.refit_of"  # a refit run: the number of the search trial it retrains
REFIT_OF_RUN_TAG = "tuner.refit_of_run"  # and that trial's run


class Role(enum.StrEnum):
    STUDY = "study"
    TRIAL = "trial"
    REFIT = "refit"  # a search trial's configuration retrained on train + validation
    ENSEMBLE = "ensemble"


def trial_role(study_name: str) -> Role:
    """What the trials of the Optuna study `study_name` are: search trials, or refits."""
    return Role.REFIT if study_name.endswith(REFIT_SUFFIX) else Role.TRIAL


def worker_id(pid: int | None = None) -> str:
    """The WORKER_ATTR value of process `pid` (this process when None) on this host:
    `host:pid:start`, where `start` is when the process started (the kernel's clock ticks since
    boot), so that a pid reused by another process (a restarted container) is never taken for
    the worker. Read while the process exists."""
    pid = os.getpid() if pid is None else pid
    start = _start_time(pid)
    return f"{socket.gethostname()}:{pid}" + (f":{start}" if start is not None else "")


def _start_time(pid: int) -> int | None:
    """Process `pid`'s start time from /proc (field 22 of its stat); None where there is none."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 (one read)
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def worker_alive(worker: str) -> bool | None:
    """Whether the process of a `worker_id` is alive, the same process (its start time
    matches); None when it runs on another host (only its heartbeat can tell)."""
    host, _, rest = worker.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, if it is the same one
        pass
    if start.isdigit():  # a pid reused since: another process
        return _start_time(int(pid)) == int(start)
    return True


def retry_origin(user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]) -> int | None:
    """The trial this one repeats (after out-of-memory, or a dead worker), if any."""
    origin = user_attrs.get(RETRY_OF_ATTR, system_attrs.get(HEARTBEAT_RETRY_OF))
    return int(origin) if origin is not None else None


def requeued(trial: FrozenTrial) -> bool:
    """A trial whose point is always queued again once it has ended: stopped by Ctrl-C,
    SIGTERM or SIGHUP, or lost to a store error."""
    reason = str(trial.user_attrs.get(REASON_ATTR, ""))
    return reason in (INTERRUPTED, TERMINATED) or reason.startswith(STORE_ERROR)


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Trials whose parameters were queued again (after a dead worker or out-of-memory)."""
    numbers: set[int] = set()
    for t in trials:
        numbers.update(t.system_attrs.get(HEARTBEAT_RETRY_HISTORY, []))
        if RETRY_OF_ATTR in t.user_attrs:
            numbers.add(int(t.user_attrs[RETRY_OF_ATTR]))
    return numbers
