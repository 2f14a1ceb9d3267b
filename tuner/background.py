"""Work in a thread beside the training: a piece of work repeated while a block runs, that an
error does not end (the heartbeat of a trial, a `study run`'s watch for dead workers on every
node). The block owns the thread: leaving it ends the thread."""

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
