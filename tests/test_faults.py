"""Every fault a long study meets, injected for real (real processes, real signals, a real
allocator running out of memory) on tiny models; after each, the stores are checked. The unit
tests of each mechanism live with the module that has it."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch

from .conftest import TINY_STUDY, write_fake_cifar, write_study
from .helpers import (
    Payload,
    in_process,
    mlflow_runs,
    start,
    stored,
    trial_runs,
    tuner,
    wait_for_line,
    wait_until,
    worker_pid,
)

pytestmark = pytest.mark.slow

ONE_POINT = {  # a one-point space: every trial trains the same small network
    "depth": ["vgg11"], "batch_norm": [True], "dropout": {"low": 0.0, "high": 0.0},
    "weight_decay": {"low": 5.0e-4, "high": 5.0e-4}, "augment": ["flip"],
    "optimizer": {"nesterov": {"lr": {"low": 0.05, "high": 0.05}}},
}  # fmt: skip
FAST_LIMITS = {"heartbeat": 1, "grace": 3}  # dead workers are noticed in seconds, not minutes


def study_file(cwd: Path, name: str, **sections: object) -> None:
    base = {"space": ONE_POINT, "pruner": {"type": "none"}, "limits": FAST_LIMITS}
    write_study(cwd, {**base, **sections}, name=name)


def heartbeat_stale(cwd: Path, grace: float) -> bool:
    """Every heartbeat in the Optuna store is older than `grace` seconds (by the database's
    clock, as Optuna judges it)."""
    with sqlite3.connect(cwd / "mlruns" / "optuna.db") as db:
        (fresh,) = db.execute(
            "SELECT COUNT(*) FROM trial_heartbeats WHERE heartbeat >= datetime('now', ?)",
            (f"-{grace + 0.5} seconds",),
        ).fetchone()
    return fresh == 0


def still_usable(cwd: Path, data: Path, name: str, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`tuner study status` and `tuner ensemble` work on what the fault left behind."""
    capsys.readouterr()
    assert in_process(cwd, data, monkeypatch, "study", "status", name) == 0
    assert in_process(cwd, data, monkeypatch, "ensemble", name, "--top", "2") == 0
    assert "gain over the best single trial" in capsys.readouterr().out


# -- a worker killed with SIGKILL -------------------------------------------------------------


def test_sigkill_mid_epoch_is_retried_after_the_grace_period(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    study_file(tmp_path, "kill", train={**TINY_STUDY["train"], "epochs": 20})
    victim = start(tmp_path, fake_cifar, "study", "run", "kill", "--trials", "2")
    wait_for_line(victim, r"\[trial 1\] epoch 2/")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    done = stored(tmp_path, "kill").trials[0]
    assert stored(tmp_path, "kill").trials[1].state.name == "RUNNING", "nobody told Optuna"
    assert trial_runs(tmp_path, "kill")[1].info.status == "RUNNING", "nobody told MLflow"

    wait_until(lambda: heartbeat_stale(tmp_path, FAST_LIMITS["grace"]), "the grace period")
    again = start(tmp_path, fake_cifar, "study", "run", "kill", "--trials", "1")
    lines = wait_for_line(again, r"\[trial \d+\] start: ")
    assert re.search(r"\[trial 2\] start: .*\(retry of trial 1\)", lines[-1]), lines
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, out + err
    assert "trial 1 was retried as trial 2" in out

    trials = stored(tmp_path, "kill").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params, "retried with the same parameters"
    assert trials[2].user_attrs["retry_of"] == 1 and "mlflow_run_id" in trials[2].user_attrs
    assert trials[2].user_attrs["mlflow_run_id"] != trials[1].user_attrs["mlflow_run_id"]
    assert (trials[0].value, trials[0].datetime_complete) == (done.value, done.datetime_complete)
    runs = trial_runs(tmp_path, "kill")
    assert [runs[n].info.status for n in (0, 1, 2)] == ["FINISHED", "KILLED", "FINISHED"]
    assert "worker died" in runs[1].data.tags["tuner.fail_reason"]
    still_usable(tmp_path, fake_cifar, "kill", monkeypatch, capsys)


def test_a_killed_worker_is_replaced_and_its_trial_retried_at_once(
    tmp_path: Path, fake_cifar: Path
) -> None:
    study_file(
        tmp_path,
        "pool",
        train={**TINY_STUDY["train"], "epochs": 12},
        limits={"heartbeat": 10, "grace": 600},
    )  # fmt: skip  (no help from heartbeats)
    run = start(tmp_path, fake_cifar, "study", "run", "pool", "--jobs", "2", "--trials", "3")
    wait_for_line(run, r"\[w\d\] \[trial \d\] epoch 2/")
    running = stored(tmp_path, "pool").get_trials(states=(optuna.trial.TrialState.RUNNING,))
    victim = running[0]
    os.kill(worker_pid(victim), signal.SIGKILL)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert "killed by SIGKILL; the others go on" in out
    assert f"[trial {victim.number}] lost with its worker" in out

    trials = stored(tmp_path, "pool").trials
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == victim.number)
    assert trials[victim.number].state.name == "FAIL"
    assert retry.state.name == "COMPLETE" and retry.params == victim.params
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3, "the budget counts the retry once"
    runs = trial_runs(tmp_path, "pool")
    assert set(runs) == {t.number for t in trials}, "every trial has its run"
    assert runs[victim.number].info.status == "KILLED"
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert len(parents) == 1


