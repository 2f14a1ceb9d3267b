"""Every fault a long study meets, injected for real (real processes, real signals, a real
allocator running out of memory) on tiny models; after each, the stores are checked."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml

from tuner.cli import main
from tuner.runner import make_sampler
from tuner.spec import parse

from .conftest import TINY_STUDY, write_fake_cifar, write_study

pytestmark = pytest.mark.slow

ONE_POINT = {  # a one-point space: every trial trains the same small network
    "depth": ["vgg11"], "batch_norm": [True], "dropout": {"low": 0.0, "high": 0.0},
    "weight_decay": {"low": 5.0e-4, "high": 5.0e-4}, "augment": ["flip"],
    "optimizer": {"nesterov": {"lr": {"low": 0.05, "high": 0.05}}},
}  # fmt: skip
FAST_LIMITS = {"heartbeat": 1, "grace": 3}  # dead workers are noticed in seconds, not minutes


def environment(data: Path) -> dict[str, str]:
    hidden = ("MLFLOW_TRACKING_URI", "TUNER_STORAGE", "TUNER_MLRUNS")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["TUNER_DATA_DIR"] = str(data)
    return env


def start(cwd: Path, data: Path, *args: str, python: list[str] | None = None) -> subprocess.Popen:
    command = [*(python or [sys.executable, "-m", "tuner"]), *args]
    return subprocess.Popen(command, cwd=cwd, env=environment(data), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def tuner(cwd: Path, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner", *args], cwd=cwd, env=environment(data),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def in_process(cwd: Path, data: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """`tuner ARGS` in this process (no interpreter start-up): its exit code."""
    monkeypatch.chdir(cwd)
    for key in ("MLFLOW_TRACKING_URI", "TUNER_STORAGE", "TUNER_MLRUNS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TUNER_DATA_DIR", str(data))
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def wait_for_line(process: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    """Read the process's output until a line matches; the lines read so far."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    process.kill()
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(lines)}{process.stderr.read()}")


