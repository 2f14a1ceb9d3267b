"""Create, run and report on a study: Optuna storage, sampler and pruner, and the MLflow parent."""

from __future__ import annotations

import faulthandler
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import ConfigError, TunerError
from tuner.spec import StudySpec
from tuner.stores import Stores, creation_lock, optuna_storage, use_wal
from tuner.trials import (
    DIVERGED,
    REASON_ATTR,
    RETRY_OF_ATTR,
    SESSION_ATTR,
    WORKER_ATTR,
    fail_from_outside,
    retry_origin,
    worker_id,
)

if TYPE_CHECKING:
    import torch

    from tuner.tracking import Tracker
    from tuner.workers import Exit

# torch, scikit-learn and mlflow are imported by the functions that train or log, not here:
# `tuner study status` needs only Optuna and answers in a second instead of five.

PARENT_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
SPEC_ATTR = "spec_sha256"
STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}
OUTCOMES = ("complete", "pruned", "diverged", "failed", "running", "waiting")

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Optuna logs every failed trial with its traceback; tuner prints one line with the reason and
# keeps the traceback in the trial's MLflow run (error.txt).
logging.getLogger("optuna.study._optimize").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def spec_digest(spec: StudySpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()


def pick_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch")
    return device


def gpu_devices(spec: str) -> list[str]:
    """`--gpus 0,1` or `all` → ["cuda:0", "cuda:1"], each checked against what torch sees."""
    import torch

    count = torch.cuda.device_count()
    if spec.strip() == "all":
        indices = list(range(count))
    else:
        try:
            indices = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(
                f"--gpus takes CUDA indices such as 0,1 or 'all', got {spec!r}"
            ) from None
    if not indices or any(not 0 <= i < count for i in indices):
        raise ConfigError(f"--gpus {spec}: torch sees {count} CUDA GPU(s) on this machine")
    return [f"cuda:{i}" for i in dict.fromkeys(indices)]


def make_sampler(spec: StudySpec, n_existing: int, worker: int = 0) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already stored: a restarted study must not replay the
    # random start-up points it drew the first time; and by the worker's index: workers that
    # start together must not all draw the same points.
    base = spec.sampler.seed if spec.sampler.seed is not None else spec.seed
    seed = base + n_existing + 1_000_003 * worker
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        n_startup_trials=spec.sampler.n_startup_trials,
        seed=seed,
        multivariate=True,
        group=True,  # the learning rate is conditional on the optimizer
    )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.type == "hyperband":  # resources are epochs
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_epochs,
            max_resource=spec.train.epochs,
            reduction_factor=p.reduction_factor,
        )
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.warmup_epochs
        )
    return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class Created:
    created: bool
    parent_run_id: str
    experiment_id: str


def storage_for(spec: StudySpec, stores: Stores) -> optuna.storages.RDBStorage:
    return optuna_storage(stores, spec.limits.heartbeat, spec.limits.grace)


def create_study(spec: StudySpec, stores: Stores) -> tuple[Created, Tracker]:
    """Create the schemas, the Optuna study, the MLflow experiment and the study's parent run,
    once, whichever of several workers started together gets there first."""
    from tuner.tracking import Tracker, check_tracking

    with creation_lock(stores):
        check_tracking(stores)  # both locations checked before either store is written
        storage = storage_for(spec, stores)
        # MLflow migrates a fresh database when the client opens it
        tracker = Tracker(stores, checked=True)
        created = _create(spec, stores, storage, tracker)
        for url in (stores.optuna_url, stores.tracking_uri):
            use_wal(url)
        return created, tracker


def _create(
    spec: StudySpec, stores: Stores, storage: optuna.storages.RDBStorage, tracker: Tracker
) -> Created:
    experiment_id = tracker.experiment_id(spec.name, create=True)
    study = optuna.create_study(
        study_name=spec.name, storage=storage, direction="maximize", load_if_exists=True
    )
    attrs = study.user_attrs
    if PARENT_ATTR in attrs:
        return Created(False, attrs[PARENT_ATTR], attrs[EXPERIMENT_ATTR])
    parent = tracker.create_parent(experiment_id, spec.to_dict(), stores.optuna_url)
    study.set_user_attr(PARENT_ATTR, parent)
    study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
    study.set_user_attr(SPEC_ATTR, spec_digest(spec))
    study.set_user_attr("objective", "validation accuracy after the last epoch")
    return Created(True, parent, experiment_id)


