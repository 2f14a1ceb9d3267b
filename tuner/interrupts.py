"""How a worker is stopped: SIGTERM and Ctrl-C end the running trial as failed with a reason, a
trial past its wall-clock limit is cut short, and neither lands in the middle of a file write."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

EXIT_HUNG = 124  # a worker whose trial would not stop after its time limit (as `timeout`)
IMPORT_RETRY_SECONDS = 0.05  # a time limit that falls inside an import waits this long, again
HANG_GRACE_SECONDS = 30  # after its time limit, a trial stuck in native code gets this long


class Terminated(KeyboardInterrupt):
    """SIGTERM (preemption, `kill`, a supervisor shutting down): handled as Ctrl-C is."""

    exit_code = 143


class HungUp(Terminated):
    """SIGHUP (the terminal or SSH session closed): handled as SIGTERM is."""

    exit_code = 129


class TrialTimeout(BaseException):
    """A trial ran past `limits.trial_timeout`. A BaseException, so that no library's
    `except Exception` retry loop swallows it on its way out of the training loop."""


_deferring = 0
_shielded = 0  # depth of `shielded()` blocks: a database write in progress
_pending: list[BaseException] = []
_stopping = False  # a stop was raised: later signals must not break the clean-up it started


def _raise(exc: BaseException) -> None:
    if _stopping and not isinstance(exc, TrialTimeout):
        return
    _pending.append(exc)
    if not (_deferring or _shielded):  # else: after the write, or between trials
        _raise_pending()


def _raise_pending() -> None:
    """Raise the signal waiting in `_pending`, if any; after a stop, ignore later ones."""
    global _stopping
    if not _pending:
        return
    exc = _pending[0]
    _pending.clear()
    if not isinstance(exc, TrialTimeout):
        _stopping = True
    raise exc


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _raise(Terminated("terminated by SIGTERM"))


def _on_sighup(signum: int, frame: FrameType | None) -> None:
    _raise(HungUp("terminated by SIGHUP (the terminal closed)"))


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _raise(KeyboardInterrupt("interrupted (Ctrl-C)"))


def _importing(frame: FrameType | None) -> bool:
    """The main thread is inside Python's import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    # An import cut in half leaves a half-initialised module behind, and every later trial of
    # the worker fails on it (seen: the first trial's limit landing in torch._dynamo's first
    # import): try again just after. An import that never ends is the watchdog's.
    if _importing(frame):
        signal.setitimer(signal.ITIMER_REAL, IMPORT_RETRY_SECONDS)
        return
    _raise(TrialTimeout())


def install() -> None:
    """SIGTERM, SIGHUP, SIGINT and SIGALRM raise in the main thread (later, inside
    `shielded()` or between `defer()` and `resume()`)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sighup)
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGALRM, _on_alarm)


def reason(exc: BaseException) -> str:
    """The fail reason recorded for a trial stopped by `exc`."""
    return "terminated" if isinstance(exc, Terminated) else "interrupted"


def exit_code(exc: BaseException) -> int:
    """The exit status of a process stopped by `exc`: 143 SIGTERM, 129 SIGHUP, 130 Ctrl-C."""
    return getattr(exc, "exit_code", 130)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    """libc's `prctl` (Linux), or None where there is none."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def exit_with_parent(parent: int) -> None:
    """Ask the kernel to send this process SIGTERM when its parent (pid `parent`) dies
    (Linux), so a worker never outlives its supervisor; elsewhere, a thread watches."""
    prctl = _prctl()
    if prctl is None or prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the kernel was asked
        os.kill(os.getpid(), signal.SIGTERM)


