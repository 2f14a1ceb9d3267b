"""One `tuner study run`: set the study up, recover what dead workers left, run the budget in
this process or in a pool of workers, and sum up what this run did."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from optuna.trial import TrialState

from tuner import _optuna, background, interrupts
from tuner.console import counted
from tuner.records import worker_id
from tuner.spec import StudySpec
from tuner.store_errors import store_wait_cut
from tuner.stores import Stores, store_error
from tuner.study.cost import check, measure
from tuner.study.named import stored_file
from tuner.study.pictures import paint
from tuner.study.pool import run_pool
from tuner.study.recovery import recover_dead_worker, recover_stale, watchdog
from tuner.study.setup import create, open_study
from tuner.study.summary import RunSummary, summarize, update_parent
from tuner.study.worker import Budget, WorkerPlan, work

if TYPE_CHECKING:
    import optuna
    import torch

    from tuner.data import DataInfo
    from tuner.study.refit import Refit
    from tuner.tracking import StudyRuns, Tracker
    from tuner.train import TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """What the user asked of one `study run`."""

    devices: tuple[torch.device, ...]
    jobs_per_device: int = 1
    trials: int | None = None  # N more; None: until the study has the file's `trials`
    timeout: float | None = None  # seconds after which no trial starts
    data_dir: Path | None = None  # None: --data-dir's default (TUNER_DATA_DIR, the cache)
    allow_changed_settings: bool = False  # run on although train/data/seed were edited
    # the training loop (`tuner.train.train`); `tuner bench overhead` replays epochs instead
    trainer: Callable[..., TrainResult] | None = None
    # measure what the trials left will cost here, and stop past this many hours (None: no
    # measurement; `study run` asks for one)
    max_hours: float | None = None


def run_study(spec: StudySpec, stores: Stores, request: RunRequest) -> RunSummary:
    """Run a study's trials in this process (one job) or in worker processes (several)."""
    interrupts.install()
    info = preflight(spec, request)
    # a new study is measured before it is made: one found too long is changed freely
    guard_first = request.max_hours is not None and _new(spec, stores)
    if guard_first:
        _guard(spec, request, budget_for(spec, request).trials, info)
    created = create(spec, stores, allow_changed_settings=request.allow_changed_settings)
    tracker, runs = created.tracker, created.runs
    if created.created:
        log.info(f"created study {spec.name!r}")
    study = open_study(spec, stores)
    if cut := store_wait_cut():
        log.info(cut)
    recover_stale(study, tracker, runs)
    budget = budget_for(spec, request)
    left = budget.left(study)
    if not left:
        log.info(f"{spec.name!r} has its {budget.trials} trials; `--trials N` runs N more")
        return summarize(study, budget.session, 0.0)
    log.info(_plan_line(spec, study, budget, left, request))
    if request.max_hours is not None and not guard_first:
        _guard(spec, request, left, info)
    plans = worker_plans(spec, stores, runs, request)  # --timeout counts from here
    started = time.perf_counter()
    exits: list[str] = []
    tracker.parent_running(runs.parent_run_id, True)
    try:
        with watchdog(study, tracker, runs), painting(study, tracker, runs):
            exits = _work(plans, study, tracker)
    finally:
        _forget_claim(plans)
        _wind_up(study, tracker, runs, stores)
    return summarize(study, plans[0].budget.session, time.perf_counter() - started, exits)


def _work(plans: list[WorkerPlan], study: optuna.Study, tracker: Tracker) -> list[str]:
    """The plans' work: in this process (one), or in a pool of workers; how each ended."""
    if len(plans) == 1:
        work(plans[0])
        return []
    return [f"{e.name}: {e.describe()}" for e in run_pool(plans, study, tracker)]


def _forget_claim(plans: list[WorkerPlan]) -> None:
    """The run's workers have ended: their claim file goes (its lock died with them)."""
    if plans[0].claim is not None:
        plans[0].claim.unlink(missing_ok=True)