def load_study(spec: StudySpec, stores: Stores, worker: int = 0) -> optuna.Study:
    storage = storage_for(spec, stores)
    try:
        n_existing = storage.get_n_trials(storage.get_study_id_from_name(spec.name))
    except KeyError:
        raise TunerError(
            f"no study {spec.name!r} in {stores.optuna_url}; run `tuner study create` first"
        ) from None
    return optuna.load_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec, n_existing, worker),
        pruner=make_pruner(spec),
    )


def outcome(trial: FrozenTrial) -> str:
    """complete | pruned | diverged | failed | running | waiting (a diverged trial is PRUNED
    in Optuna, with a violated constraint, so that TPE learns from it)."""
    if trial.user_attrs.get(REASON_ATTR) == DIVERGED:
        return DIVERGED
    return STATE_NAMES.get(trial.state, trial.state.name.lower())


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Trials whose parameters were queued again (after a dead worker or out-of-memory)."""
    numbers: set[int] = set()
    for t in trials:
        numbers.update(t.system_attrs.get("retry_history", []))
        if RETRY_OF_ATTR in t.user_attrs:
            numbers.add(int(t.user_attrs[RETRY_OF_ATTR]))
    return numbers


@dataclass(frozen=True)
class Session:
    """One `tuner study run`: its id, its trial budget and its clock, shared by its workers."""

    id: str
    trials: int  # trials this run may start; a trial lost and retried counts once
    deadline: float | None  # time.time() after which no trial starts

    def spent(self, study: optuna.Study) -> bool:
        if self.deadline is not None and time.time() >= self.deadline:
            return True
        trials = study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        mine = [
            t
            for t in trials
            if t.user_attrs.get(SESSION_ATTR) == self.id
            and t.state != TrialState.WAITING
            and t.number not in retried
        ]
        return len(mine) >= self.trials


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker process needs (picklable: it crosses a `spawn`)."""

    name: str
    spec: StudySpec
    stores: Stores
    data_dir: Path
    device: str
    session: Session
    claim: Any = None  # a multiprocessing lock: one worker at a time turns budget into a trial
    prefix: bool = False  # tag output lines with the worker's name
    threads: int | None = None  # CPU threads for torch; None: torch's default (all cores)
    index: int = 0  # the worker's number in its run: seeds its own sampler


@dataclass(frozen=True)
class RunSummary:
    ran: dict[str, int]  # this run's trials by outcome
    seconds: float
    best: FrozenTrial | None
    failures: dict[int, str]  # trial number → reason, this run
    workers: list[str] = field(default_factory=list)  # how each worker process ended
    retried: dict[int, int] = field(default_factory=dict)  # lost trial → the trial retrying it


def run_study(
    spec: StudySpec,
    stores: Stores,
    *,
    n_trials: int | None,
    timeout: float | None,
    data_dir: Path,
    devices: list[str],
    jobs_per_device: int = 1,
    say: Callable[[str], None] = print,
) -> RunSummary:
    """Run a study's trials in this process (one job) or in worker processes (several)."""
    from tuner import interrupts

    interrupts.install()
    created, tracker = create_study(spec, stores)
    if created.created:
        say(f"created study {spec.name!r}")
    study = load_study(spec, stores)
    if study.user_attrs.get(SPEC_ATTR) != spec_digest(spec):
        say("warning: the study file changed since the study was created; "
            "earlier trials were run with the old settings")  # fmt: skip
    recover_stale(study, tracker, created.experiment_id, say)
    n = n_trials if n_trials is not None else spec.trials
    session = Session(uuid.uuid4().hex[:12], n, time.time() + timeout if timeout else None)
    slots = [(device, j) for device in devices for j in range(jobs_per_device)]
    say(f"running {n} trials of {spec.name!r} on {_describe_slots(devices, jobs_per_device)}"
        + (f", starting none after {timeout:.0f} s" if timeout else ""))  # fmt: skip
    started = time.perf_counter()
    exits: list[str] = []
    tracker.parent_running(created.parent_run_id, True)
    try:
        if len(slots) == 1:
            work(WorkerPlan("main", spec, stores, data_dir, devices[0], session))
        else:
            exits = _run_pool(spec, stores, data_dir, session, slots, study, tracker,
                              created.experiment_id, say)  # fmt: skip
    finally:
        recover_stale(study, tracker, created.experiment_id, say)
        update_parent(study, tracker, created.parent_run_id)
        # another `study run` may still be working on the same study: the last one closes it
        others = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        tracker.parent_running(created.parent_run_id, bool(others))
    return summarize(study, session, time.perf_counter() - started, exits)