def on_parent_death(sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` for a child that must get `sig` when this process dies, even by SIGKILL
    (Linux); None elsewhere. `prctl` is looked up here, in the parent: the child runs it
    between fork and exec, where loading a library could deadlock."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # it died before the kernel was asked
            os.kill(os.getpid(), sig)

    return preexec


def _watch_parent(parent: int, every: float = 1.0) -> None:
    while os.getppid() == parent:
        threading.Event().wait(every)
    os.kill(os.getpid(), signal.SIGTERM)


def defer() -> None:
    """From here until `resume()`, SIGTERM and Ctrl-C wait (but inside `live()`): a trial is
    set up and recorded whole, and the worker stops after it."""
    global _deferring
    _deferring = 1


@contextlib.contextmanager
def live() -> Iterator[None]:
    """Inside `defer()`, the part where a signal acts at once (training): one that arrived
    while deferred is raised on entry."""
    global _deferring
    saved, _deferring = _deferring, 0
    try:
        if not _shielded:
            _raise_pending()
        yield
    finally:
        _deferring = saved


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A signal arriving inside waits until the block is done, then is raised. For database
    writes: interrupted halfway, SQLite keeps the write lock of the broken transaction, and the
    clean-up writes that follow (and every other worker's) wait on it. Outside the main
    thread (the epoch writer, the watchdog), nothing: Python runs signal handlers in the main
    thread only, so a signal never cuts another thread's write; and such a write must neither
    hold a signal back from the training it should stop, nor raise it in its own thread."""
    global _shielded
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _shielded += 1
    try:
        yield
    finally:
        _shielded -= 1
    if not (_shielded or _deferring):
        _raise_pending()


def pending() -> bool:
    """A signal is waiting (deferred) to be raised."""
    return bool(_pending)


def resume() -> None:
    """End `defer()`; raise the signal that arrived meanwhile, if any (between trials)."""
    global _deferring
    _deferring = 0
    _raise_pending()


class _Limit:
    """A trial's time limit, counted on the training's clock: the seconds a trial spends
    waiting for a store (`writing()`) are not counted, since a store that is locked for
    less than the store wait must never turn a trial into a timeout. SIGALRM raises
    `TrialTimeout` in the main thread after `seconds` of training; the watchdog thread ends
    the process after `seconds + hang_grace` of training, where code stuck in native code
    never returns to Python to see SIGALRM."""

    def __init__(self, seconds: float, hang_grace: float) -> None:
        self.seconds, self.hang_grace = seconds, hang_grace
        self.spent = 0.0  # training seconds before the last pause
        self.since: float | None = time.monotonic()  # None while paused
        self.done = False
        self.changed = threading.Condition()

    def trained(self) -> float:
        running = time.monotonic() - self.since if self.since is not None else 0.0
        return self.spent + running

    def pause(self) -> None:
        with self.changed:
            if self.since is not None:
                self.spent += time.monotonic() - self.since
                self.since = None
        signal.setitimer(signal.ITIMER_REAL, 0)

    def resume(self) -> None:
        with self.changed:
            self.since = time.monotonic()
            self.changed.notify_all()
        left = self.seconds - self.spent
        if left > 0:  # else: the alarm came already (raised when the write is done)
            signal.setitimer(signal.ITIMER_REAL, left)

    def end(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        with self.changed:
            self.done = True
            self.changed.notify_all()

    def hung(self) -> bool:
        """Wait until the training has run `seconds + hang_grace` (True), or the block ends."""
        bound = self.seconds + self.hang_grace
        with self.changed:
            while not self.done:
                if self.since is None:
                    self.changed.wait()  # paused: a store write, bounded by the store wait
                    continue
                left = bound - self.trained()
                if left <= 0:
                    return True
                self.changed.wait(left)
        return False


_limit: _Limit | None = None  # the time limit of the trial training now, if any


@contextlib.contextmanager
def time_limit(
    seconds: float | None, on_hang: Callable[[], None], hang_grace: float = HANG_GRACE_SECONDS
) -> Iterator[None]:
    """Raise `TrialTimeout` in the main thread after `seconds` of training (see `_Limit`;
    the time inside `writing()` is not counted). SIGALRM also cuts a blocking sleep or read
    short. If the training is stuck where signals cannot reach it, a watchdog thread calls
    `on_hang` (which records the trial as failed) `hang_grace` seconds later and ends the
    process with `EXIT_HUNG`; a supervisor then starts a fresh worker. A limit that came
    while the trial was being written and was not raised by the end of the block is dropped
    with it: it belongs to this trial, never to the next."""
    global _limit
    if seconds is None:
        yield
        return
    limit = _Limit(seconds, hang_grace)

    def watchdog() -> None:
        if not limit.hung():
            return
        try:
            on_hang()
        finally:
            os._exit(EXIT_HUNG)

    thread = threading.Thread(target=watchdog, name="tuner-trial-watchdog", daemon=True)
    _limit = limit
    thread.start()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        limit.end()
        _limit = None
        _pending[:] = [e for e in _pending if not isinstance(e, TrialTimeout)]


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """A store write in the middle of training (an epoch's records): a signal waits for it
    (`shielded`), and the trial's time limit stops counting while it waits for the store."""
    limit = _limit if threading.current_thread() is threading.main_thread() else None
    with shielded():
        if limit is not None:
            limit.pause()
        try:
            yield
        finally:
            if limit is not None:
                limit.resume()
