"""Progress for people: every module logs to its own `logging.getLogger(__name__)`; the command
line (and each worker process) shows tuner's records as plain lines on standard output. Each
line is written whole, in one write: the lines of several workers never interleave mid-line.
On a terminal, a long epoch also shows a bar of its steps (`StepBar`)."""

from __future__ import annotations

import logging
import sys
from typing import Any

ROOT = "tuner"
BAR_DELAY = 3.0  # seconds into an epoch before its bar shows: short epochs show none
_bars: list[Any] = []  # the bar on screen, if any (one process draws at most one)
_prefix: str | None = None  # the prefix of this process's lines, once `show` was called


class _Lines(logging.Handler):
    """One line per record on the current `sys.stdout` (looked up at each record, so that a
    redirected or captured stdout gets the lines), flushed at once: progress shows as it
    happens, also through a pipe. A bar on screen is cleared for the line and drawn again."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"{self.prefix}{record.getMessage()}\n"
            if _bars:
                from tqdm import tqdm

                with tqdm.external_write_mode(file=sys.stdout):
                    sys.stdout.write(line)
            else:
                sys.stdout.write(line)
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def show(prefix: str = "") -> None:
    """Print tuner's INFO and above as plain lines, each after `prefix` (a worker's name)."""
    global _prefix
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _Lines)]:
        logger.removeHandler(handler)
    logger.addHandler(_Lines(prefix))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _prefix = prefix


def bars_wanted() -> bool:
    """Bars only on a terminal, and only for a process that works alone (a worker of a pool
    has a prefix): several processes' bars on one terminal would write over each other."""
    return _prefix == "" and sys.stdout.isatty()


class StepBar:
    """The steps of each epoch as a `tqdm` bar that shows only after `BAR_DELAY` seconds into
    the epoch and leaves no trace; nothing at all where `bars_wanted()` is false."""

    def __init__(self, steps: int, label: str, enabled: bool | None = None) -> None:
        self.steps, self.label = steps, label
        self.enabled = bars_wanted() if enabled is None else enabled
        self.bar: Any = None
        self.epoch = 0

    def step(self) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.epoch += 1
            self.bar = tqdm(total=self.steps, desc=f"{self.label} epoch {self.epoch}",
                            unit="step", leave=False, delay=BAR_DELAY, file=sys.stdout,
                            dynamic_ncols=True, mininterval=0.5)  # fmt: skip
            _bars.append(self.bar)
        self.bar.update(1)

    def end_epoch(self) -> None:
        """The epoch ended (its line follows): the bar goes."""
        if self.bar is not None:
            _bars.remove(self.bar)
            self.bar.close()
            self.bar = None

    close = end_epoch


def counted(n: int, noun: str) -> str:
    """`1 network`, `2 networks`, `3 more trials`."""
    return f"{n} {noun}{'s' * (n != 1)}"


def duration(seconds: float) -> str:
    """`45 s`, `3 min 20 s`, `2 h 05 min`, `3 days 04 h`."""
    seconds = round(seconds)
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days {seconds % 86400 // 3600:02d} h"
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
