"""The whole job through the `tuner` command, as a user runs it, on generated data."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from tuner import ui
from tuner.cli import main

from ..conftest import TINY_STUDY, write_study
from ..helpers import in_process, mlflow_runs, role, start, stored, tuner, wait_for_line


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory, fake_cifar: Path) -> Path:
    """A tiny study created and run through the CLI; the tests below read what it left."""
    cwd = tmp_path_factory.mktemp("user")
    # the pruner waits for 2 completed trials: the refits below have two to retrain
    write_study(cwd, {"pruner": {"type": "median", "n_startup_trials": 2, "warmup_epochs": 0}})
    first = tuner(cwd, fake_cifar, "study", "create", "tiny")
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout and "mlruns/optuna.db" in first.stdout
    again = tuner(cwd, fake_cifar, "study", "create", "tiny")
    assert again.returncode == 0 and "already exists" in again.stdout
    ran = tuner(cwd, fake_cifar, "study", "run", "tiny")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (cwd / "run.log").write_text(ran.stdout)
    return cwd


@pytest.mark.slow
def test_run_prints_progress_per_trial_and_epoch(study_dir: Path) -> None:
    log = (study_dir / "run.log").read_text()
    assert "[trial 0] start: " in log and "[trial 0] epoch 1/2" in log
    best = stored(study_dir, "tiny").best_trial
    assert f"best so far: trial {best.number}, val_acc {best.value:.4f}" in log
    assert re.search(r"^ran (\d+ \w+(, )?)+ in [\d.]+ s$", log, re.MULTILINE), log


@pytest.mark.slow
def test_optuna_holds_every_trial(study_dir: Path) -> None:
    study = stored(study_dir, "tiny")
    assert len(study.trials) == 4
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED", "FAIL"}
    assert any(t.state.name == "COMPLETE" for t in study.trials)
    optuna_cli = str(Path(sys.executable).parent / "optuna")
    listed = subprocess.run(
        [optuna_cli, "trials", "--study-name", "tiny", "--storage", "sqlite:///mlruns/optuna.db",
         "-f", "json"], cwd=study_dir, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert len(json.loads(listed.stdout)) == 4


@pytest.mark.slow
def test_one_nested_mlflow_run_per_trial(study_dir: Path) -> None:
    all_runs = mlflow_runs(study_dir, "tiny")
    parents = [r for r in all_runs if role(r) == "study"]
    assert len(parents) == 1
    parent = parents[0]
    trials = [r for r in all_runs if role(r) == "trial"]
    assert len(trials) == 4
    study = stored(study_dir, "tiny")
    states = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    client = mlflow.MlflowClient()
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        trial = study.trials[int(run.data.tags["optuna.trial_number"])]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["tuner.state"] == states[trial.state.name]
        assert {"depth", "batch_norm", "dropout", "optimizer", "lr", "weight_decay", "augment",
                "train.epochs", "optuna_trial_number"} <= set(run.data.params)  # fmt: skip
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == list(range(1, len(trial.intermediate_values) + 1))
        for metric in ("train_loss", "val_loss", "lr_schedule", "epoch_seconds"):
            assert metric in run.data.metrics
        if trial.state.name == "COMPLETE":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["final_val_acc"] == pytest.approx(trial.value)
            files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
            assert "model/state_dict.pt" in files
            weights = client.download_artifacts(run.info.run_id, "model/state_dict.pt")
            state = torch.load(weights, weights_only=True)
            assert all(isinstance(v, torch.Tensor) for v in state.values())
            assert client.list_artifacts(run.info.run_id, "predictions")
        if trial.state.name == "PRUNED":
            assert run.data.tags["tuner.pruned_at_epoch"] == str(len(trial.intermediate_values))


@pytest.mark.slow
def test_parent_run_carries_the_best_value_and_plots(study_dir: Path) -> None:
    parent = next(r for r in mlflow_runs(study_dir, "tiny") if role(r) == "study")
    study = stored(study_dir, "tiny")
    assert parent.data.metrics["best_val_acc"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_status_shows_states_and_the_best_trial(study_dir: Path, fake_cifar: Path) -> None:
    out = tuner(study_dir, fake_cifar, "study", "status", "tiny")
    assert out.returncode == 0, out.stderr
    shown = dict(re.findall(r"(\w+): (\d+)", out.stdout.splitlines()[1]))
    trials = stored(study_dir, "tiny").trials
    for state, word in (("COMPLETE", "complete"), ("PRUNED", "pruned"), ("FAIL", "failed")):
        assert int(shown[word]) == sum(t.state.name == state for t in trials), out.stdout
    best = stored(study_dir, "tiny").best_trial
    assert f"best: trial {best.number}, val_acc {best.value:.4f}" in out.stdout
    complete = sum(t.state.name == "COMPLETE" for t in trials)
    assert f"\ntop {min(5, complete)}:\n" in out.stdout
    [dropout] = re.findall(r"^  dropout +(\S+)$", out.stdout, re.MULTILINE)
    assert dropout == f"{float(dropout):.3g}", "rounded to 3 significant digits"

    scripted = tuner(study_dir, fake_cifar, "study", "status", "tiny", "--json", "--top", "2")
    assert scripted.returncode == 0, scripted.stderr
    data = json.loads(scripted.stdout)
    assert data["counts"]["complete"] == complete and data["study"] == "tiny"
    assert data["best"]["number"] == best.number and data["best"]["val_acc"] == best.value
    assert data["best"]["params"]["dropout"] == best.params["dropout"], "unrounded"
    assert [t["number"] for t in data["top"]][:1] == [best.number] and len(data["top"]) <= 2


@pytest.mark.slow
def test_ensemble_scores_the_top_trials_and_logs_a_run(study_dir: Path, fake_cifar: Path) -> None:
    out = tuner(study_dir, fake_cifar, "ensemble", "tiny", "--top", "3", "--method", "average")
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"average ensemble of \d+ from \d+ completed trials?", out.stdout)
    for line in ("best single (trial", "gain over the best single trial"):
        assert line in out.stdout
    study = stored(study_dir, "tiny")
    complete = sorted((t for t in study.trials if t.state.name == "COMPLETE"),
                      key=lambda t: -t.value)[:3]  # fmt: skip
    all_runs = mlflow_runs(study_dir, "tiny")
    ensembles = [r for r in all_runs if role(r) == "ensemble"]
    [run] = [r for r in ensembles if r.info.run_name == "ensemble-average-top3"]
    parent = next(r for r in all_runs if role(r) == "study")
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["tuner.members"].split(",") == [
        t.user_attrs["mlflow_run_id"] for t in complete
    ]
    assert 0 <= run.data.metrics["test_acc"] <= 1 and run.data.metrics["test_log_loss"] > 0
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "members.txt"} <= files


@pytest.mark.slow
def test_refits_and_their_greedy_ensemble_with_flip(study_dir: Path, fake_cifar: Path) -> None:
    """`tuner refit`, then `tuner ensemble --from refit --tta flip` (greedy by default), as
    the README's main job runs them; the search is left as it was."""
    before = [(t.number, t.state, t.value) for t in stored(study_dir, "tiny").trials]
    out = tuner(study_dir, fake_cifar, "refit", "tiny", "--top", "2", "--epochs", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "refits of trials" in out.stdout and "ran 2 complete" in out.stdout
    assert "see: tuner ensemble tiny --from refit --top 2" in out.stdout
    refits = [r for r in mlflow_runs(study_dir, "tiny") if role(r) == "refit"]
    assert len(refits) == 2 and all(r.info.status == "FINISHED" for r in refits)
    ens = tuner(study_dir, fake_cifar, "ensemble", "tiny", "--from", "refit", "--top", "2",
                "--tta", "flip")  # fmt: skip
    assert ens.returncode == 0, ens.stdout + ens.stderr
    assert "greedy ensemble of" in ens.stdout and "ensemble + flip" in ens.stdout
    run = next(r for r in mlflow_runs(study_dir, "tiny") if role(r) == "ensemble"
               and r.info.run_name == "ensemble-greedy-top2-refit-flip")  # fmt: skip
    assert set(run.data.tags["tuner.members"].split(",")) <= {r.info.run_id for r in refits}
    assert run.data.params["source"] == "refit" and "test_acc_flip" in run.data.metrics
    page = (study_dir / "reports" / "tiny.html").read_text()
    assert "ensemble-greedy-top2-refit-flip" in page, "the report is made again after it"
    assert "None yet: <code>tuner ensemble" not in page
    assert [(t.number, t.state, t.value) for t in stored(study_dir, "tiny").trials] == before


@pytest.mark.slow
def test_running_again_continues_the_study(study_dir: Path, fake_cifar: Path) -> None:
    out = tuner(study_dir, fake_cifar, "study", "run", "tiny", "--trials", "1")
    assert out.returncode == 0, out.stderr
    study = stored(study_dir, "tiny")
    assert len(study.trials) == 5
    assert len([r for r in mlflow_runs(study_dir, "tiny") if role(r) == "trial"]) == 5


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_ui_binds_loopback_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    started = []

    class Server:  # what `serve` asks of the server's process
        pid = 2**30  # above any pid: stopping its group finds none

        def __init__(self, command, start_new_session, **options):
            started.append(command)
            assert start_new_session, "a session of its own: Ctrl-C stops it with its workers"

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Server)
    monkeypatch.setattr(ui, "answers", lambda base: True)
    import socket

    with socket.socket() as probe:  # a port free now (5000 may be taken on a CI machine)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["ui", "--port", str(port)] + ([] if host == "127.0.0.1" else ["--host", host])
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    command = started[0]
    assert command[command.index("--host") + 1] == host
    assert command[command.index("--backend-store-uri") + 1].endswith("mlruns/mlflow.db")
    out = capsys.readouterr().out
    assert f"http://{host}:{port}" in out
    assert ("no authentication" in out) == (host != "127.0.0.1")