# -- SIGTERM and Ctrl-C -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "code", "reason"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
)
def test_sigterm_and_ctrl_c_fail_the_trial_and_exit_promptly(
    tmp_path: Path, fake_cifar: Path, sig: signal.Signals, code: int, reason: str
) -> None:
    study_file(tmp_path, "stop", train={**TINY_STUDY["train"], "epochs": 40})
    run = start(tmp_path, fake_cifar, "study", "run", "stop", "--trials", "1")
    wait_for_line(run, r"\[trial 0\] epoch 2/")
    run.send_signal(sig)
    out, err = run.communicate(timeout=60)  # the bound: the trial has 38 epochs to go
    assert run.returncode == code
    assert f"{'terminated (SIGTERM)' if code == 143 else 'interrupted'}: any trial" in err
    assert "Traceback" not in err
    trial = stored(tmp_path, "stop").trials[0]
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == reason
    assert len(trial.intermediate_values) < 40, "stopped mid-training, not at the end"
    run0 = trial_runs(tmp_path, "stop")[0]
    assert run0.info.status == "KILLED" and run0.data.tags["tuner.fail_reason"] == reason
    assert not list((tmp_path / "mlruns").rglob("*.partial-*")), "no half-written file"
    if sig == signal.SIGINT:
        return  # continuing works the same after either
    again = tuner(tmp_path, fake_cifar, "study", "run", "stop", "--trials", "1")
    assert again.returncode == 0, again.stderr
    assert [t.state.name for t in stored(tmp_path, "stop").trials] == ["FAIL", "COMPLETE"]


def test_sigterm_stops_every_worker_of_a_pool(tmp_path: Path, fake_cifar: Path) -> None:
    study_file(tmp_path, "pool", train={**TINY_STUDY["train"], "epochs": 60})
    run = start(tmp_path, fake_cifar, "study", "run", "pool", "--jobs", "2", "--trials", "4")
    wait_for_line(run, r"\[w\d\] \[trial \d\] epoch 3/")
    wait_until(lambda: len(started(tmp_path, "pool")) >= 2, "both workers in a trial")
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)  # the bound: 60 epochs each to go
    assert run.returncode == 143, out + err
    trials = stored(tmp_path, "pool").trials
    stopped = [t for t in trials if t.state.name != "WAITING"]
    assert [(t.state.name, t.user_attrs.get("fail_reason")) for t in stopped] == [
        ("FAIL", "terminated"), ("FAIL", "terminated")]  # fmt: skip
    queued = sorted(t.user_attrs["retry_of"] for t in trials if t.state.name == "WAITING")
    assert queued == [t.number for t in stopped], "each point queued again, to run first"
    assert all(len(t.intermediate_values) < 60 for t in stopped), "stopped mid-training"
    assert {r.info.status for r in trial_runs(tmp_path, "pool").values()} == {"KILLED"}


def started(cwd: Path, name: str) -> list:
    """The study's trials that a worker started (an MLflow run of their own)."""
    return [t for t in stored(cwd, name).trials if "mlflow_run_id" in t.user_attrs]


