"""Worker processes: started with `spawn` (CUDA cannot live through a fork), watched, replaced
when one dies while work remains, and stopped together on Ctrl-C or SIGTERM."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STOP_WAIT_SECONDS = 60  # after Ctrl-C or SIGTERM, workers get this long to record their trial


@dataclass
class Exit:
    """How one worker process ended."""

    name: str
    pid: int
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
    say: Callable[[str], None] = print
    exits: list[Exit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._live: dict[Any, tuple[str, multiprocessing.process.BaseProcess]] = {}

    def start(self, name: str, plan: Any) -> None:
        process = self._context.Process(target=self.target, args=(plan,), name=name)
        process.start()
        self._live[process.sentinel] = (name, process)

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
        name, process = self._live.pop(sentinel)
        process.join()
        ended = Exit(name, process.pid or 0, process.exitcode or 0)
        self.exits.append(ended)
        replacement = self.on_exit(ended)
        if restart and replacement is not None:
            self.say(f"[{name}] replaced by a new worker process")
            self.start(name, replacement)

    def stop(self) -> None:
        """SIGTERM to every worker (each ends its trial as failed and exits), SIGKILL after
        `STOP_WAIT_SECONDS` to any that does not."""
        for _, process in self._live.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while self._live:
            left = deadline - time.monotonic()
            ready = multiprocessing.connection.wait(list(self._live), timeout=max(0.0, left))
            if not ready and left <= 0:
                for _, process in self._live.values():
                    process.kill()
                ready = multiprocessing.connection.wait(list(self._live), timeout=10)
            for sentinel in ready:
                self._reap(sentinel, restart=False)
