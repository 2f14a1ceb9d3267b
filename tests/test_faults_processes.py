"""Faults of processes, injected for real: a supervisor killed under its workers, SIGHUP to a
terminal's process group, two runs at once, an ensemble stopped mid-way, and a worker frozen
past its grace period (as on a machine under heavy load)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from tuner import _optuna
from tuner.retries import lost

from . import test_faults
from .conftest import TINY_STUDY
from .helpers import (
    mlflow_runs,
    no_leftovers,
    role,
    running,
    start,
    stored,
    trial_runs,
    tuner,
    wait_for_line,
    wait_until,
    workers_of,
)
from .test_faults import (
    FAST_LIMITS,
    heartbeat_stale,
    started,
    study_file,
)

pytestmark = pytest.mark.slow
finished = test_faults.finished  # a study with 2 finished trials (pytest fixture)
LONG = {**TINY_STUDY["train"], "epochs": 60}  # time enough to be stopped mid-training


# -- 3. a supervisor killed under its workers; SIGHUP to the process group ----------------------


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path, fake_cifar: Path) -> None:
    study_file(tmp_path, "orphans", train=LONG)
    run = start(tmp_path, fake_cifar, "study", "run", "orphans", "--jobs", "2", "--trials", "4")
    wait_for_line(run, r"\[w\d\] \[trial \d\] epoch 2/")
    wait_until(lambda: len(started(tmp_path, "orphans")) >= 2, "both workers in a trial")
    workers = workers_of(run.pid)
    assert len(workers) == 2
    run.kill()
    run.communicate(timeout=60)
    wait_until(lambda: not any(running(pid) for pid in workers), "the workers to exit", 60)

    trials = [t for t in stored(tmp_path, "orphans").trials if t.state.name != "WAITING"]
    assert len(trials) == 2, "no new trial started after the supervisor died"
    assert {(t.state.name, t.user_attrs.get("fail_reason")) for t in trials} == {
        ("FAIL", "terminated")}  # fmt: skip
    assert {r.info.status for r in trial_runs(tmp_path, "orphans").values()} == {"KILLED"}
    # the parent was left RUNNING by the killed supervisor: the next run closes it
    again = tuner(tmp_path, fake_cifar, "study", "run", "orphans", "--trials", "1")
    assert again.returncode == 0, again.stderr
    no_leftovers(tmp_path, "orphans")


def test_sighup_to_the_process_group_ends_the_run_cleanly(
    tmp_path: Path, fake_cifar: Path
) -> None:
    study_file(tmp_path, "hangup", train=LONG)
    run = start(tmp_path, fake_cifar, "study", "run", "hangup", "--jobs", "2", "--trials", "4",
                group=True)  # fmt: skip
    wait_for_line(run, r"\[w\d\] \[trial \d\] epoch 2/")
    wait_until(lambda: len(started(tmp_path, "hangup")) >= 2, "both workers in a trial")
    os.killpg(run.pid, signal.SIGHUP)  # the terminal closed
    out, err = run.communicate(timeout=120)
    assert run.returncode == 129, out + err
    assert "terminated (SIGHUP): any trial that was running is recorded as killed" in err
    assert "Traceback" not in err
    trials = stored(tmp_path, "hangup").trials
    assert {(t.state.name, t.user_attrs.get("fail_reason")) for t in trials} == {
        ("FAIL", "terminated"), ("WAITING", None)}, "stopped, and queued to run first"  # fmt: skip
    assert {r.info.status for r in trial_runs(tmp_path, "hangup").values()} == {"KILLED"}
    no_leftovers(tmp_path, "hangup")


# -- 6. two `study run` commands on one study at once --------------------------------------------


def test_two_runs_at_once_draw_different_points(tmp_path: Path, fake_cifar: Path) -> None:
    study_file(tmp_path, "twice", train={**TINY_STUDY["train"], "epochs": 1},
               space=TINY_STUDY["space"])  # fmt: skip
    assert tuner(tmp_path, fake_cifar, "study", "create", "twice").returncode == 0
    runs = [start(tmp_path, fake_cifar, "study", "run", "twice", "--trials", "2") for _ in "ab"]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, out + err
    trials = stored(tmp_path, "twice").trials
    by_session: dict[str, list[str]] = {}
    for t in trials:
        by_session.setdefault(t.user_attrs["session"], []).append(json.dumps(t.params))
    first, second = by_session.values()
    assert not set(first) & set(second), "a point drawn by both runs"
    seeds = [t.user_attrs["sampler_seed"] for t in trials]
    assert len(set(seeds)) == len(seeds), "each trial's seed is its own, and recorded"


# -- 9. `tuner ensemble` stopped mid-way ---------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGKILL, -9, None),
        (signal.SIGTERM, 143, "terminated (SIGTERM): no ensemble was recorded"),
        (signal.SIGINT, 130, "interrupted: no ensemble was recorded"),
    ],
)
def test_an_ensemble_stopped_mid_way_leaves_no_run_running(
    finished: Path, fake_cifar: Path, sig: signal.Signals, code: int, line: str | None
) -> None:
    ensembles = {r.info.run_id for r in mlflow_runs(finished, "done") if role(r) == "ensemble"}
    run = start(finished, fake_cifar, "ensemble", "done", "--top", "2")
    wait_for_line(run, r"; scoring \d+ networks? on")  # its run is made, RUNNING
    run.send_signal(signal.SIGSTOP)  # hold it inside the scoring, then stop it there
    run.send_signal(sig)
    run.send_signal(signal.SIGCONT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == code, out + err
    [new] = [r for r in mlflow_runs(finished, "done")
             if role(r) == "ensemble" and r.info.run_id not in ensembles]  # fmt: skip
    if line is None:
        assert new.info.status == "RUNNING", "SIGKILL leaves it to the next command"
        again = tuner(finished, fake_cifar, "ensemble", "done", "--top", "2")
        assert again.returncode == 0, again.stderr
        assert "was left RUNNING by a process that died: closed as KILLED" in again.stdout
        new = next(r for r in mlflow_runs(finished, "done") if r.info.run_id == new.info.run_id)
        assert "died" in new.data.tags["tuner.fail_reason"]
    else:
        assert line in err and "Traceback" not in err
        assert "a trial that was running" not in err
        assert new.data.tags["tuner.fail_reason"] in ("terminated", "interrupted")
    assert new.info.status == "KILLED"
    no_leftovers(finished, "done")


# -- 13. a worker frozen past its grace period (a machine under heavy load) ---------------------


def _all_stopped(pid: int) -> bool:
    """Every thread of process `pid` is stopped (state T in /proc)."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        except OSError:  # a thread that ended meanwhile
            continue
    return bool(states) and all(state in ("T", "t") for state in states)