# -- NaN ----------------------------------------------------------------------------------------


def test_divergence_ends_the_trial_and_tells_the_sampler(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    space = {**ONE_POINT, "batch_norm": [False],
             "optimizer": {"sgd": {"lr": {"low": 1000.0, "high": 1000.0}}}}  # fmt: skip
    study_file(tmp_path, "boom", space=space, trials=2, train={**TINY_STUDY["train"], "epochs": 5})
    code = in_process(tmp_path, fake_cifar, monkeypatch, "study", "run", "boom")
    assert code == 1, "no trial finished, so the command fails"
    out, err = capsys.readouterr()
    assert "ran 2 diverged (trial 0; trial 1)" in out and "each failed or diverged" in err
    trials = stored(tmp_path, "boom").trials
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"], "both ran: no crash"
    assert all(t.user_attrs["fail_reason"] == "diverged" for t in trials)
    assert all(t.constraints == {"diverged": 1.0} for t in trials), "the sampler is told"
    assert all(not t.intermediate_values or len(t.intermediate_values) < 5 for t in trials)
    runs = trial_runs(tmp_path, "boom")
    assert {r.info.status for r in runs.values()} == {"FAILED"}
    assert {r.data.tags["tuner.state"] for r in runs.values()} == {"diverged"}
    assert in_process(tmp_path, fake_cifar, monkeypatch, "study", "status", "boom") == 0
    assert "diverged: 2" in capsys.readouterr().out


# -- out of memory ----------------------------------------------------------------------------

LIMITED = """
import re, resource, sys
import torch, tuner.study.session, tuner.objective, tuner.tracking  # map the libraries first
torch.set_num_threads(1)
status = open("/proc/self/status").read()
base = int(re.search(r"VmSize:\\s+(\\d+)", status).group(1)) << 10
resource.setrlimit(resource.RLIMIT_AS, (base + (int(sys.argv[1]) << 20), resource.RLIM_INFINITY))
from tuner.cli import main
main(sys.argv[2:])
"""


def test_out_of_memory_frees_memory_and_retries_at_half_the_batch(tmp_path: Path) -> None:
    """A real allocation failure: the process's address space is capped so that one batch of
    2048 does not fit and two accumulated batches of 1024 do (calibrated on 2 cores, 24 GiB,
    with the worker's writer threads, whose stacks and malloc arenas count too)."""
    data = write_fake_cifar(tmp_path / "data", per_batch=1100)
    train = {"epochs": 1, "batch_size": 2048, "width": 0.5}
    study_file(tmp_path, "oom", train=train, trials=1, data={"val_size": 60, "train_size": 2048})
    run = start(tmp_path, data, "1900", "study", "run", "oom",
                python=[sys.executable, "-c", LIMITED])  # fmt: skip
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert "out of memory: queued a retry at batch 1024 × 2 accumulation steps" in out
    trials = stored(tmp_path, "oom").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].user_attrs["fail_reason"] == "out_of_memory"
    assert trials[1].user_attrs["grad_accumulation"] == 2
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params
    runs = trial_runs(tmp_path, "oom")
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["tuner.fail_reason"] == "out_of_memory"
    assert runs[1].data.params["grad_accumulation"] == "2"


# -- a trial that hangs -----------------------------------------------------------------------


def test_a_trial_past_its_time_limit_fails_with_reason_timeout(
    tmp_path: Path, fake_cifar: Path
) -> None:
    limits = {**FAST_LIMITS, "trial_timeout": 2.0}
    study_file(tmp_path, "slow", train={**TINY_STUDY["train"], "epochs": 10_000}, limits=limits)
    # 10,000 epochs a trial: hours by the estimate, which the time limit cuts to seconds
    out = tuner(tmp_path, fake_cifar, "study", "run", "slow", "--trials", "2", "--max-hours", "99")
    assert out.returncode == 1
    assert "2 failed (trial 0: timeout; trial 1: timeout)" in out.stdout, "it goes on after one"
    trials = stored(tmp_path, "slow").trials
    assert [t.user_attrs["fail_reason"] for t in trials] == ["timeout", "timeout"]
    assert all((t.datetime_complete - t.datetime_start).total_seconds() >= 2 for t in trials)
    assert all(len(t.intermediate_values) < 10_000 for t in trials), "cut short"
    assert {r.info.status for r in trial_runs(tmp_path, "slow").values()} == {"FAILED"}


