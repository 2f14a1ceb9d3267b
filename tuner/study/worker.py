"""A worker: take trials from the run's budget until it is spent, one at a time. The loop asks
Optuna for each trial and holds the signal discipline around it: SIGTERM and Ctrl-C wait while
a trial is set up and while it is recorded, and act at once while it trains.

The next trial is asked for while one trains (`Ahead`), on the recorder's thread once the
trial before is recorded: the sampler's work (0.1–0.2 s at 1,000 trials) is off the training
thread, and the sampler knows what it would have known asked in line (the trial before last;
the one training is a running trial either way). A trial asked ahead that does not train (the
worker stops) goes back to the queue with its point."""

from __future__ import annotations

import concurrent.futures
import contextlib
import faulthandler
import functools
import gc
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from tuner import _optuna, console, interrupts
from tuner.errors import TunerError
from tuner.records import (
    SAMPLER_SEED_ATTR,
    SESSION_ATTR,
    SETTINGS_ATTR,
    WORKER_ATTR,
    Outcome,
    Role,
    retried_numbers,
    trial_role,
    worker_id,
)
from tuner.spec import StudySpec
from tuner.stores import Stores
from tuner.study.recovery import fail_stale
from tuner.study.setup import open_study, sampler_seed, settings_digest

if TYPE_CHECKING:
    import torch

    from tuner.objective import After, StudyContext, TrialRun
    from tuner.tracking import StudyRuns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """One `tuner study run`'s trials and clock, shared by its workers."""

    session: str  # the run's id, on each of its trials
    trials: int  # trials this run may start; a trial lost and retried counts once
    deadline: float | None  # time.time() after which no trial starts
    workers: int = 1  # the run's workers, sharing it
    queued_only: bool = False  # take only queued trials, never ask the sampler (refits)

    def expired(self) -> bool:
        """Past the run's --timeout: no trial starts."""
        return self.deadline is not None and time.time() >= self.deadline

    def left(self, study: optuna.Study) -> int:
        """Trials this run may still start (0 past the --timeout)."""
        if self.expired():
            return 0
        trials = study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        mine = [
            t
            for t in trials
            if t.user_attrs.get(SESSION_ATTR) == self.session
            and t.state != TrialState.WAITING
            and t.number not in retried
        ]
        left = max(0, self.trials - len(mine))
        if self.queued_only:
            left = min(left, sum(t.state == TrialState.WAITING for t in trials))
        return left

    def spent(self, study: optuna.Study) -> bool:
        return self.left(study) == 0

    def enough_to_ask_ahead(self, study: optuna.Study) -> bool:
        """The last trials (one per worker) are asked for in line, by whichever worker is
        free: asked ahead, they would wait behind a busy worker's trial while another worker
        found the budget spent and stopped."""
        return self.left(study) >= self.workers


def progress_note(budget: Budget, study: optuna.Study, now: float | None = None) -> str:
    """`  (3/8 done, about 1 min 20 s left)`: the run's finished trials, and the time its
    trials left take at the pace of those finished (all workers together, pruning included;
    no later than its --timeout)."""
    mine = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get(SESSION_ATTR) == budget.session and t.state.is_finished()
    ]
    done = len(mine)
    left = max(0, budget.trials - done)
    if not mine or not left:
        return f"  ({done}/{budget.trials} done)"
    now = time.time() if now is None else now
    began = min(t.datetime_start.timestamp() for t in mine if t.datetime_start)
    seconds = (now - began) / done * left
    if budget.deadline is not None:
        seconds = min(seconds, max(0.0, budget.deadline - now))
    return f"  ({done}/{budget.trials} done, about {_duration(seconds)} left)"


