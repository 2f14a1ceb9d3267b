"""Store faults, injected for real: the Optuna database locked by another process mid-trial,
and the disk under `mlruns/` full while the weights are written (a small tmpfs)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TINY_STUDY
from .helpers import no_leftovers, quick, start, stored, trial_runs, tuner, wait_for_line
from .test_faults import study_file

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process's write lock on a SQLite file (readers still read: WAL)."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("COMMIT")
        holder.close()


# -- 4. the Optuna database locked by another process mid-trial -----------------------------------


def test_a_lock_longer_than_the_driver_waits_is_waited_out(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The driver gives up after 10 s; tuner waits the store wait (here 28 s) in all."""
    study_file(tmp_path, "patient", trials=1, train={**TINY_STUDY["train"], "epochs": 4},
               limits={"heartbeat": 1, "grace": 30})  # fmt: skip
    assert (
        quick(tmp_path, fake_cifar, monkeypatch, capsys, "study", "create", "patient").returncode
        == 0
    )
    run = start(tmp_path, fake_cifar, "study", "run", "patient")
    wait_for_line(run, r"\[trial 0\] epoch 1/")
    with locked(tmp_path / "mlruns" / "optuna.db"):
        wait_for_line(run, "waiting for the Optuna storage .*locked by another process")
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert [t.state.name for t in stored(tmp_path, "patient").trials] == ["COMPLETE"]
    no_leftovers(tmp_path, "patient")