# -- eight workers on fresh stores ------------------------------------------------------------


def test_eight_workers_started_together_on_fresh_stores(tmp_path: Path, fake_cifar: Path) -> None:
    study_file(tmp_path, "crowd", train={**TINY_STUDY["train"], "epochs": 1})
    workers = [start(tmp_path, fake_cifar, "study", "run", "crowd", "--trials", "1")
               for _ in range(8)]  # fmt: skip
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, out + err
        assert "Traceback" not in err
    trials = stored(tmp_path, "crowd").trials
    assert sorted(t.number for t in trials) == list(range(8)), "none lost, none twice"
    assert all(t.state.name == "COMPLETE" for t in trials)
    runs = trial_runs(tmp_path, "crowd")
    assert set(runs) == set(range(8))
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs.values()}) == 1
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(mlflow.search_experiments(filter_string="name = 'crowd'")) == 1


# -- damaged weights --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, fake_cifar: Path) -> Path:
    cwd = tmp_path_factory.mktemp("finished")
    study_file(cwd, "done", trials=2)
    out = tuner(cwd, fake_cifar, "study", "run", "done")
    assert out.returncode == 0, out.stderr
    return cwd


def _weights(cwd: Path) -> Path:
    [path] = [p for p in (cwd / "mlruns").rglob("state_dict.pt")
              if trial_runs(cwd, "done")[0].info.run_id in str(p)]  # fmt: skip
    return path