def test_gpus_and_jobs_together_is_a_usage_error(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    write_study(tmp_path)
    code = in_process(tmp_path, fake_cifar, monkeypatch, "study", "run", "tiny", "--gpus", "0",
                      "--jobs", "2")  # fmt: skip
    assert code == 2 and "with --gpus use --jobs-per-gpu" in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists(), "nothing written"


def test_gpus_on_a_machine_without_them_is_a_config_error(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    write_study(tmp_path)
    code = in_process(tmp_path, fake_cifar, monkeypatch, "study", "run", "tiny", "--gpus", "all")
    assert code == 2 and "--gpus all: torch sees 0 CUDA GPU(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_ensemble_of_a_study_with_no_completed_trials_explains(
    tmp_path: Path, fake_cifar: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    write_study(tmp_path)
    assert in_process(tmp_path, fake_cifar, monkeypatch, "study", "create", "tiny") == 0
    assert in_process(tmp_path, fake_cifar, monkeypatch, "ensemble", "tiny") == 1
    err = capsys.readouterr().err
    assert "no completed trials to ensemble; run `tuner study run tiny` first" in err


@pytest.mark.slow
def test_timeout_starts_no_trial_after_it(tmp_path: Path, fake_cifar: Path) -> None:
    write_study(tmp_path, {"trials": 1000, "train": {**TINY_STUDY["train"], "epochs": 1}})
    out = tuner(tmp_path, fake_cifar, "study", "run", "tiny", "--timeout", "4")
    assert out.returncode == 0, out.stderr
    assert "starting none after 4 s" in out.stdout
    trials = stored(tmp_path, "tiny").trials
    assert 0 < len(trials) < 1000, "stopped by the clock, not the budget"
    first = min(t.datetime_start for t in trials)
    assert all((t.datetime_start - first).total_seconds() <= 4 for t in trials), "none after"
    ahead = [t for t in trials if t.state.name == "WAITING"]
    assert len(ahead) <= 1, "at most the one asked for ahead, not started"
    if ahead:
        assert "mlflow_run_id" not in ahead[0].user_attrs and ahead[0].params
        assert f"trial {ahead[0].number} (asked for ahead) did not start: queued" in out.stdout
    rest = [t for t in trials if t.state.name != "WAITING"]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in rest), "a running one finishes"


@pytest.mark.slow
def test_a_changed_study_file_is_pointed_out(tmp_path: Path, fake_cifar: Path) -> None:
    write_study(tmp_path, {"train": {**TINY_STUDY["train"], "epochs": 1}})
    assert tuner(tmp_path, fake_cifar, "study", "create", "tiny").returncode == 0
    unchanged = tuner(tmp_path, fake_cifar, "study", "run", "tiny", "--trials", "1")
    assert unchanged.returncode == 0 and "study file changed" not in unchanged.stdout
    # the search's steering may change (a new space or new fixed settings may not: see
    # test_faults_setup); the change is shown
    write_study(tmp_path, {"train": {**TINY_STUDY["train"], "epochs": 1}, "trials": 7})
    changed = tuner(tmp_path, fake_cifar, "study", "run", "tiny", "--trials", "1")
    assert changed.returncode == 0, changed.stderr
    assert "studies/tiny.yaml changed since the study was created:\n  trials: 4 → 7" in (
        changed.stdout
    )


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
                              "limits: grace must exceed twice heartbeat"),
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


