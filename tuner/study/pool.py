"""Worker processes: started with `spawn` (CUDA cannot live through a fork), watched, replaced
when one is killed from outside while the study makes progress, and stopped together on Ctrl-C
or SIGTERM."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

from tuner.errors import TunerError
from tuner.interrupts import EXIT_HUNG
from tuner.records import worker_id
from tuner.study.recovery import recover_dead_worker
from tuner.study.worker import WorkerPlan, main

if TYPE_CHECKING:
    from tuner.tracking import Tracker

log = logging.getLogger(__name__)
STOP_WAIT_SECONDS = 60  # after Ctrl-C or SIGTERM, workers get this long to record their trial
STOPPED_WITH_THE_REST = (0, 129, 130, 143)  # done, or stopped by SIGHUP / Ctrl-C / SIGTERM
REPLACEABLE = (-signal.SIGKILL, -signal.SIGTERM, EXIT_HUNG)  # killed, or hung: not its fault
CRASH_LOOP = 3  # deaths of one worker in a row, with no trial finishing, that end its slot


@dataclass(frozen=True)
class Exit:
    """How one worker process ended."""

    name: str
    worker: str  # its `worker_id` (host, pid and start time), read when it started
    code: int  # negative: killed by that signal number

    def describe(self) -> str:
        if self.code < 0:
            return f"killed by {signal.Signals(-self.code).name}"
        return "finished" if self.code == 0 else f"exit code {self.code}"


@dataclass
class Pool:
    """Start `target(plan)` in one process per plan; `run()` waits for all of them."""

    target: Callable[[Any], None]
    on_exit: Callable[[Exit], Any | None]  # a worker ended; return a plan to start a new one
    exits: list[Exit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._live: dict[Any, tuple[str, multiprocessing.process.BaseProcess, str]] = {}

    def start(self, name: str, plan: Any) -> None:
        process = self._context.Process(target=self.target, args=(plan,), name=name)
        process.start()
        # read while the child exists (unreaped, its pid cannot be reused yet)
        self._live[process.sentinel] = (name, process, worker_id(process.pid))

    def run(self) -> list[Exit]:
        """Wait until every worker is done; on Ctrl-C or SIGTERM stop them all, then re-raise."""
        try:
            while self._live:
                for sentinel in multiprocessing.connection.wait(list(self._live), timeout=1.0):
                    self._reap(sentinel)
        except KeyboardInterrupt:  # Terminated too
            self.stop()
            raise
        return self.exits

    def _reap(self, sentinel: Any, restart: bool = True) -> None:
        name, process, worker = self._live.pop(sentinel)
        process.join()
        ended = Exit(name, worker, process.exitcode or 0)
        self.exits.append(ended)
        replacement = self.on_exit(ended)
        if restart and replacement is not None:
            log.info(f"[{name}] replaced by a new worker process")
            self.start(name, replacement)

    def stop(self) -> None:
        """SIGTERM to every worker (each ends its trial as failed and exits), SIGKILL after
        `STOP_WAIT_SECONDS` to any that does not."""
        for _, process, _ in self._live.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while self._live:
            left = deadline - time.monotonic()
            ready = multiprocessing.connection.wait(list(self._live), timeout=max(0.0, left))
            if not ready and left <= 0:
                for _, process, _ in self._live.values():
                    process.kill()
                ready = multiprocessing.connection.wait(list(self._live), timeout=10)
            for sentinel in ready:
                self._reap(sentinel, restart=False)


@dataclass
class Supervisor:
    """Decides what happens when a worker ends: its lost trial is recovered, and a worker that
    was killed or hung is replaced while budget remains, unless it is a crash loop: a worker
    that died `CRASH_LOOP` times with no trial of the run finishing in between."""

    plans: dict[str, WorkerPlan]
    study: optuna.Study
    tracker: Tracker
    deaths: dict[str, int] = field(default_factory=dict)  # in a row, with no trial finishing
    finished: int = 0  # the trials counted against the budget at the last death
    stopped: list[str] = field(default_factory=list)  # workers not replaced: a crash loop

    def on_exit(self, ended: Exit) -> WorkerPlan | None:
        if ended.code in STOPPED_WITH_THE_REST:
            return None
        log.info(f"[{ended.name}] worker {ended.describe()}; the others go on")
        plan = self.plans[ended.name]
        recover_dead_worker(self.study, self.tracker, plan.runs, ended.worker, ended.describe())
        # an error of its own (exit 1, 2) would only recur
        if ended.code not in REPLACEABLE or plan.budget.spent(self.study):
            return None
        finished = plan.budget.counted(self.study)
        if finished > self.finished:  # progress since the last death: no loop
            self.finished = finished
            self.deaths.clear()
        deaths = self.deaths[ended.name] = self.deaths.get(ended.name, 0) + 1
        if deaths >= CRASH_LOOP:
            log.info(f"[{ended.name}] died {deaths} times with no trial finishing in between: "
                     "a crash loop; it is not replaced")  # fmt: skip
            self.stopped.append(ended.name)
            return None
        return plan


def run_pool(plans: list[WorkerPlan], study: optuna.Study, tracker: Tracker) -> list[Exit]:
    """Run each plan in a worker process until every one has ended; how each ended."""
    from tuner.data import ensure

    # download once here, not once per worker at the same time
    ensure(plans[0].spec.data, plans[0].data_dir)
    supervisor = Supervisor({plan.name: plan for plan in plans}, study, tracker)
    pool = Pool(main, supervisor.on_exit)
    for plan in plans:
        pool.start(plan.name, plan)
    exits = pool.run()
    last = {e.name: e.code for e in exits}  # each worker's last process
    if all(code != 0 for code in last.values()):
        why = "a crash loop" if supervisor.stopped else "reasons above"
        raise TunerError(f"every worker failed ({why}); nothing more will run")
    return exits
