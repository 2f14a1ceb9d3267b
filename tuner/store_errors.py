"""What goes wrong with a store, said in one line, and waiting out the one thing that passes:
a SQLite file locked by another process (several workers write to one file, and SQLite lets
one writer in at a time)."""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy

from tuner.errors import ConfigError

log = logging.getLogger(__name__)
STORE_WAIT_SECONDS = 120  # keep retrying a locked store this long in all (TUNER_STORE_WAIT)
MAX_STORE_WAIT = 86_400  # a day: more is a typo, and past threading.TIMEOUT_MAX an error


def store_wait() -> float:
    """Seconds to wait out a locked or unreachable store before the work that needs it fails:
    TUNER_STORE_WAIT (default 120 s), and in a process that runs a study's trials no longer
    than its grace period allows (`bound_store_wait`)."""
    raw = os.environ.get("TUNER_STORE_WAIT")
    try:
        wanted = float(raw) if raw else STORE_WAIT_SECONDS
    except ValueError:
        wanted = math.nan
    if not 0 <= wanted <= MAX_STORE_WAIT:  # NaN too: it compares false
        raise ConfigError(
            f"TUNER_STORE_WAIT={raw!r} is not a number of seconds from 0 to {MAX_STORE_WAIT:,}"
        ) from None
    return min(wanted, _bound) if _bound is not None else wanted


_bound: float | None = None  # set once this process works on a study


def store_wait_cut() -> str | None:
    """One line where TUNER_STORE_WAIT asks for more than this process's study allows."""
    raw = os.environ.get("TUNER_STORE_WAIT")
    if not raw or _bound is None or store_wait() >= float(raw):
        return None
    return (f"a locked or unreachable store is waited for at most {_bound:g} s (limits.grace "
            f"- 2 × limits.heartbeat), not TUNER_STORE_WAIT={raw}: raise limits.grace to wait "
            "longer")  # fmt: skip


def bound_store_wait(heartbeat: float, grace: float) -> None:
    """This process works on a study whose trials beat every `heartbeat` seconds and are taken
    for dead after `grace` seconds of silence: it waits at most `grace - 2 × heartbeat` for a
    store. A live worker that waited that long beats again within a heartbeat, so a store that
    comes back within the store wait never makes a live trial look dead, on any node: they all
    read the same study file. (docs/failures.md has the table of these times.)"""
    global _bound
    _bound = grace - 2 * heartbeat


# -- store errors: what went wrong, in one line, and what to do -----------------------------------
# (a phrase in the error, the cause, the fix); the first that matches anywhere in the chain wins
_CAUSES = (
    ("database is locked", "it is locked by another process",
     "find what holds it (`fuser FILE`), or wait longer with TUNER_STORE_WAIT=SECONDS"),
    ("database or disk is full", "no space left on the device",
     "free space there"),
    ("readonly database", "it is read-only",
     "make the file and its folder writable"),
    ("unable to open database file",
     "its file cannot be opened (deleted, moved, or no permission)",
     "restore it, or point tuner at it (--mlruns, --storage, --tracking-uri)"),
    ("disk i/o error", "a disk I/O error", "check the disk"),
    ("file is not a database", "it is damaged (not a SQLite database)",
     "restore it from a copy, or move it aside to start afresh"),
    ("database disk image is malformed", "it is damaged (a malformed SQLite database)",
     "restore it from a copy, or move it aside to start afresh"),
    ("connection refused", "the server refuses connections",
     "check that the server is running and reachable"),
    ("max retries exceeded", "the server does not answer",
     "check that the server is running and reachable"),
    ("could not connect to server", "the server does not answer",
     "check that the server is running and reachable"),
)  # fmt: skip
ERRNO_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free space there"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there"),
    errno.EROFS: ("the file system is read-only", "make it writable"),
    errno.EACCES: ("permission denied", "make the folder writable"),
}


def shown(url: str) -> str:
    """A URL as printed and logged: its password masked."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password else url


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def store_cause(exc: BaseException) -> tuple[str, str, str | None] | None:
    """(cause, fix, file) when `exc` means a store cannot be used, else None."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in ERRNO_CAUSES:
            cause, fix = ERRNO_CAUSES[link.errno]
            return cause, fix, link.filename
        text = str(link).lower()
        for phrase, cause, fix in _CAUSES:
            if phrase in text:
                return cause, fix, None
    return None


# where a store error was raised tells which store it is: Optuna's own code, or tuner's
# readers of Optuna's tables (`study status`), else MLflow's
_OPTUNA_CODE = ("/optuna/", "/tuner/_tables.py", "/tuner/_optuna.py")


def raised_in_optuna(exc: BaseException) -> bool:
    """`exc` was raised reading or writing the Optuna storage."""
    return any(
        part in frame.filename
        for link in _chain(exc)
        for frame in traceback.extract_tb(link.__traceback__)
        for part in _OPTUNA_CODE
    )


def full(url: str) -> bool:
    """The disk of a SQLite URL's file has (nearly) no room left."""
    import shutil

    try:
        database = sqlalchemy.engine.make_url(url).database
        return bool(database) and shutil.disk_usage(Path(database).parent).free < 64 * 1024
    except Exception:
        return False


# a database server that restarts, or a connection dropped on the way: gone in seconds
_UNREACHABLE = (
    "server closed the connection", "terminating connection", "connection refused",
    "the database system is", "could not receive data", "could not send data",
    "consuming input failed", "connection is closed", "connection already closed",
    "connection timed out", "connection reset", "ssl syscall", "lost connection",
    "server has gone away", "connection is lost", "failed to establish a new connection",
)  # fmt: skip


def _passing(exc: BaseException) -> str | None:
    """What makes `exc` worth waiting out ("locked", "in a deadlock", "unreachable"), or
    None."""
    for link in _chain(exc):
        text = str(link).lower()
        if "database is locked" in text:
            return "locked by another process"
        if "deadlock" in text:  # a database server undid this transaction: another goes on
            return "in a deadlock with another process"
        if getattr(link, "connection_invalidated", False) or any(
            phrase in text for phrase in _UNREACHABLE
        ):
            return "unreachable"
    return None


class _Waiting(threading.local):
    since: float | None = None
    why: str = ""


_waiting = _Waiting()


def patiently(call: Callable[[], object], what: str) -> object:
    """`call()`, retried while the store is locked by another process (SQLite lets one writer
    in at a time) or its server cannot be reached (a restart, a dropped connection: the pool
    reconnects), for `store_wait()` seconds in all; one line says it waits, one that it is
    back."""
    deadline = time.monotonic() + store_wait()
    delay = 0.05  # seconds, doubled up to 2 s
    while True:
        try:
            result = call()
        except Exception as exc:
            why = _passing(exc)
            if why is None or time.monotonic() > deadline:
                _waiting.since = None
                raise
            if _waiting.since is None:
                _waiting.since = time.monotonic()
                _waiting.why = why
                log.info(f"waiting for {what}: {why} (at most {store_wait():.0f} s, "
                         "TUNER_STORE_WAIT)")  # fmt: skip
        else:
            if _waiting.since is not None and _waiting.why == "unreachable":
                log.info(f"{what} answers again after {time.monotonic() - _waiting.since:.0f} s")
            _waiting.since = None
            return result
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
