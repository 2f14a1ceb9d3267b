"""The trial path under real faults: workers SIGKILLed holding the budget's claim and at random
while trials finish, a store locked by another process at a trial's last epoch and past the
grace period on two nodes, a dead worker's pid reused by another process, a trial failed by
another node while its worker finishes it, a store locked while a point is drawn. After each:
nothing RUNNING, both stores agree, every point trained or queued once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest

from tuner import _optuna
from tuner.retries import lost
from tuner.space import suggest
from tuner.spec import parse
from tuner.study.setup import create, open_study

from .conftest import TINY_STUDY
from .helpers import (
    no_leftovers,
    running,
    start,
    stored,
    trial_runs,
    tuner,
    wait_for_line,
    wait_until,
    worker_pid,
    workers_of,
)
from .test_faults import FAST_LIMITS, heartbeat_stale, study_file
from .test_faults_stores import locked

pytestmark = pytest.mark.slow

# Optuna's state → the MLflow statuses a trial run may end with
AGREE = {"COMPLETE": {"FINISHED"}, "PRUNED": {"FINISHED", "FAILED"}, "FAIL": {"FAILED", "KILLED"}}


def consistent(cwd: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    """Nothing RUNNING; each trial's run ended as its Optuna state says; each lost trial (its
    worker died, or another process failed it) queued again once, with its point."""
    no_leftovers(cwd, name)
    trials = stored(cwd, name).trials
    runs = trial_runs(cwd, name)
    for t in trials:
        if t.number in runs:
            assert runs[t.number].info.status in AGREE[t.state.name], (t.number, t.state)
    retries: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        if "retry_of" in t.user_attrs:
            retries.setdefault(t.user_attrs["retry_of"], []).append(t)
    for t in trials:
        reason = t.user_attrs.get("fail_reason", "")
        # a point that died with its worker while training twice is left failed (MAX_LOST)
        twice = t.user_attrs.get("lost_attempts", 0) + ("mlflow_run_id" in t.user_attrs) > 1
        if ("worker" in reason or "died" in reason) and not twice:
            [retry] = retries.get(t.number, [None])
            assert retry is not None, f"trial {t.number} was lost and not queued again"
            # what was queued: the lost trial's point as far as it was drawn (nothing, for one
            # killed before its draw: its retry draws afresh)
            queued = retry.system_attrs.get("fixed_params", {})
            assert queued == {**t.system_attrs.get("fixed_params", {}), **t.params}
    assert all(len(r) == 1 for r in retries.values()), "a point queued twice"
    return trials


def _claim_holder(since: float, parent: int) -> int | None:
    """The pid holding a flock on a budget claim file made after `since`, if any, among the
    workers of `parent` (another run on the machine has claims of its own)."""
    claims = [p for p in Path(tempfile.gettempdir()).glob("tuner-*.claim")
              if p.stat().st_mtime >= since]  # fmt: skip
    inodes = {os.stat(p).st_ino for p in claims}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) in inodes:
            if int(fields[4]) in workers_of(parent):
                return int(fields[4])
    return None


def test_a_worker_killed_while_it_holds_the_claim_stops_no_one(
    tmp_path: Path, fake_cifar: Path
) -> None:
    """As the OOM killer does, at the worst moment: while the worker turns budget into a trial
    (under the claim). The kernel lets go of the lock; the others and the replacement go on."""
    study_file(tmp_path, "claim", train={**TINY_STUDY["train"], "epochs": 1})
    began = time.time() - 1
    run = start(tmp_path, fake_cifar, "study", "run", "claim", "--jobs", "2", "--trials", "6")
    deadline = time.monotonic() + 120
    holder = None
    while holder is None and time.monotonic() < deadline and run.poll() is None:
        holder = _claim_holder(began, run.pid)
        time.sleep(0.0005)
    assert holder is not None, "no worker was ever seen holding the claim"
    os.kill(holder, signal.SIGKILL)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert "killed by SIGKILL; the others go on" in out
    trials = consistent(tmp_path, "claim")
    session = trials[-1].user_attrs.get("session") or trials[0].user_attrs["session"]
    done = [t for t in trials if t.user_attrs.get("session") == session]
    assert sum(t.state.name == "COMPLETE" for t in done) == 6, out


def test_workers_killed_at_random_are_replaced_while_trials_finish(
    tmp_path: Path, fake_cifar: Path
) -> None:
    """Up to 5 kills, each after a trial finished since the one before: the study goes on to its
    budget (a crash loop would be deaths with nothing finishing in between)."""
    study_file(tmp_path, "kills", train={**TINY_STUDY["train"], "epochs": 3})
    run = start(tmp_path, fake_cifar, "study", "run", "kills", "--jobs", "2", "--trials", "14")
    rng = random.Random(0)

    def finished() -> int:
        try:
            return sum(t.state.is_finished() for t in stored(tmp_path, "kills").trials)
        except Exception:  # not created yet
            return 0

    kills = 0
    for _ in range(5):
        seen = finished()
        wait_until(lambda seen=seen: finished() > seen or run.poll() is not None,
                   "a trial finishing", 300)  # fmt: skip
        if run.poll() is not None or not workers_of(run.pid):
            break
        time.sleep(rng.uniform(0, 0.5))
        # looked up after the pause: a worker seen before it may have ended on its own since
        alive = [p for p in workers_of(run.pid) if running(p)]
        if not alive:
            continue
        try:
            os.kill(rng.choice(alive), signal.SIGKILL)
        except ProcessLookupError:  # it ended between the look and the kill: not our kill
            continue
        kills += 1
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, out + err
    assert kills >= 3 and out.count("killed by SIGKILL; the others go on") == kills, out
    trials = consistent(tmp_path, "kills")
    session = next(t.user_attrs["session"] for t in trials if "session" in t.user_attrs)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert all(t.user_attrs["session"] == session for t in complete)
    # the budget: 14 ended and not queued again; each complete, or a point whose worker was
    # killed under it twice while training (left failed: it would only kill a third)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    counted = [t for t in trials if t.state.is_finished() and t.number not in retried]
    assert len(counted) == 14, out
    assert all(t.state.name == "COMPLETE" or t.user_attrs.get("lost_attempts") for t in counted)


def test_a_store_locked_at_the_last_epochs_never_turns_a_trial_into_a_timeout(
    tmp_path: Path, fake_cifar: Path
) -> None:
    """The Optuna store is locked for about 18 s (the driver's 10 s, then 8 s more: less than
    the store wait, 40 s with the default heartbeat and grace) from a trial's second epoch;
    its limit is 12 s of training: the trial trains a few seconds in all (four tiny epochs,
    also on a loaded machine), waits for the store, and completes."""
    study_file(tmp_path, "slow-store", train={**TINY_STUDY["train"], "epochs": 4},
               limits={"trial_timeout": 12}, pruner=TINY_STUDY["pruner"])  # fmt: skip
    run = start(tmp_path, fake_cifar, "study", "run", "slow-store", "--trials", "2")
    wait_for_line(run, r"\[trial 0\] epoch 2/")
    with locked(tmp_path / "mlruns" / "optuna.db"):
        lines = wait_for_line(run, "waiting for the Optuna storage .*locked by another process")
        time.sleep(8)  # the lock held on: the wait, if it counted, would exceed the limit
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    trials = consistent(tmp_path, "slow-store")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], out
    assert "[trial 0] epoch 4/4" in "".join(lines) + out, "trial 0 waited, then trained on"
    assert "timeout" not in out and "hung" not in out


def test_a_store_locked_past_the_grace_period_makes_no_live_trial_look_dead(
    tmp_path: Path, fake_cifar: Path
) -> None:
    """Two nodes; the Optuna store locked for 8 s, longer than the grace period (6 s), with
    TUNER_STORE_WAIT asking for 30 s. A node waits no longer than grace - 2 × heartbeat
    (4 s): its trial is lost to the store error, said so, and queued again; neither node
    takes the other's live trial for dead."""
    limits = {"heartbeat": 1, "grace": 6}
    study_file(tmp_path, "nodes", train={**TINY_STUDY["train"], "epochs": 40}, limits=limits)
    assert tuner(tmp_path, fake_cifar, "study", "create", "nodes").returncode == 0
    env = {"TUNER_STORE_WAIT": "30"}
    nodes = [start(tmp_path, fake_cifar, "study", "run", "nodes", "--trials", "1", env=env)
             for _ in range(2)]  # fmt: skip
    said = "".join("".join(wait_for_line(node, r"\[trial \d\] epoch 1/")) for node in nodes)
    with locked(tmp_path / "mlruns" / "optuna.db"):
        time.sleep(8)
    outputs = [node.communicate(timeout=300) for node in nodes]
    said += "".join(out + err for out, err in outputs)
    assert "not TUNER_STORE_WAIT=30: raise limits.grace" in said
    assert "failed by another process" not in said, "a live trial was taken for dead"
    assert "Traceback" not in said
    # a trial its node could not record (the store was still locked) is failed and queued
    # again by the next run once its heartbeat is stale: its worker is gone by then
    wait_until(lambda: heartbeat_stale(tmp_path, limits["grace"]), "the grace period")
    assert tuner(tmp_path, fake_cifar, "study", "run", "nodes", "--trials", "1").returncode == 0
    trials = consistent(tmp_path, "nodes")
    for t in trials:
        if t.state.name == "FAIL":
            reason = t.user_attrs["fail_reason"]
            assert "locked by another process" in reason or "no heartbeat" in reason, reason


