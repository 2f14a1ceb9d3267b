"""Worker processes, for real (spawned), and the supervisor's decisions."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from tuner.study import pool as pool_module
from tuner.study.pool import Exit, Pool, Supervisor


def _exit_with(code: int) -> None:
    """A worker that ends with `code` (negative: killed by that signal)."""
    if code < 0:
        os.kill(os.getpid(), -code)
    os._exit(code)


def _until_terminated(ready: object) -> None:
    """A worker that records its trial and exits 143 on SIGTERM, as tuner's do."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    ready.set()
    time.sleep(120)


@pytest.mark.slow
def test_the_pool_reports_how_each_worker_ended_and_replaces_one() -> None:
    replaced = []

    def on_exit(ended: Exit) -> int | None:
        if ended.code == -signal.SIGKILL and not replaced:
            replaced.append(ended.name)
            return 0  # its replacement finishes
        return None

    pool = Pool(_exit_with, on_exit)
    pool.start("a", 0)
    pool.start("b", -signal.SIGKILL)
    exits = pool.run()
    assert sorted((e.name, e.describe()) for e in exits) == [
        ("a", "finished"),
        ("b", "finished"),
        ("b", "killed by SIGKILL"),
    ]


@pytest.mark.slow
def test_stop_terminates_every_worker() -> None:
    pool = Pool(_until_terminated, lambda ended: None)
    ready = [multiprocessing.get_context("spawn").Event() for _ in range(2)]
    for name, event in zip("ab", ready, strict=True):
        pool.start(name, event)
    assert all(event.wait(60) for event in ready), "workers started"
    pool.stop()
    assert sorted(e.code for e in pool.exits) == [143, 143]


class _Budget:
    def __init__(self, spent: bool) -> None:
        self._spent = spent

    def spent(self, study: object) -> bool:
        return self._spent

    def counted(self, study: object) -> int:
        return self.finished

    finished = 0  # the trials counted against the budget


class _Plan:
    runs = "runs"

    def __init__(self, spent: bool = False) -> None:
        self.budget = _Budget(spent)


@pytest.fixture
def recovered(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """The supervisor's calls to recovery (tested in test_recovery), recorded."""
    calls: list[tuple[int, str]] = []
    monkeypatch.setattr(
        pool_module,
        "recover_dead_worker",
        lambda study, tracker, runs, worker, how: calls.append((worker, how)),
    )
    return calls


@pytest.mark.parametrize("code", [0, 130, 143])
def test_workers_that_finished_or_were_stopped_are_left_alone(recovered, code: int) -> None:
    supervisor = Supervisor({"w0": _Plan()}, study=None, tracker=None)
    assert supervisor.on_exit(Exit("w0", "h:7:1", code)) is None and recovered == []


@pytest.mark.parametrize("code", [-signal.SIGKILL, -signal.SIGTERM, 124])
def test_a_killed_or_hung_worker_is_replaced_while_trials_finish_between_its_deaths(
    recovered, code: int
) -> None:
    plan = _Plan()
    supervisor = Supervisor({"w0": plan}, study=None, tracker=None)
    for death in range(10):  # killed again and again, a trial finishing in between each time
        plan.budget.finished += 1
        assert supervisor.on_exit(Exit("w0", f"h:{death}:1", code)) is plan
    assert recovered[0] == ("h:0:1", Exit("w0", "h:0:1", code).describe())
    assert supervisor.on_exit(Exit("w0", "h:20:1", code)) is plan, "2 deaths in a row"
    assert supervisor.on_exit(Exit("w0", "h:21:1", code)) is None, "3: a crash loop ends"
    assert supervisor.stopped == ["w0"]


def test_a_worker_that_failed_on_its_own_is_not_replaced(recovered) -> None:
    supervisor = Supervisor({"w0": _Plan()}, study=None, tracker=None)
    assert supervisor.on_exit(Exit("w0", "h:7:1", 1)) is None
    assert recovered == [("h:7:1", "exit code 1")], "its trial is still recovered"


def test_no_replacement_once_the_budget_is_spent(recovered) -> None:
    supervisor = Supervisor({"w0": _Plan(spent=True)}, study=None, tracker=None)
    assert supervisor.on_exit(Exit("w0", "h:7:1", -signal.SIGKILL)) is None