@pytest.mark.slow
def test_quickstart_on_a_cpu_runs_the_smoke_study_to_its_report_and_says_why(
    tmp_path: Path,
) -> None:
    """The README's main command on a machine with no GPU: it measures vgg-cifar, finds it
    days long, and runs vgg-cifar-smoke through refits, an ensemble and the report."""
    import shutil

    from ..conftest import write_fake_cifar

    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "studies", tmp_path / "studies")
    data = write_fake_cifar(tmp_path / "data", 1300, 2, 1000)  # the smoke study's sizes
    out = tuner(tmp_path, data, "quickstart", "--device", "cpu")
    assert out.returncode == 0, out.stdout + out.stderr
    why = r"quickstart: vgg-cifar-smoke — no GPU here, and vgg-cifar would take (at least|about) "
    assert re.search(why + r".* on this CPU \(measured\)", out.stdout), out.stdout
    assert "estimate on cpu: 8 trials × " in out.stdout
    assert "greedy ensemble of" in out.stdout and "ensemble + flip" in out.stdout
    assert "quickstart done in" in out.stdout
    assert (tmp_path / "reports" / "vgg-cifar-smoke.html").is_file()
    elsewhere = tuner(tmp_path / "data", data, "quickstart", "--device", "cpu")
    assert elsewhere.returncode == 1 and "run it from the folder of tuner's repository" in (
        elsewhere.stderr
    )


@pytest.mark.slow
def test_status_watch_stopped_by_a_signal_exits_with_its_code(
    tmp_path: Path, fake_cifar: Path
) -> None:
    """`study status --watch` ends as every command ends on a signal: one line, the code
    (three watchers of one study, one signal each)."""
    write_study(tmp_path)
    assert tuner(tmp_path, fake_cifar, "study", "create", "tiny").returncode == 0
    stops = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)"),
             (signal.SIGHUP, 129, "terminated (SIGHUP)")]  # fmt: skip
    watching = [start(tmp_path, fake_cifar, "study", "status", "tiny", "--watch", "0.5")
                for _ in stops]  # fmt: skip
    for watcher, (sig, code, what) in zip(watching, stops, strict=True):
        wait_for_line(watcher, "again every 0.5 s")
        watcher.send_signal(sig)
        out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == code, out + err
        assert err.strip() == f"{what}: nothing was changed; the study goes on as it was"
        assert "Traceback" not in out + err