def _describe_slots(devices: list[str], jobs: int) -> str:
    where = ", ".join(devices)
    return where if jobs == 1 and len(devices) == 1 else f"{where} ({jobs} workers each)"


def _run_pool(
    spec: StudySpec,
    stores: Stores,
    data_dir: Path,
    session: Session,
    slots: list[tuple[str, int]],
    study: optuna.Study,
    tracker: Tracker,
    experiment_id: str,
    say: Callable[[str], None],
) -> list[str]:
    from tuner.data import ensure_cifar
    from tuner.interrupts import EXIT_HUNG
    from tuner.workers import Pool

    ensure_cifar(data_dir)  # download once here, not once per worker, all at the same time

    claim = multiprocessing.get_context("spawn").Lock()
    plans = {}
    # each worker gets its share of the cores: oversubscribed OpenMP threads spin-wait on
    # each other, and an epoch of 0.1 s took 3.7 s now and then
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    for index, (device, j) in enumerate(slots):
        name = f"w{j}" if device == "cpu" else f"{device}#{j}"
        plans[name] = WorkerPlan(name, spec, stores, data_dir, device, session, claim, True,
                                 threads, index)  # fmt: skip
    restarts = [len(plans)]  # replacements allowed in all: a crash loop must end

    def on_exit(ended: Exit) -> WorkerPlan | None:
        if ended.code in (0, 130, 143):  # done, or stopped by Ctrl-C / SIGTERM with the rest
            return None
        say(f"[{ended.name}] worker {ended.describe()}; the others go on")
        recover_dead_worker(study, tracker, experiment_id, ended, say)
        # killed (a signal) or hung (124): replace it; an error of its own would only recur
        if ended.code not in (-9, -15, EXIT_HUNG) or restarts[0] <= 0 or session.spent(study):
            return None
        restarts[0] -= 1
        return plans[ended.name]

    pool = Pool(worker_main, on_exit, say)
    for name, plan in plans.items():
        pool.start(name, plan)
    exits = pool.run()
    if all(e.code != 0 for e in exits):
        raise TunerError("every worker failed (reasons above); nothing more will run")
    return [f"{e.name}: {e.describe()}" for e in exits]


def worker_main(plan: WorkerPlan) -> None:
    """Entry point of a worker process: exit 0 when the budget is spent, 130/143 on a signal."""
    import sys

    from tuner import interrupts
    from tuner.errors import TunerError

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    interrupts.install()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is it?
    try:
        work(plan)
    except interrupts.Terminated:
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)
    except TunerError as exc:
        print(f"[{plan.name}] error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def work(plan: WorkerPlan) -> None:
    """Take trials from the session's budget until it is spent; the body of every worker."""
    import torch

    from tuner import interrupts
    from tuner.data import load_train_val
    from tuner.objective import StudyContext, TrialFailed, make_objective
    from tuner.tracking import Tracker

    tag = f"[{plan.name}] " if plan.prefix else ""

    def say(message: str) -> None:
        print(f"{tag}{message}", flush=True)

    spec, device = plan.spec, pick_device(plan.device)
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tracker = Tracker(plan.stores)
    study = load_study(spec, plan.stores, plan.index)
    say(f"loading CIFAR-10 from {plan.data_dir} onto {device} …")
    data = load_train_val(plan.data_dir, spec.data, spec.seed, device)
    say(f"  {len(data.train)} training and {len(data.val)} validation images from {data.source}")
    # alone in its process, a worker has nobody to wait for: a lock of its own does
    claim = plan.claim if plan.claim is not None else threading.Lock()
    held = [False]

    def release() -> None:
        if held[0]:
            held[0] = False
            claim.release()

    def on_start(trial: optuna.Trial) -> None:  # the trial exists: the next worker may claim
        trial.set_user_attr(SESSION_ATTR, plan.session.id)
        release()

    attrs = study.user_attrs
    ctx = StudyContext(spec, data, tracker, attrs[EXPERIMENT_ATTR], attrs[PARENT_ATTR], say,
                       on_start=on_start)  # fmt: skip
    objective = make_objective(ctx)
    while True:
        claim.acquire()
        held[0] = True
        try:
            if plan.session.spent(study):
                break
            study.optimize(objective, n_trials=1, catch=(TrialFailed,),
                           gc_after_trial=device.type == "cpu")  # fmt: skip
        finally:
            release()
            interrupts.resume()


def recover_dead_worker(
    study: optuna.Study,
    tracker: Tracker,
    experiment_id: str,
    ended: Exit,
    say: Callable[[str], None],
) -> None:
    """The trial a dead worker was running: failed and queued again at once (no need to wait
    for its heartbeat to go stale), and its MLflow run KILLED."""
    worker = worker_id(ended.pid)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) != worker:
            continue
        if fail_from_outside(study, trial._trial_id, f"worker {ended.describe()}"):
            frozen = study._storage.get_trial(trial._trial_id)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, frozen)
            say(f"[trial {trial.number}] lost with its worker ({ended.describe()}); queued again")
    reconcile_runs(study, tracker, experiment_id, say)


