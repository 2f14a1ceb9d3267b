"""Progress for people: every module logs to its own `logging.getLogger(__name__)`; the command
line (and each worker process) shows tuner's records as plain lines on standard output."""

from __future__ import annotations

import logging
import sys

ROOT = "tuner"


class _Lines(logging.Handler):
    """One line per record on the current `sys.stdout` (looked up at each record, so that a
    redirected or captured stdout gets the lines), flushed at once: progress shows as it
    happens, also through a pipe."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(f"{self.prefix}{record.getMessage()}\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def show(prefix: str = "") -> None:
    """Print tuner's INFO and above as plain lines, each after `prefix` (a worker's name)."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _Lines)]:
        logger.removeHandler(handler)
    logger.addHandler(_Lines(prefix))
    logger.setLevel(logging.INFO)
    logger.propagate = False