def test_trials_lost_to_a_locked_store_are_failed_queued_and_not_counted(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("TUNER_STORE_WAIT", "3")  # give up sooner than a user would
    # the store wait: TUNER_STORE_WAIT's 3 s (grace - 2 × heartbeat allows 6)
    study_file(tmp_path, "locked", train={**TINY_STUDY["train"], "epochs": 12},
               limits={"heartbeat": 1, "grace": 8})  # fmt: skip
    assert (
        quick(tmp_path, fake_cifar, monkeypatch, capsys, "study", "create", "locked").returncode
        == 0
    )
    run = start(tmp_path, fake_cifar, "study", "run", "locked", "--jobs", "2", "--trials", "2")
    wait_for_line(run, r"\[w\d\] \[trial \d\] epoch 2/")
    with locked(tmp_path / "mlruns" / "optuna.db"):
        wait_for_line(run, r"\[trial \d\] lost to a store error")
    out, err = run.communicate(timeout=300)
    # the worker that lost its trial stops with one line; one that waited long enough goes
    # on (and may run the retry): the run ends 0 or 1
    assert run.returncode in (0, 1), out + err
    assert "Traceback" not in err
    assert "locked by another process; find what holds it" in err

    trials = stored(tmp_path, "locked").trials
    if run.returncode == 0:  # a worker went on: 2 trials finished, the lost ones not counted
        session = trials[0].user_attrs["session"]
        done = [t for t in trials if t.user_attrs.get("session") == session]
        assert sum(t.state.name == "COMPLETE" for t in done) == 2, out + err
    lost = [t for t in trials if t.state.name == "FAIL"]
    assert lost, "a trial was lost to the lock"
    for trial in lost:
        reason = trial.user_attrs["fail_reason"]
        assert reason.startswith("store error: the Optuna storage sqlite:///"), reason
        assert "it is locked by another process" in reason
        retry = next(t for t in trials if t.user_attrs.get("retry_of") == trial.number)
        point = retry.params or retry.system_attrs["fixed_params"]
        assert trial.params.items() <= point.items(), "the point, as far as it was stored"
        assert trial_runs(tmp_path, "locked")[trial.number].info.status == "FAILED"

    # the lock is gone: the retries run first, and the budget counts only what finished. A
    # worker that the lock stopped between `ask` and marking its trial left it RUNNING, its
    # heartbeat silent: this run fails it once the grace period is over, and queues it too
    again = tuner(tmp_path, fake_cifar, "study", "run", "locked", "--trials", "3")
    assert again.returncode == 0, again.stderr
    trials = stored(tmp_path, "locked").trials
    retried = [t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs]
    assert {t.number for t in lost} <= set(retried) and len(retried) == len(set(retried))
    assert all(t.state.name != "WAITING" for t in trials), "every retry ran"
    finished = [
        t for t in trials if t.user_attrs.get("session") == trials[-1].user_attrs["session"]
    ]
    assert [t.state.name for t in finished] == ["COMPLETE"] * 3
    no_leftovers(tmp_path, "locked")


def _created(cwd: Path, data: Path, monkeypatch, capsys, name: str, grace: int) -> None:
    """Study `name`, of one trial beating every second, created in `cwd`'s stores."""
    study_file(cwd, name, trials=1, limits={"heartbeat": 1, "grace": grace})
    assert quick(cwd, data, monkeypatch, capsys, "study", "create", name).returncode == 0


def test_a_trial_asked_of_a_locked_store_fails_after_the_store_wait_in_one_line(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The Optuna store is locked when the run asks for its trial, for longer than
    TUNER_STORE_WAIT (4 s): the run says that it waits (after its first try, half the store
    wait), then gives up with one line naming the store and what to do, nothing RUNNING.
    Optuna's own five tries, each the driver's whole wait, outlasted the store wait before it
    could say so."""
    _created(tmp_path, fake_cifar, monkeypatch, capsys, "ask-locked", grace=30)
    with locked(tmp_path / "mlruns" / "optuna.db"):
        run = start(tmp_path, fake_cifar, "study", "run", "ask-locked",
                    env={"TUNER_STORE_WAIT": "4"})  # fmt: skip
        out, err = run.communicate(timeout=300)
    assert run.returncode == 1, out + err
    assert re.search(r"waiting for the Optuna storage .*locked by another process \(at most "
                     r"4 s", out + err), out + err  # fmt: skip
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: the Optuna storage sqlite:///"), err
    assert "it is locked by another process; find what holds it" in err
    no_leftovers(tmp_path, "ask-locked")


def test_a_trial_asked_of_a_locked_store_is_waited_for_and_runs(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """TUNER_STORE_WAIT (8 s) outlasts the lock on the Optuna store: the run says that it
    waits for the store while it asks for its trial, and trains it once the lock is gone."""
    _created(tmp_path, fake_cifar, monkeypatch, capsys, "ask-waits", grace=40)
    with locked(tmp_path / "mlruns" / "optuna.db"):
        run = start(tmp_path, fake_cifar, "study", "run", "ask-waits",
                    env={"TUNER_STORE_WAIT": "8"})  # fmt: skip
        wait_for_line(run, r"waiting for the Optuna storage .*locked by another process "
                           r"\(at most 8 s")  # fmt: skip
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert [t.state.name for t in stored(tmp_path, "ask-waits").trials] == ["COMPLETE"]
    no_leftovers(tmp_path, "ask-waits")


# -- 5. the disk under mlruns/ full while the weights are written --------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """`folder` on a tmpfs of `size` (mounting needs root, as CI and this machine have)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/mlruns/artifacts` (the artifact store) on a 2 MB tmpfs of its own."""
    with tmpfs(tmp_path / "mlruns" / "artifacts", "2m") as folder:
        yield folder


def _fill(folder: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on the file system of `folder`."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_fails_the_trial_with_its_cause_and_retries_it(
    tmp_path: Path, fake_cifar: Path, small_disk: Path
) -> None:
    study_file(tmp_path, "full", train={**TINY_STUDY["train"], "epochs": 1})
    assert tuner(tmp_path, fake_cifar, "study", "create", "full").returncode == 0
    filler = _fill(small_disk, leave=0)  # no room for the weights
    out = tuner(tmp_path, fake_cifar, "study", "run", "full", "--trials", "1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "state_dict.pt" in line and "no space left on the device; free space there" in line

    [trial, retry] = stored(tmp_path, "full").trials
    assert trial.state.name == "FAIL" and retry.state.name == "WAITING"
    assert "no space left on the device" in trial.user_attrs["fail_reason"]
    assert retry.user_attrs["retry_of"] == 0
    assert retry.system_attrs["fixed_params"] == trial.params  # (enqueued, not yet drawn)
    assert trial_runs(tmp_path, "full")[0].info.status == "FAILED"
    no_leftovers(tmp_path, "full")

    os.unlink(filler)
    again = tuner(tmp_path, fake_cifar, "study", "run", "full", "--trials", "1")
    assert again.returncode == 0, again.stderr
    assert [t.state.name for t in stored(tmp_path, "full").trials] == ["FAIL", "COMPLETE"]
    no_leftovers(tmp_path, "full")


@pytest.fixture
def full_mlruns(tmp_path: Path) -> Iterator[Path]:
    """All of `tmp_path/mlruns` (both databases and the artifacts) on a 6 MB tmpfs."""
    with tmpfs(tmp_path / "mlruns", "6m") as folder:
        yield folder


def test_a_full_disk_under_every_store_is_one_line_and_nothing_stays_running(
    tmp_path: Path, fake_cifar: Path, full_mlruns: Path
) -> None:
    """Where the disk runs out first (a database page, the weights) varies; what the user
    sees must not: one line, and a study that goes on once there is room."""
    from .test_faults import FAST_LIMITS

    study_file(tmp_path, "full", train={**TINY_STUDY["train"], "epochs": 1}, limits=FAST_LIMITS)
    assert tuner(tmp_path, fake_cifar, "study", "create", "full").returncode == 0
    filler = _fill(full_mlruns, leave=0)
    out = tuner(tmp_path, fake_cifar, "study", "run", "full", "--trials", "1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and "no space left on the device" in line, line

    os.unlink(filler)
    again = tuner(tmp_path, fake_cifar, "study", "run", "full", "--trials", "1")
    assert again.returncode == 0, again.stderr
    states = [t.state.name for t in stored(tmp_path, "full").trials]
    assert states[-1] == "COMPLETE" and "RUNNING" not in states, states
    no_leftovers(tmp_path, "full")