def _duration(seconds: float) -> str:
    """`45 s`, `3 min 20 s`, `2 h 05 min`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


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
    claim: Any = None  # a multiprocessing lock: one worker at a time turns budget into a trial
    threads: int | None = None  # CPU threads for torch; None: torch's default (all cores)
    index: int = 0  # the worker's number in its run: seeds its own sampler

    @property
    def seed(self) -> int:
        """Its sampler's seed: unique to the run, the worker and the process it runs in (read
        in that process; recorded on each trial)."""
        return sampler_seed(self.spec, self.budget.session, self.index, worker_id())


def work(plan: WorkerPlan) -> None:
    """The body of every worker: load the data once, then run trials until the budget is spent."""
    import torch

    from tuner.data import load_train_val
    from tuner.objective import StudyContext
    from tuner.tracking import Tracker

    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    # the first optimizer a process builds imports torch._dynamo (2 s on 2 cores): here, once,
    # with the worker's start-up, not inside its first trial's time
    import torch._dynamo  # noqa: F401

    tracker = Tracker(plan.stores)
    study = open_study(plan.spec, plan.stores, plan.seed)
    log.info(f"loading CIFAR-10 from {plan.data_dir} onto {plan.device} …")
    data = load_train_val(plan.data_dir, plan.spec.data, plan.spec.seed, plan.device)
    if trial_role(plan.spec.name) is Role.REFIT:
        data = data.merged()  # the configuration is chosen: train on what validated it
        log.info(f"  {len(data.train)} training images (train + validation) from {data.source}")
    else:
        log.info(f"  {len(data.train)} training and {len(data.val)} validation images from "
                 f"{data.source}")  # fmt: skip
    progress = functools.partial(progress_note, plan.budget)
    ctx = StudyContext(plan.spec, data, tracker, plan.runs, plan.seed, progress)
    # alone in its process, a worker has nobody to wait for: a lock of its own does
    claim = plan.claim if plan.claim is not None else threading.Lock()
    _optuna.ready_pruner(study)  # before its first `prune` meets an ask on another thread
    ahead = Ahead()
    try:
        while run_one(study, ctx, plan.budget, claim, ahead):
            if plan.device.type == "cpu":
                gc.collect()  # as study.optimize(gc_after_trial=True): the CPU allocator keeps it
    except BaseException:
        ahead.give_back()
        _last_record(ctx, raising=False)
        raise
    ahead.give_back()
    _last_record(ctx)


def _last_record(ctx: StudyContext, raising: bool = True) -> None:
    """The worker ends (its budget spent, a signal, an error): the completed trial the
    recorder still writes is recorded first. Its error is raised, unless another error or a
    signal is already ending the worker (then it is one line)."""
    try:
        with interrupts.shielded():  # Ctrl-C waits for the record
            ctx.recorder.flush()
    except Exception as exc:
        if raising:
            raise
        log.info(f"the last completed trial could not be recorded: {exc}")


@dataclass(frozen=True)
class Asked:
    """A trial asked for, its point drawn, not trained yet; its heartbeat runs."""

    run: TrialRun
    heartbeat: contextlib.ExitStack

    def give_back(self) -> None:
        """It will not train here (the worker stops): back in the queue, its point kept, for
        the next worker or run to take."""
        tag = self.run.tag
        with interrupts.shielded(), self.heartbeat:  # a second Ctrl-C waits for the write
            try:
                trial = self.run.trial
                back = _optuna.unask(trial.study, trial._trial_id)
            except Exception as exc:
                log.info(
                    f"{tag} asked ahead and not started, but it could not be queued again "
                    f"({exc}); it is failed and queued once its heartbeat is stale"
                )
                return
        if back:
            log.info(f"{tag} asked ahead and not started: queued again for the next worker")


class Ahead:
    """A worker's next trial, asked for on the recorder's thread while one trains: queued
    after the record of the trial before (`After`), so that the sampler knows it."""

    def __init__(self) -> None:
        self._next: After | None = None

    def ask(self, study: optuna.Study, ctx: StudyContext, budget: Budget, claim: Any) -> None:
        from tuner.objective import After

        self._next = After(functools.partial(set_up, study, ctx, budget, claim, ahead=True))
        ctx.recorder.put(self._next)

    def take(self) -> Asked | None:
        """The trial asked ahead, once it is (its set-up's error is raised); None where none
        was: the budget was spent then, or a record before it failed (the recorder says)."""
        after, self._next = self._next, None
        if after is None:
            return None
        try:
            return after.future.result()
        except concurrent.futures.CancelledError:
            return None

    def give_back(self) -> None:
        """The worker stops: the trial asked ahead, if any, goes back to the queue."""
        after, self._next = self._next, None
        if after is None or after.future.cancel():
            return
        try:
            with interrupts.shielded():
                asked = after.future.result()
        except Exception as exc:
            log.info(f"the next trial could not be asked for ahead: {exc}")
            return
        if asked is not None:
            asked.give_back()


def set_up(
    study: optuna.Study, ctx: StudyContext, budget: Budget, claim: Any, ahead: bool = False
) -> Asked | None:
    """Turn budget into a trial, one worker at a time (`claim`): the budget checked, stale
    trials failed (as `study.optimize` does before each trial), `ask`, its heartbeat and
    attributes; then its point drawn. None: the budget is spent (`ahead`: too little is
    left to ask ahead), or a signal waits."""
    from tuner.objective import TrialRun

    with contextlib.ExitStack() as beating:
        with claim:
            room = budget.enough_to_ask_ahead(study) if ahead else not budget.spent(study)
            if interrupts.pending() or not room:
                return None
            fail_stale(study)
            trial = _optuna.ask(study)
            # its heartbeat from the start: a trial whose set-up fails (a full disk) is
            # failed and queued again once the heartbeat is stale, never left RUNNING
            beating.enter_context(_optuna.heartbeat(trial, f"[trial {trial.number}]"))
            trial.set_user_attr(WORKER_ATTR, worker_id())  # it says the trial is live
            trial.set_user_attr(SESSION_ATTR, budget.session)  # counted, under the claim
            trial.set_user_attr(SAMPLER_SEED_ATTR, ctx.sampler_seed)
            trial.set_user_attr(SETTINGS_ATTR, settings_digest(ctx.spec))
        run = TrialRun(ctx, trial)
        run.draw()
        return Asked(run, beating.pop_all())


def run_one(
    study: optuna.Study, ctx: StudyContext, budget: Budget, claim: Any, ahead: Ahead | None = None
) -> bool:
    """Take the trial asked ahead (or ask for one), train it, record it; False when the budget
    is spent. With `ahead`, the next trial is asked for while this one trains."""
    from tuner.objective import Completed

    interrupts.defer()  # a signal waits while the trial is set up, and while it is recorded
    try:
        asked = ahead.take() if ahead is not None else None
        try:
            ctx.recorder.check()  # the last completed trial could not be recorded: stop
        except BaseException:
            if asked is not None:
                asked.give_back()
            raise
        if asked is not None and (interrupts.pending() or budget.expired()):
            asked.give_back()
            return False
        asked = asked or set_up(study, ctx, budget, claim)
        if asked is None:
            return False
        with contextlib.ExitStack() as beating:
            beating.enter_context(asked.heartbeat)
            run = asked.run
            if ahead is not None:
                ahead.ask(study, ctx, budget, claim)  # the next one, while this one trains
            ending = run.attempt()  # signals act at once while it trains
            if ending.outcome is Outcome.COMPLETE:
                # recorded while the next trial trains; the one before is recorded by now
                try:
                    ctx.recorder.flush()
                except Exception:  # it could not be: this one is recorded here, then stop
                    with contextlib.suppress(Exception):  # if not, it is failed when stale
                        run.finish(ending)
                    raise
                ctx.recorder.put(Completed(run, ending, beating.pop_all()))
                return True
            ending = run.finish(ending)
    finally:
        interrupts.resume()  # a signal that waited is raised here, between trials
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