def _spawn_with_pid(pid: int, tries: int = 200) -> subprocess.Popen | None:
    """A process (`sleep`) that gets `pid`, through the kernel's next-pid knob (root)."""
    knob = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(tries):
        try:
            knob.write_text(str(pid - 1))
        except OSError:
            return None
        child = subprocess.Popen(["sleep", "300"])
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    return None


def test_a_dead_workers_pid_reused_by_another_process_is_not_taken_for_it(
    tmp_path: Path, fake_cifar: Path
) -> None:
    study_file(tmp_path, "reused", train={**TINY_STUDY["train"], "epochs": 40})
    victim = start(tmp_path, fake_cifar, "study", "run", "reused", "--trials", "1")
    wait_for_line(victim, r"\[trial 0\] epoch 1/")
    victim.kill()
    victim.communicate()
    [trial] = stored(tmp_path, "reused").trials
    assert trial.state.name == "RUNNING" and worker_pid(trial) == victim.pid
    impostor = _spawn_with_pid(victim.pid)
    if impostor is None:
        pytest.skip("cannot choose the next pid here (/proc/sys/kernel/ns_last_pid, root)")
    try:
        wait_until(lambda: heartbeat_stale(tmp_path, FAST_LIMITS["grace"]), "the grace period")
        again = tuner(tmp_path, fake_cifar, "study", "run", "reused", "--trials", "1")
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        impostor.kill()
        impostor.wait()
    trials = consistent(tmp_path, "reused")
    assert trials[0].state.name == "FAIL", "its pid lives, but not its worker"
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].state.name == "COMPLETE"


