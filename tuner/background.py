"""Work in threads beside the training: a piece of work repeated while a block runs, that an
error does not end (the heartbeat of a trial, a `study run`'s watch for dead workers on every
node); and writes handed off in order (each epoch's records), so that training never waits
for a store."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)
SIGNALS = {signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def leave_signals_to_the_main_thread() -> None:
    """Called first in each of tuner's threads: the signals that stop a trial (SIGALRM's time
    limit above all) are delivered to the main thread, where a blocking call they must cut
    short (a sleep, a read) gets EINTR; taken by another thread, they would only be noticed
    when that call returns."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


@contextlib.contextmanager
def repeating(
    action: Callable[[], object],
    interval: float,
    name: str,
    *,
    failed: Callable[[Exception], str],
    recovered: str | None = None,
    at_once: bool = False,
    join_timeout: float | None = None,
) -> Iterator[None]:
    """`action()` every `interval` seconds in a daemon thread `name` while the block runs
    (first at once when `at_once`, else after one interval). An error is one line,
    `failed(exc)`, until a round works again (then `recovered`, if given); the next round
    tries again. On leaving the block, the thread gets `join_timeout` seconds (default: one
    interval and a second) to end its round."""
    stop = threading.Event()

    def rounds() -> None:
        leave_signals_to_the_main_thread()
        failing = False
        if not at_once and stop.wait(interval):
            return
        while True:
            try:
                action()
            except Exception as exc:
                if not failing:
                    log.info(failed(exc))
                failing = True
            else:
                if failing and recovered:
                    log.info(recovered)
                failing = False
            if stop.wait(interval):
                return

    thread = threading.Thread(target=rounds, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 1 if join_timeout is None else join_timeout)


class Drain:
    """Work one thread hands off and another does, in order, so that the first never waits
    for a store: `put(item)` returns at once, and a daemon thread `name` passes everything put
    since its last call to `write(items)`, in one call (a batch). `flush()` waits until all
    that was put is written, then raises the first error the writes met; so does `check()`,
    without waiting. After an error, later items are still written."""

    def __init__(self, write: Callable[[list[object]], object], name: str) -> None:
        self._write = write
        self._pending: list[object] = []
        self._busy = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: object) -> None:
        with self._changed:
            self._pending.append(item)
            self._changed.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every item put is written (TimeoutError after `timeout` seconds), then
        `check()`."""
        with self._changed:
            idle = self._changed.wait_for(lambda: not self._pending and not self._busy, timeout)
        if not idle:
            raise TimeoutError(f"{self._thread.name}: still writing after {timeout} s")
        self.check()

    def check(self) -> None:
        """Raise the first error a write met since the last check (once)."""
        with self._changed:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        leave_signals_to_the_main_thread()
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending))
                batch, self._pending = self._pending, []
                self._busy = True
            try:
                self._write(batch)
            except Exception as exc:
                with self._changed:
                    self._error = self._error or exc
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