@contextlib.contextmanager
def painting(study: optuna.Study, tracker: Tracker, runs: StudyRuns) -> Iterator[None]:
    """The parent run's pictures are drawn again while the study runs, whenever trials have
    finished (`Painter`), in a thread of this process: the workers' processes never draw."""
    from tuner.study.pictures import PAINT_EVERY, Painter

    with background.repeating(
        Painter(study, tracker, runs.parent_run_id),
        PAINT_EVERY,
        "tuner-painter",
        failed=lambda exc: (
            f"could not draw the study's pictures ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); trying again"
        ),
        join_timeout=60,
    ):
        yield


def _wind_up(study: optuna.Study, tracker: Tracker, runs: StudyRuns, stores: Stores) -> None:
    """Recover what dead workers left, sum the study up on its parent run, and close it unless
    another `study run` still works on it; then, if none does, draw its pictures. A store
    that fails here is one line, and so are pictures that cannot be drawn or written (a full
    disk): the error that ended the run (if any) is the one raised."""
    try:
        # this process's own trials (one worker, run here) are over: one still RUNNING could
        # not be recorded (a store error), and is failed and queued again now, not after grace
        recover_dead_worker(study, tracker, runs, worker_id(), "ended before it was recorded")
        recover_stale(study, tracker, runs, starting=False)
        update_parent(study, tracker, runs.parent_run_id)
        # another `study run` may still be working on the same study: the last one closes it
        others = _optuna.trials_in(study, (TrialState.RUNNING,))
        tracker.parent_running(runs.parent_run_id, bool(others))
    except Exception as exc:
        error = store_error(exc, stores)
        if error is None:
            raise
        log.info(f"the study could not be summed up: {error}")
        return
    if others:  # the run that ends last draws them (each draws them while it runs)
        return
    try:
        paint(study, tracker, runs.parent_run_id)
    except Exception as exc:  # the pictures are a view of the study, not part of it
        log.info(f"the study's pictures could not be drawn: {type(exc).__name__}: {exc}")


def budget_for(spec: StudySpec, request: RunRequest, queued_only: bool = False) -> Budget:
    """The run's budget: `--trials N` more, or the file's `trials` for the study; its
    `--timeout` counts from now."""
    more = request.trials is not None
    n = request.trials if request.trials is not None else spec.trials
    deadline = time.time() + request.timeout if request.timeout else None
    return Budget(uuid.uuid4().hex[:12], n, deadline, more, queued_only)


def worker_plans(
    spec: StudySpec,
    stores: Stores,
    runs: StudyRuns,
    request: RunRequest,
    queued_only: bool = False,
) -> list[WorkerPlan]:
    """One plan per worker: `jobs_per_device` on each device, sharing one budget (of queued
    trials only: refits)."""
    from tuner.data import resolve_data_dir

    budget = budget_for(spec, request, queued_only)
    slots = [(d, j) for d in request.devices for j in range(request.jobs_per_device)]
    # no worker for a refit that is not there
    slots = slots[: budget.trials] if queued_only else slots
    data_dir = resolve_data_dir(request.data_dir, spec.data)
    if len(slots) == 1:
        return [WorkerPlan("main", spec, stores, runs, data_dir, slots[0][0], budget,
                           trainer=request.trainer)]  # fmt: skip
    claim = Path(tempfile.gettempdir()) / f"tuner-{budget.session}.claim"
    # each worker gets its share of the cores: oversubscribed OpenMP threads spin-wait on
    # each other, and an epoch of 0.1 s took 3.7 s now and then
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    return [
        WorkerPlan(
            f"w{j}" if device.type == "cpu" else f"{device}#{j}",
            spec,
            stores,
            runs,
            data_dir,
            device,
            budget,
            claim,
            threads,
            request.trainer,
        )
        for device, j in slots
    ]