def stored(cwd: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/mlruns/optuna.db")


def trial_runs(cwd: Path, name: str) -> dict[int, mlflow.entities.Run]:
    """MLflow trial runs by Optuna trial number (each number must appear once)."""
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlruns/mlflow.db")
    found = mlflow.search_runs(experiment_names=[name], output_format="list",
                               filter_string="tags.`tuner.role` = 'trial'")  # fmt: skip
    numbers = [int(r.data.tags["optuna.trial_number"]) for r in found]
    assert len(numbers) == len(set(numbers)), f"a trial has two runs: {sorted(numbers)}"
    return dict(zip(numbers, found, strict=True))


def study_file(cwd: Path, name: str, **sections: object) -> None:
    base = {"space": ONE_POINT, "pruner": {"type": "none"}, "limits": FAST_LIMITS}
    write_study(cwd, {**base, **sections}, name=name)


def still_usable(cwd: Path, data: Path, name: str, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`tuner study status` and `tuner ensemble` work on what the fault left behind."""
    capsys.readouterr()
    assert in_process(cwd, data, monkeypatch, "study", "status", name) == 0
    assert in_process(cwd, data, monkeypatch, "ensemble", name, "--top", "2") == 0
    assert "ensemble test accuracy" in capsys.readouterr().out


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
    killed_at = time.monotonic()
    done = stored(tmp_path, "kill").trials[0]
    assert stored(tmp_path, "kill").trials[1].state.name == "RUNNING", "nobody told Optuna"
    assert trial_runs(tmp_path, "kill")[1].info.status == "RUNNING", "nobody told MLflow"

    time.sleep(FAST_LIMITS["grace"] + 1)
    again = start(tmp_path, fake_cifar, "study", "run", "kill", "--trials", "1")
    wait_for_line(again, r"\[trial 2\] start: .*\(retry of trial 1\)")
    assert time.monotonic() - killed_at < 60
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, out + err
    assert "trial 1 was retried as trial 2" in out

    trials = stored(tmp_path, "kill").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params, "retried with the same parameters"
    assert trials[2].system_attrs["failed_trial"] == 1
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
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert "killed by SIGKILL; the others go on" in out
    assert f"[trial {victim.number}] lost with its worker" in out

    trials = stored(tmp_path, "pool").trials
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
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
    sent = time.monotonic()
    run.send_signal(sig)
    out, err = run.communicate(timeout=60)
    assert run.returncode == code
    assert time.monotonic() - sent < 15
    assert f"{'terminated (SIGTERM)' if code == 143 else 'interrupted'}: a trial" in err
    assert "Traceback" not in err
    trial = stored(tmp_path, "stop").trials[0]
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == reason
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
    while len(stored(tmp_path, "pool").trials) < 2:  # both workers in a trial
        time.sleep(0.2)
    sent = time.monotonic()
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 143, out + err
    assert time.monotonic() - sent < 20, f"workers did not stop on SIGTERM:\n{out}{err}"
    trials = stored(tmp_path, "pool").trials
    assert [(t.state.name, t.user_attrs.get("fail_reason")) for t in trials] == [
        ("FAIL", "terminated"), ("FAIL", "terminated")]  # fmt: skip
    assert {r.info.status for r in trial_runs(tmp_path, "pool").values()} == {"KILLED"}


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


def test_a_signal_during_a_database_write_waits_for_it() -> None:
    """Cut in half, a SQLite write keeps its lock and every clean-up write waits on it (seen:
    a pool that took 80 s to stop on SIGTERM)."""
    out = subprocess.run([sys.executable, "-c", SHIELDED], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.stdout == "the write finished\nthen the signal\n", out.stderr


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
    assert "trial 0 diverged" in out and "each failed or diverged" in err
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


def _diverged_picks(tell_the_sampler: bool) -> int:
    """Of 50 TPE picks after 10 random ones, how many land where learning rates 'diverge'."""
    spec = parse({**TINY_STUDY, "sampler": {"type": "tpe", "n_startup_trials": 10}})
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec, 0))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-3, 1e3, log=True)
        if lr > 1:
            if tell_the_sampler:  # what the objective does for a diverged trial
                trial.set_constraint("diverged", 1.0)
                raise optuna.TrialPruned()
            raise FloatingPointError  # what a plain failed trial does
        return 1 - abs(lr - 0.1)

    study.optimize(objective, n_trials=60, catch=(FloatingPointError,))
    return sum(t.params["lr"] > 1 for t in study.trials[10:])


def test_tpe_steers_away_from_a_diverging_region() -> None:
    """The objective's mechanism (PRUNED + violated constraint) against plain FAIL, which TPE
    ignores, on a cheap objective where half the learning-rate range diverges."""
    told, failed = _diverged_picks(True), _diverged_picks(False)
    assert told <= 12, f"{told} of 50 picks diverged although the sampler was told"
    assert failed >= 2 * told, (told, failed)


# -- out of memory ----------------------------------------------------------------------------

LIMITED = """
import re, resource, sys
import torch, tuner.runner, tuner.objective, tuner.tracking  # map the libraries first
torch.set_num_threads(1)
status = open("/proc/self/status").read()
base = int(re.search(r"VmSize:\\s+(\\d+)", status).group(1)) << 10
resource.setrlimit(resource.RLIMIT_AS, (base + (int(sys.argv[1]) << 20), resource.RLIM_INFINITY))
from tuner.cli import main
main(sys.argv[2:])
"""


def test_out_of_memory_frees_memory_and_retries_at_half_the_batch(tmp_path: Path) -> None:
    """A real allocation failure: the process's address space is capped so that one batch of
    2048 does not fit and two accumulated batches of 1024 do (calibrated on 2 cores, 24 GiB)."""
    data = write_fake_cifar(tmp_path / "data", per_batch=1100)
    train = {"epochs": 1, "batch_size": 2048, "width": 0.5}
    study_file(tmp_path, "oom", train=train, trials=1, data={"val_size": 60, "train_size": 2048})
    run = start(tmp_path, data, "1750", "study", "run", "oom",
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


def test_half_batch_with_accumulation_gives_the_same_gradients() -> None:
    from dataclasses import replace

    from tuner.data import Split, TrainVal
    from tuner.models import build_vgg
    from tuner.train import TrainConfig, train

    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    data = TrainVal(Split(images, torch.arange(64) % 10), Split(images[:8], torch.zeros(8).long()),
                    Path("."))  # fmt: skip
    config = TrainConfig(epochs=1, batch_size=64, optimizer="sgd", lr=0.1, weight_decay=0.0,
                         momentum=0.0, schedule="constant", warmup_fraction=0.0,
                         label_smoothing=0.0, augment="none", crop_padding=4, cutout_size=8,
                         seed=0)  # fmt: skip
    results = []
    for accumulation in (1, 2, 4):
        model = build_vgg("vgg11", batch_norm=False, width=0.125)
        torch.manual_seed(1)
        model.load_state_dict(build_vgg("vgg11", batch_norm=False, width=0.125).state_dict())
        results.append(train(model, data, replace(config, accumulation=accumulation)).state_dict)
    for other in results[1:]:
        for key, value in results[0].items():
            torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-5)


# -- a trial that hangs -----------------------------------------------------------------------


def test_a_trial_past_its_time_limit_fails_with_reason_timeout(
    tmp_path: Path, fake_cifar: Path
) -> None:
    limits = {**FAST_LIMITS, "trial_timeout": 2.0}
    study_file(tmp_path, "slow", train={**TINY_STUDY["train"], "epochs": 10_000}, limits=limits)
    started = time.monotonic()
    out = tuner(tmp_path, fake_cifar, "study", "run", "slow", "--trials", "2")
    assert out.returncode == 1 and "trial 0 failed: timeout" in out.stdout
    assert "trial 1 failed: timeout" in out.stdout, "the study goes on after a timeout"
    assert time.monotonic() - started < 60
    trials = stored(tmp_path, "slow").trials
    assert [t.user_attrs["fail_reason"] for t in trials] == ["timeout", "timeout"]
    assert all(2 <= (t.datetime_complete - t.datetime_start).total_seconds() < 10 for t in trials)
    assert {r.info.status for r in trial_runs(tmp_path, "slow").values()} == {"FAILED"}


HUNG = """
import signal, sys, time
from tuner import interrupts
interrupts.install()
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as if stuck in native code
with interrupts.time_limit(0.5, lambda: print("recorded the hang", flush=True), hang_grace=1):
    time.sleep(30)
print("not reached")
"""


def test_a_trial_stuck_where_signals_cannot_reach_ends_its_worker() -> None:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", HUNG], capture_output=True, text=True, timeout=60)
    assert out.returncode == 124 and out.stdout == "recorded the hang\n"
    assert time.monotonic() - started < 20


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


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


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


def test_weights_written_whole_and_loaded_only_as_tensors(
    finished: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert not list((finished / "mlruns").rglob("*.partial-*"))
    from tuner.ensemble import load_weights
    from tuner.errors import DataError
    from tuner.models import build_vgg

    bad = finished / "evil.pt"
    torch.save({"x": Payload(finished / "owned")}, bad)
    with pytest.raises(DataError, match="evil.pt: cannot load these weights"):
        load_weights(bad, build_vgg("vgg11", batch_norm=True, width=0.0625))
    assert not (finished / "owned").exists()
    still_usable(finished, fake_cifar, "done", monkeypatch, capsys)


# -- bad study files --------------------------------------------------------------------------

BAD_FILES = {  # case: (text in the tiny study, replaced by, what the message must say)
    "unknown key": ("  epochs: 2\n", "  epochs: 2\n  epoch: 3\n", "train.epoch: unknown key"),
    "wrong type": ("  epochs: 2\n", "  epochs: two\n", "train.epochs: Input should be a valid"),
    "1e-3 as text": ("    high: 0.5\n", "    high: 5e-1\n", "write 5.0e-1"),
    "yes/no": ("  - vgg11\n", "  - no\n", "quote the word"),
    "octal": ("seed: 0\n", "seed: 010\n", "octal"),
    "python tag": ("seed: 0\n", "seed: !!python/object/apply:os.system ['touch owned']\n",
                   "!!python tags are refused"),
    "impossible range": ("    low: 0.0\n    high: 0.5\n", "    low: 0.4\n    high: 0.1\n",
                         "space.dropout: low must not exceed high"),
    "grace below heartbeat": ("trials: 4\n", "trials: 4\nlimits: {heartbeat: 30, grace: 10}\n",
                              "limits: grace must exceed heartbeat"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_study_file_exits_2_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:  # fmt: skip
    old, new, expected = BAD_FILES[case]
    text = yaml.safe_dump(TINY_STUDY, sort_keys=False)
    assert old in text
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "bad.yaml").write_text(text.replace(old, new, 1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for command in (["study", "create", "bad"], ["study", "run", "bad"]):
        with pytest.raises(SystemExit) as info:
            main(command)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "studies/bad.yaml" in err and expected in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "mlruns").exists(), "nothing written to the stores"
    assert not (tmp_path / "owned").exists()


# -- unreachable or bad stores ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "url", "expected"),
    [
        ("--storage", "sqlite:////proc/no/optuna.db", "cannot create /proc/no"),
        ("--storage", "nosuchdb://host/db", "cannot open the Optuna storage"),
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
    started = time.monotonic()
    code = in_process(tmp_path, fake_cifar, monkeypatch, "study", "run", "tiny", flag, url)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    last = err.strip().splitlines()[-1]  # (mlflow, imported by this test, logs at INFO here)
    assert last.startswith("error: ") and url in last and expected in last
    assert "loading CIFAR-10" not in out
    assert not (tmp_path / "mlruns" / "mlflow.db").exists(), "nothing written"
    assert time.monotonic() - started < 15


def test_a_locked_store_is_waited_for_not_fatal(tmp_path: Path, fake_cifar: Path) -> None:
    """Another process holds SQLite's write lock for 6 s (longer than the driver's 5 s)."""
    study_file(tmp_path, "locked", trials=1, train={**TINY_STUDY["train"], "epochs": 1})
    assert tuner(tmp_path, fake_cifar, "study", "create", "locked").returncode == 0
    holder = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    run = start(tmp_path, fake_cifar, "study", "run", "locked")
    time.sleep(6)
    holder.execute("COMMIT")
    holder.close()
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert stored(tmp_path, "locked").trials[0].state.name == "COMPLETE"
