"""A worker runs one trial at a time, top to bottom (`run_one`), until its run's budget is
spent: stale trials failed and queued again, `ask`, the point drawn, the heartbeat, training,
the weights, `tell`, the MLflow run closed with the state Optuna holds, the next. It reads as
Optuna's own `_run_trial` does. SIGTERM and Ctrl-C wait while a trial is set up and while it
is recorded, and act at once while it trains."""

from __future__ import annotations

import concurrent.futures
import contextlib
import faulthandler
import functools
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import filelock
import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import _optuna, background, console, interrupts
from tuner.errors import TunerError
from tuner.records import (
    SAMPLER_SEED_ATTR,
    SESSION_ATTR,
    SETTINGS_ATTR,
    WORKER_ATTR,
    Role,
    requeued,
    retried_numbers,
    trial_role,
    worker_id,
)
from tuner.spec import StudySpec
from tuner.stores import Stores, store_error
from tuner.study.recovery import fail_stale
from tuner.study.setup import open_study, settings_digest, trial_seed

if TYPE_CHECKING:
    import torch

    from tuner.objective import StudyContext
    from tuner.tracking import StudyRuns
    from tuner.train import TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """One `tuner study run`'s trials and clock, shared by its workers. A trial counts once it
    has ended and its point is not queued again (`counted`): complete, pruned, diverged,
    failed for good. `trials` is what the study aims at (the file's `trials`: a run continues
    until the study has that many), or with `more` what this run adds (`--trials N`)."""

    session: str  # the run's id, on each of its trials
    trials: int  # counted trials aimed at: in the study, or (`more`) of this run
    deadline: float | None  # time.time() after which no trial starts
    more: bool = False  # `trials` counts this run's trials only
    queued_only: bool = False  # take only queued trials, never ask the sampler (refits)

    def expired(self) -> bool:
        """Past the run's --timeout: no trial starts."""
        return self.deadline is not None and time.time() >= self.deadline

    def mine(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        """The trials this budget is about: the study's, or (`more`) this run's."""
        if not self.more:
            return trials
        return [t for t in trials if t.user_attrs.get(SESSION_ATTR) == self.session]

    def counting(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        """The trials that count against `trials`: ended, and their point not queued again. A
        trial stopped by a signal or lost to a store is always queued again, so it never
        counts, also in the moment between its end and its retry being queued."""
        retried = retried_numbers(trials)
        return [
            t
            for t in self.mine(trials)
            if t.state.is_finished() and t.number not in retried and not requeued(t)
        ]

    def counted(self, study: optuna.Study) -> int:
        return len(self.counting(study.get_trials(deepcopy=False)))

    def left(self, study: optuna.Study) -> int:
        """Trials this run may still start: those aimed at, less those counted and those
        running (0 past the --timeout)."""
        if self.expired():
            return 0
        trials = study.get_trials(deepcopy=False)
        running = sum(t.state == TrialState.RUNNING for t in self.mine(trials))
        left = max(0, self.trials - len(self.counting(trials)) - running)
        if self.queued_only:
            left = min(left, sum(t.state == TrialState.WAITING for t in trials))
        return left

    def spent(self, study: optuna.Study) -> bool:
        return self.left(study) == 0


def progress_note(budget: Budget, study: optuna.Study, now: float | None = None) -> str:
    """`  (3/8 done, about 1 min 20 s left)`: the trials counted against the budget, and the
    time those left take at the pace of this run's counted trials (all workers together,
    pruning included; no later than its --timeout)."""
    trials = study.get_trials(deepcopy=False)
    counted = budget.counting(trials)
    done, left = len(counted), max(0, budget.trials - len(counted))
    ours = [t for t in counted if t.user_attrs.get(SESSION_ATTR) == budget.session]
    if not ours or not left:
        return f"  ({done}/{budget.trials} done)"
    now = time.time() if now is None else now
    began = min(t.datetime_start.timestamp() for t in ours if t.datetime_start)
    seconds = (now - began) / len(ours) * left
    if budget.deadline is not None:
        seconds = min(seconds, max(0.0, budget.deadline - now))
    return f"  ({done}/{budget.trials} done, about {console.duration(seconds)} left)"


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs (picklable: it crosses a `spawn`)."""

    name: str
    spec: StudySpec
    stores: Stores
    runs: StudyRuns
    data_dir: Path
    device: torch.device
    budget: Budget
    # a file the run's workers lock (flock) while one turns budget into a trial; the kernel
    # lets go of it when the process holding it dies. None: a worker alone in its run
    claim: Path | None = None
    threads: int | None = None  # CPU threads for torch; None: torch's default (all cores)
    # the training loop (`tuner.train.train`); `tuner bench overhead` replays epochs instead
    trainer: Callable[..., TrainResult] | None = None


def work(plan: WorkerPlan) -> None:
    """The body of every worker: load the data once, then run trials until the budget is spent."""
    import torch

    from tuner.data import load_train_val
    from tuner.objective import StudyContext
    from tuner.tracking import Tracker
    from tuner.train import train

    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    # the first optimizer a process builds imports torch._dynamo (2 s on 2 cores): here, once,
    # with the worker's start-up, not inside its first trial's time
    import torch._dynamo  # noqa: F401

    tracker = Tracker(plan.stores)
    study = open_study(plan.spec, plan.stores)
    where = "its loader" if plan.spec.data.loader else plan.data_dir
    log.info(f"loading {plan.spec.data.name} from {where} onto {plan.device} …")
    data = load_train_val(plan.data_dir, plan.spec.data, plan.spec.seed, plan.device)
    if trial_role(plan.spec.name) is Role.REFIT:
        data = data.merged()  # the configuration is chosen: train on what validated it
        log.info(f"  {len(data.train)} training images (train + validation) from {data.source}")
    else:
        log.info(f"  {len(data.train)} training and {len(data.val)} validation images from "
                 f"{data.source}")  # fmt: skip
    progress = functools.partial(progress_note, plan.budget)
    claim = filelock.FileLock(plan.claim) if plan.claim is not None else contextlib.nullcontext()
    # one thread writes the epochs' metrics to MLflow while the next epoch trains (10 ms an
    # epoch on SQLite); each trial waits for its own before it is recorded
    with concurrent.futures.ThreadPoolExecutor(
        1, "tuner-epochs", initializer=background.leave_signals_to_the_main_thread
    ) as writer:
        ctx = StudyContext(plan.spec, data, tracker, plan.runs, progress,
                           plan.trainer or train, writer)  # fmt: skip
        # what the worker has made so far (modules, the data, the study's trials) lives as
        # long as it: a collection after each trial need not walk it again (0.38 s of 0.5)
        gc.freeze()
        while run_one(study, ctx, plan.budget, claim):
            if plan.device.type == "cpu":
                gc.collect()  # as study.optimize(gc_after_trial=True): the allocator keeps it


def run_one(
    study: optuna.Study,
    ctx: StudyContext,
    budget: Budget,
    claim: contextlib.AbstractContextManager = contextlib.nullcontext(),  # noqa: B008
) -> bool:
    """One trial, top to bottom; False when the budget is spent. A signal that comes while
    the trial is set up or recorded waits for it, and is raised at the end: the worker stops
    with its trial recorded whole."""
    from tuner.objective import TrialRun

    interrupts.defer()
    try:
        with contextlib.ExitStack() as beating:
            with claim:  # one worker at a time turns budget into a trial (exact count)
                if interrupts.pending():
                    return False
                # as study.optimize does before each trial; before the count, which a trial
                # left RUNNING by a dead worker would hold up
                fail_stale(study, ctx.tracker)
                if budget.spent(study):
                    return False
                # a queued trial first (popped atomically); in the transaction that makes it
                # RUNNING, this worker's mark (its supervisor finds it by that, whenever this
                # process dies) and the run's session (counted, under the claim)
                _optuna.take_as(study, {WORKER_ATTR: worker_id(), SESSION_ATTR: budget.session})
                trial = _optuna.ask(study)
                # its heartbeat from the start: if this process dies from here on, another
                # (its supervisor, a later run, another node) fails it and queues it again
                beating.enter_context(_optuna.heartbeat(trial, f"[trial {trial.number}]"))
            trial.set_user_attr(SAMPLER_SEED_ATTR, trial_seed(ctx.spec, trial.number))
            trial.set_user_attr(SETTINGS_ATTR, settings_digest(ctx.spec))
            run = TrialRun(ctx, trial)
            ending = run.attempt()  # draw, open the run, train: signals act at once here
            ending = run.record(ending)  # weights, then Optuna, then MLflow, then the console
    finally:
        interrupts.resume()  # a signal that waited is raised here, the trial recorded
    if ending.stop is not None:  # Ctrl-C, SIGTERM, a store error: the worker stops too
        raise ending.stop
    return True


def main(plan: WorkerPlan) -> None:
    """Entry point of a worker process: exit 0 when the budget is spent, 130/143 on a signal."""
    import multiprocessing

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    console.show(prefix=f"[{plan.name}] ")
    interrupts.install()
    supervisor = multiprocessing.parent_process()
    if supervisor is not None and supervisor.pid is not None:
        # a worker whose supervisor died (SIGKILL, a crash) ends its trial and exits: it must
        # not go on spending the budget beside the next `study run`
        interrupts.exit_with_parent(supervisor.pid)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is it?
    try:
        work(plan)
    except KeyboardInterrupt as exc:  # SIGTERM, SIGHUP too
        sys.exit(interrupts.exit_code(exc))
    except TunerError as exc:
        print(f"[{plan.name}] error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a store that failed between trials (asking for one): one line
        error = store_error(exc, plan.stores)
        if error is None:
            raise
        print(f"[{plan.name}] error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
