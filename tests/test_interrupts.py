"""Signals, raised for real (`signal.raise_signal`) in this process or in a child."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tuner import interrupts


def test_sigterm_and_ctrl_c_raise_with_their_reason(signal_handlers: None) -> None:
    with pytest.raises(interrupts.Terminated) as info:
        signal.raise_signal(signal.SIGTERM)
    assert interrupts.reason(info.value) == "terminated"
    interrupts._stopping = False  # (a stop ignores later signals: see the next test)
    with pytest.raises(KeyboardInterrupt) as info:
        signal.raise_signal(signal.SIGINT)
    assert interrupts.reason(info.value) == "interrupted"


def test_after_a_stop_later_signals_do_not_break_the_clean_up(signal_handlers: None) -> None:
    with pytest.raises(interrupts.Terminated):
        signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)  # a second Ctrl-C while the trial is being recorded
    assert not interrupts.pending()


def test_a_deferred_signal_waits_for_resume(signal_handlers: None) -> None:
    interrupts.defer()
    signal.raise_signal(signal.SIGTERM)
    assert interrupts.pending(), "recorded, not raised"
    with pytest.raises(interrupts.Terminated):
        interrupts.resume()


def test_inside_live_a_signal_acts_at_once_and_one_that_waited_is_raised_on_entry(
    signal_handlers: None,
) -> None:
    interrupts.defer()
    signal.raise_signal(signal.SIGINT)  # while the trial was being set up
    with pytest.raises(KeyboardInterrupt), interrupts.live():
        pytest.fail("the waiting signal is raised before training starts")
    interrupts.resume()
    interrupts._stopping = False
    interrupts.defer()
    with pytest.raises(interrupts.Terminated), interrupts.live():
        signal.raise_signal(signal.SIGTERM)  # while training
    interrupts.resume()


def test_live_restores_deferral_for_the_recording(signal_handlers: None) -> None:
    interrupts.defer()
    with interrupts.live():
        pass
    signal.raise_signal(signal.SIGTERM)  # while the results are written
    assert interrupts.pending()
    with pytest.raises(interrupts.Terminated):
        interrupts.resume()


def test_a_shielded_write_finishes_before_the_signal(signal_handlers: None) -> None:
    steps = []
    with pytest.raises(interrupts.Terminated), interrupts.shielded():
        signal.raise_signal(signal.SIGTERM)
        steps.append("the write finished")
    assert steps == ["the write finished"]


def test_a_time_limit_cuts_a_blocking_call_short(signal_handlers: None) -> None:
    hung = []
    with pytest.raises(interrupts.TrialTimeout), interrupts.time_limit(0.2, hung.append):
        time.sleep(30)
    assert not hung, "the watchdog stays quiet when the limit worked"


def test_a_time_limit_never_cuts_an_import_in_half(
    signal_handlers: None, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen: the limit landed in torch._dynamo's first import, and every later trial of the
    worker failed on the half-initialised module."""
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(0.6)\nVALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_to_import", raising=False)
    imported = []
    with pytest.raises(interrupts.TrialTimeout), interrupts.time_limit(0.2, lambda: None):
        import slow_to_import  # the limit falls in here

        imported.append(slow_to_import.VALUE)
        time.sleep(30)  # and is raised here
    assert imported == [1] and sys.modules["slow_to_import"].VALUE == 1


def test_no_limit_is_no_limit(signal_handlers: None) -> None:
    with interrupts.time_limit(None, lambda: None):
        pass


SHIELDED = """
import os, signal
from tuner import interrupts
interrupts.install()
try:
    with interrupts.shielded():
        os.kill(os.getpid(), signal.SIGTERM)
        print("the write finished", flush=True)
except interrupts.Terminated:
    print("then the signal", flush=True)
"""


@pytest.mark.slow
def test_a_signal_during_a_database_write_waits_for_it() -> None:
    """Cut in half, a SQLite write keeps its lock and every clean-up write waits on it (seen:
    a pool that took 80 s to stop on SIGTERM). From another process, as the supervisor's is."""
    out = subprocess.run(
        [sys.executable, "-c", SHIELDED], capture_output=True, text=True, timeout=60
    )
    assert out.stdout == "the write finished\nthen the signal\n", out.stderr


HUNG = """
import signal, sys, time
from tuner import interrupts
interrupts.install()
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as if stuck in native code
with interrupts.time_limit(0.5, lambda: print("recorded the hang", flush=True), hang_grace=1):
    time.sleep(30)
print("not reached")
"""


@pytest.mark.slow
def test_a_trial_stuck_where_signals_cannot_reach_ends_its_worker() -> None:
    # the bound: the stuck call would sleep 30 s, the watchdog acts after 1.5 s
    out = subprocess.run([sys.executable, "-c", HUNG], capture_output=True, text=True, timeout=25)
    assert out.returncode == interrupts.EXIT_HUNG and out.stdout == "recorded the hang\n"