def recover_stale(
    study: optuna.Study, tracker: Tracker, experiment_id: str, say: Callable[[str], None]
) -> None:
    """Trials whose heartbeat stopped are failed and queued again (Optuna's callback), and
    MLflow runs left RUNNING by dead workers are closed as KILLED."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        stale = optuna.storages.fail_stale_trials(study)
    for number in stale or ():
        say(f"[trial {number}] its worker stopped sending heartbeats; failed and queued again")
    reconcile_runs(study, tracker, experiment_id, say)


def reconcile_runs(
    study: optuna.Study, tracker: Tracker, experiment_id: str, say: Callable[[str], None]
) -> None:
    """An MLflow trial run still RUNNING whose Optuna trial has ended belonged to a worker that
    died (MLflow has no heartbeat): close it as KILLED, with the reason."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    alive = (TrialState.RUNNING, TrialState.WAITING)
    for run in tracker.running_trial_runs(experiment_id):
        number = int(run.data.tags.get("optuna.trial_number", -1))
        if number in trials and trials[number].state in alive:
            continue
        why = "worker died (killed, or no heartbeat within the grace period)"
        tracker.end_trial(run.info.run_id, "killed", reason=why)
        say(f"[trial {number}] MLflow run {run.info.run_id} was left RUNNING by a dead worker: "
            "closed as KILLED")  # fmt: skip


def summarize(
    study: optuna.Study, session: Session, seconds: float, exits: list[str]
) -> RunSummary:
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if t.user_attrs.get(SESSION_ATTR) == session.id]
    retried = {}
    for t in mine:
        origin = retry_origin(t.user_attrs, t.system_attrs)
        if origin is not None:
            retried[origin] = t.number
    return RunSummary(
        ran=dict(Counter(outcome(t) for t in mine)),
        seconds=seconds,
        best=best_trial(study),
        failures={
            t.number: t.user_attrs.get(REASON_ATTR, "worker died")
            for t in mine
            if t.state == TrialState.FAIL or outcome(t) == "diverged"
        },
        workers=exits,
        retried=retried,
    )


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


def counts(study: optuna.Study) -> dict[str, int]:
    tally = Counter(outcome(t) for t in study.get_trials(deepcopy=False))
    return {name: tally.get(name, 0) for name in OUTCOMES}


def update_parent(study: optuna.Study, tracker: Tracker, parent_run_id: str) -> None:
    """Best value so far and Optuna's history and importance plots, on the parent run."""
    best = best_trial(study)
    figures = _plots(study)
    try:
        tracker.summarize_parent(
            parent_run_id,
            counts=counts(study),
            best=(best.number, best.value, best.params) if best else None,
            figures=figures,
        )
    finally:
        import matplotlib.pyplot as plt

        for figure in figures.values():
            plt.close(figure)


def _plots(study: optuna.Study) -> dict[str, object]:
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figures: dict[str, object] = {}
    if not complete:
        return figures
    figures["optimization_history"] = ovm.plot_optimization_history(study).figure
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():  # PED-ANOVA warns on a handful of trials
                warnings.simplefilter("ignore", UserWarning)
                figures["param_importances"] = ovm.plot_param_importances(study).figure
        except (ValueError, RuntimeError) as exc:  # too few distinct points to rank
            logging.getLogger(__name__).info("no importance plot yet: %s", exc)
    return figures


@dataclass(frozen=True)
class Status:
    counts: dict[str, int]
    best: FrozenTrial | None
    top: list[FrozenTrial]
    parent_run_id: str | None


def study_status(spec: StudySpec, stores: Stores, top: int = 5) -> Status:
    study = load_study(spec, stores)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(complete, key=lambda t: t.value, reverse=True)
    return Status(
        counts=counts(study),
        best=ranked[0] if ranked else None,
        top=ranked[:top],
        parent_run_id=study.user_attrs.get(PARENT_ATTR),
    )