def test_a_trial_another_node_fails_while_its_worker_finishes_it_ends_in_one_line(
    tmp_path: Path, fake_cifar: Path
) -> None:
    """The MLflow store is held while the trial's last records go in, and meanwhile another
    node fails the trial and queues its point (as it does for a trial it takes for dead):
    Optuna's state stands, the worker's MLflow run follows it, the worker goes on."""
    study_file(tmp_path, "taken", train={**TINY_STUDY["train"], "epochs": 2},
               limits={"heartbeat": 10, "grace": 60})  # fmt: skip
    run = start(tmp_path, fake_cifar, "study", "run", "taken", "--trials", "2")
    wait_for_line(run, r"\[trial 0\] epoch 1/")
    with locked(tmp_path / "mlruns" / "mlflow.db"):
        wait_for_line(run, r"\[trial 0\] epoch 2/")
        study = stored(tmp_path, "taken")
        victim = study.trials[0]
        assert _optuna.fail_from_outside(study, victim, "fail_reason", "worker died (stale)")
        assert lost(study, stored(tmp_path, "taken").trials[0])
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert "Traceback" not in err and "Cannot tell" not in out + err
    assert "[trial 0] failed by another process" in out
    trials = consistent(tmp_path, "taken")
    assert trials[0].state.name == "FAIL"
    assert trials[0].user_attrs["fail_reason"] == "worker died (stale)", "the other's record"
    assert trial_runs(tmp_path, "taken")[0].info.status == "KILLED"
    assert "final_val_acc" not in trial_runs(tmp_path, "taken")[0].data.metrics
    [retry] = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert retry.state.name == "COMPLETE"


def test_a_store_locked_while_a_point_is_drawn_is_waited_out(stores) -> None:
    """Another connection holds the Optuna store for 11 s (past the driver's own 10 s) while
    `suggest_*` writes the point: it waits, then draws."""
    spec = parse({**TINY_STUDY, "name": "draw-locked"})
    create(spec, stores)
    study = open_study(spec, stores)
    trial = _optuna.ask(study)
    drawn: list[object] = []
    drawing = threading.Thread(target=lambda: drawn.append(suggest(trial, spec.space)))
    with locked(Path(stores.optuna_url.removeprefix("sqlite:///"))):
        drawing.start()
        time.sleep(11)
    drawing.join(60)
    assert len(drawn) == 1, "the draw failed"
    assert _optuna.frozen(trial).params, "its point is stored"