@pytest.mark.parametrize("damage", ["truncated", "pickle_that_runs_code", "other_weights"])
def test_damaged_weights_are_named_and_never_unpickled(
    finished: Path, fake_cifar: Path, tmp_path: Path, damage: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import pickle

    path = _weights(finished)
    original = path.read_bytes()
    marker = tmp_path / "owned"
    try:
        if damage == "truncated":
            path.write_bytes(original[: len(original) // 2])
        elif damage == "pickle_that_runs_code":
            path.write_bytes(pickle.dumps(Payload(marker)))
        else:  # a valid state_dict, but not the one that was saved
            state = torch.load(path, weights_only=True)
            torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, path)
        code = in_process(finished, fake_cifar, monkeypatch, "ensemble", "done", "--top", "2")
    finally:
        path.write_bytes(original)
    err = capsys.readouterr().err
    assert code == 1
    assert "state_dict.pt" in err and "trial 0" in err and "do not match the checksum" in err
    assert not marker.exists(), "the payload ran"


def test_weights_are_written_whole_and_the_study_stays_usable(
    finished: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert not list((finished / "mlruns").rglob("*.partial-*"))
    still_usable(finished, fake_cifar, "done", monkeypatch, capsys)


def test_a_damaged_architecture_is_named_not_a_traceback(
    finished: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    run_id = trial_runs(finished, "done")[0].info.run_id
    [path] = [p for p in (finished / "mlruns").rglob("architecture.json") if run_id in str(p)]
    original = path.read_bytes()
    try:
        path.write_text('{"depth": "vgg11"}')
        code = in_process(finished, fake_cifar, monkeypatch, "ensemble", "done", "--top", "2")
    finally:
        path.write_bytes(original)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "architecture.json" in last and "trial 0" in last and "checksum" in last, last


# -- damaged or missing predictions -----------------------------------------------------------


def _predictions(cwd: Path, trial: int) -> Path:
    run_id = trial_runs(cwd, "done")[trial].info.run_id
    [path] = [p for p in (cwd / "mlruns").rglob("val_predictions.npz") if run_id in str(p)]
    return path


PREDICTIONS_SHA256 = "tuner.val_predictions_sha256"


@pytest.mark.parametrize(
    ("damage", "recorded", "said"),
    [
        ("wrong width", True, "does not match the checksum recorded when it was written"),
        ("all NaN", True, "does not match the checksum recorded when it was written"),
        ("wrong width", False, "probabilities of shape (60, 5), expected N×10"),
        ("all NaN", False, "600 probabilities are not finite"),
    ],
)
def test_damaged_predictions_are_left_out_with_one_line(
    finished: Path, fake_cifar: Path, damage: str, recorded: bool, said: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A trial's saved validation predictions edited by hand are left out with one line that
    names the trial, whether their checksum was recorded or not (a run of an older tuner):
    the ensemble is made of the trials left, never scored on NaN."""
    import numpy as np

    path, client = _predictions(finished, 0), mlflow.MlflowClient()
    run_id = trial_runs(finished, "done")[0].info.run_id
    digest = client.get_run(run_id).data.tags.get(PREDICTIONS_SHA256)
    original = path.read_bytes()
    try:
        with np.load(path) as saved:
            probs, labels = saved["probs"], saved["labels"]
        probs = probs[:, :5] if damage == "wrong width" else np.full_like(probs, np.nan)
        np.savez_compressed(path, probs=probs, labels=labels)
        if digest and not recorded:
            client.delete_tag(run_id, PREDICTIONS_SHA256)
        code = in_process(finished, fake_cifar, monkeypatch, "ensemble", "done", "--top", "2")
    finally:
        path.write_bytes(original)
        if digest and not recorded:
            client.set_tag(run_id, PREDICTIONS_SHA256, digest)
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, out + err
    [line] = [x for x in (out + err).splitlines() if "trial 0" in x]
    assert line.endswith(f"trial 0: val_predictions.npz is damaged ({said}); left out"), line
    assert "of 1 from 1 completed trial" in out
    runs = mlflow_runs(finished, "done")
    assert all(np.isfinite(v) for r in runs for v in r.data.metrics.values()), "NaN logged"


def test_missing_artifacts_are_named_not_taken_for_no_trials(
    finished: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The artifact folder deleted: the completed trials are there, their files are not."""
    artifacts = finished / "mlruns" / "artifacts"
    aside = finished / "artifacts-aside"
    artifacts.rename(aside)
    try:
        code = in_process(finished, fake_cifar, monkeypatch, "ensemble", "done", "--top", "2")
    finally:
        aside.rename(artifacts)
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: study 'done' has 2 completed trials (0, 1)"), last
    assert f"their artifacts are missing from {artifacts}" in last
    assert "`tuner study run done --trials N`" in last
    assert "no completed trials" not in out + err


# -- unreachable or bad stores ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "url", "expected"),
    [
        ("--storage", "sqlite:////proc/no/optuna.db", "cannot create /proc/no"),
        ("--storage", "nosuchdb://host/db", "names no database tuner can use"),
        ("--storage", "postgresql://tuner@127.0.0.1:9/optuna", "cannot open the Optuna storage"),
        ("--tracking-uri", "http://127.0.0.1:9", "cannot reach the MLflow tracking server"),
        ("--tracking-uri", "sqlite:////proc/no/mlflow.db", "cannot create /proc/no"),
    ],
)
def test_bad_store_urls_exit_2_at_start(
    tmp_path: Path, fake_cifar: Path, flag: str, url: str, expected: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    write_study(tmp_path)
    code = in_process(tmp_path, fake_cifar, monkeypatch, "study", "run", "tiny", flag, url)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    last = err.strip().splitlines()[-1]  # (mlflow, imported by this test, logs at INFO here)
    assert last.startswith("error: ") and url in last and expected in last
    assert "loading CIFAR-10" not in out
    assert not (tmp_path / "mlruns" / "mlflow.db").exists(), "nothing written"


def test_a_locked_store_is_waited_for_not_fatal(tmp_path: Path, fake_cifar: Path) -> None:
    """Another process holds SQLite's write lock for 6 s (longer than the driver's 5 s)."""
    study_file(tmp_path, "locked", trials=1, train={**TINY_STUDY["train"], "epochs": 1})
    assert tuner(tmp_path, fake_cifar, "study", "create", "locked").returncode == 0
    holder = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    run = start(tmp_path, fake_cifar, "study", "run", "locked")
    time.sleep(6)  # the fault itself: a lock held longer than the driver's 5 s, not a wait
    holder.execute("COMMIT")
    holder.close()
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert stored(tmp_path, "locked").trials[0].state.name == "COMPLETE"