def run_refit(
    spec: StudySpec, stores: Stores, request: RunRequest, top: int, epochs: int
) -> RefitSummary:
    """Retrain the `top` best configurations on train + validation for `epochs` each, with
    the study's workers, devices, fault handling and tracking (`study.refit`)."""
    from tuner.study import refit

    interrupts.install()
    preflight(spec, request)
    created = create(spec, stores, allow_changed_settings=request.allow_changed_settings)
    tracker, runs = created.tracker, created.runs
    queued = refit.prepare(spec, stores, top, epochs)
    if queued.sources:
        numbers = ", ".join(str(n) for n in queued.sources)
        log.info(f"refits of trials {numbers} queued: {epochs} epochs each on train + validation")
    if queued.done:
        numbers = ", ".join(str(n) for n in queued.done)
        log.info(f"trials {numbers} have a refit of {epochs} epochs done or under way already")
    study = open_study(queued.spec, stores)
    recover_stale(study, tracker, runs, starting=False)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    started = time.perf_counter()
    exits: list[str] = []
    session = ""
    if waiting:
        ask = dataclasses.replace(request, trials=waiting)
        plans = worker_plans(queued.spec, stores, runs, ask, queued_only=True)
        session = plans[0].budget.session
        log.info(
            f"refitting {counted(waiting, 'configuration')} of {spec.name!r} on {_where(request)}"
        )
        try:
            with watchdog(study, tracker, runs):
                exits = _work(plans, study, tracker)
        finally:
            _forget_claim(plans)
            _recover_quietly(study, tracker, runs, stores)
    ran = summarize(study, session, time.perf_counter() - started, exits)
    return RefitSummary(ran, refit.completed_refits(spec, stores), epochs)


@dataclass(frozen=True)
class RefitSummary:
    """What one `tuner refit` did, and every completed refit of the study."""

    run: RunSummary
    refits: dict[int, Refit]  # by the search trial's number
    epochs: int  # asked for this time


def _recover_quietly(
    study: optuna.Study, tracker: Tracker, runs: StudyRuns, stores: Stores
) -> None:
    """What dead workers left, recovered at the end; a store that fails here is one line."""
    try:
        recover_stale(study, tracker, runs, starting=False)
    except Exception as exc:
        error = store_error(exc, stores)
        if error is None:
            raise
        log.info(f"what dead workers left could not be recovered now: {error}")


def _new(spec: StudySpec, stores: Stores) -> bool:
    """No study of this name in the stores, at a glance (a store that cannot be read at once
    is left to the set-up, which says what is wrong with it)."""
    try:
        return stored_file(spec.name, stores, patient=False) is None
    except Exception:
        return False


def preflight(spec: StudySpec, request: RunRequest) -> DataInfo:
    """The study's data set, described (a known set's without reading it; a loader's arrays
    are loaded and checked), and what can be known wrong before a trial trains
    (`objective.check_study`), each one line."""
    from tuner.data import describe, resolve_data_dir
    from tuner.objective import check_study

    info = describe(spec.data, resolve_data_dir(request.data_dir, spec.data))
    check_study(spec, info)
    return info


def _guard(spec: StudySpec, request: RunRequest, trials: int, info: DataInfo) -> None:
    """What `trials` trials will cost here, said; stop past `request.max_hours`."""
    assert request.max_hours is not None
    device, limit = request.devices[0], request.max_hours * 3600
    check(measure(spec, device, trials, len(request.devices), limit, info), spec, device,
          request.max_hours)  # fmt: skip


def _plan_line(
    spec: StudySpec, study: optuna.Study, budget: Budget, left: int, request: RunRequest
) -> str:
    """`running 5 trials of 'x' on cpu`, or how far the study is and what is left of it."""
    done = budget.counted(study)
    where = _where(request) + (
        f", starting none after {request.timeout:.0f} s" if request.timeout else ""
    )
    trials = counted(left, "more trial" if budget.more else "trial")
    if budget.more or not done:
        return f"running {trials} of {spec.name!r} on {where}"
    return (
        f"{spec.name!r} has {done} of its {budget.trials} trials: running {left} more on {where}"
    )


def _where(request: RunRequest) -> str:
    where = ", ".join(str(d) for d in request.devices)
    jobs = request.jobs_per_device
    if jobs == 1:
        return where
    return f"{where} ({jobs} workers{' each' if len(request.devices) > 1 else ''})"