def _stop_outside_a_write(process: subprocess.Popen, db: Path) -> None:
    """SIGSTOP `process` at a moment it holds no write lock on `db` (its epoch writer thread
    writes now and then): a process stopped mid-write would hold the lock for good."""
    for _ in range(50):
        process.send_signal(signal.SIGSTOP)
        # the signal is delivered when the kernel gets to it: until every thread is stopped,
        # one may still take the lock after the check below
        wait_until(lambda: _all_stopped(process.pid), "the process to stop", 30)
        try:
            with sqlite3.connect(db, timeout=0) as free:
                free.execute("BEGIN IMMEDIATE")
                free.rollback()
            return
        except sqlite3.OperationalError:  # locked: let it finish its write
            process.send_signal(signal.SIGCONT)
            time.sleep(0.05)  # a write's length, before stopping it again
    raise AssertionError("the process held the store's lock at every try")


def test_a_live_trial_whose_heartbeat_is_late_is_never_failed(
    tmp_path: Path, fake_cifar: Path
) -> None:
    study_file(tmp_path, "late", train={**TINY_STUDY["train"], "epochs": 6}, limits=FAST_LIMITS)
    first = start(tmp_path, fake_cifar, "study", "run", "late", "--trials", "1")
    wait_for_line(first, r"\[trial 0\] epoch 1/")
    _stop_outside_a_write(first, tmp_path / "mlruns" / "mlflow.db")  # starved: no heartbeat
    try:
        wait_until(lambda: heartbeat_stale(tmp_path, FAST_LIMITS["grace"]), "a stale heartbeat")
        second = tuner(tmp_path, fake_cifar, "study", "run", "late", "--trials", "1")
        assert second.returncode == 0, second.stderr
        assert stored(tmp_path, "late").trials[0].state.name == "RUNNING", "spared: it lives"
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert [t.state.name for t in stored(tmp_path, "late").trials] == ["COMPLETE", "COMPLETE"]
    no_leftovers(tmp_path, "late")


def test_a_trial_failed_from_outside_ends_its_attempt_with_one_line(
    tmp_path: Path, fake_cifar: Path
) -> None:
    """As a process on another host would, once the heartbeat is stale: it cannot see that
    the worker lives."""
    study_file(tmp_path, "taken", train={**TINY_STUDY["train"], "epochs": 6}, limits=FAST_LIMITS)
    run = start(tmp_path, fake_cifar, "study", "run", "taken", "--trials", "2")
    wait_for_line(run, r"\[trial 0\] epoch 1/")
    run.send_signal(signal.SIGSTOP)
    try:
        study = stored(tmp_path, "taken")
        victim = study.trials[0]
        assert _optuna.fail_from_outside(study, victim, "fail_reason", "worker died")
        assert lost(study, stored(tmp_path, "taken").trials[0])
    finally:
        run.send_signal(signal.SIGCONT)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert "Traceback" not in err and "Cannot tell" not in out + err
    assert "[trial 0] failed by another process while it ran" in out
    trials = stored(tmp_path, "taken").trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"] == "worker died", "the other process's record"
    assert trials[1].state.name == "COMPLETE" and trials[1].params == trials[0].params
    assert trial_runs(tmp_path, "taken")[0].info.status == "KILLED"
    no_leftovers(tmp_path, "taken")
