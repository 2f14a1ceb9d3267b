from __future__ import annotations

import subprocess

import pytest

from tuner import console, ui
from tuner.stores import resolve


def test_the_ui_serves_the_tracking_store_and_its_artifacts(tmp_path) -> None:
    stores = resolve(mlruns=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    line = ui.command(stores, "127.0.0.1", 5055)
    assert line[line.index("--backend-store-uri") + 1] == stores.tracking_uri
    assert line[line.index("--default-artifact-root") + 1] == stores.artifact_root
    assert line[line.index("--port") + 1] == "5055" and "--workers" in line


def test_a_tracking_server_is_its_own_ui(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("started a UI"))
    console.show()
    assert ui.serve(resolve(tracking_uri="http://127.0.0.1:5000"), "127.0.0.1", 5000) == 0
    out = capsys.readouterr().out
    assert "a server already:\n  open http://127.0.0.1:5000\n" in out


def test_a_taken_port_exits_2_naming_the_port(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from tuner.cli import main

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("started a UI"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            main(["ui", "--port", str(port), "--mlruns", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: port {port} on 127.0.0.1 is taken") and "--port" in err


def test_the_ui_opens_on_the_studys_runs_in_the_model_training_view() -> None:
    assert ui.study_url("http://127.0.0.1:5000", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=tuner-trials"
        "&workflowType=machine_learning"
    )
    assert ui.study_url("http://127.0.0.1:5000", None) == "http://127.0.0.1:5000"


def test_the_server_is_quiet_unless_asked(tmp_path) -> None:
    stores = resolve(mlruns=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    quiet = ui.command(stores, "127.0.0.1", 5055)
    assert quiet[quiet.index("--uvicorn-opts") + 1] == "--log-level warning --no-access-log"
    assert "--uvicorn-opts" not in ui.command(stores, "127.0.0.1", 5055, verbose=True)
    assert ui.quiet_env(False)["MLFLOW_LOGGING_LEVEL"] == "WARNING"


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, theirs, …)."""
    from pathlib import Path

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


@pytest.mark.slow
def test_ctrl_c_to_tuner_alone_stops_the_server_and_its_workers(tmp_path, fake_cifar) -> None:
    """`tuner ui NAME` prints the study's URL, serves it without a line per request, and a
    SIGINT to `tuner` alone (not its group) stops the server and every process under it,
    with one line and exit 0."""
    import os
    import re
    import signal

    from .conftest import write_study
    from .helpers import running, start, tuner, ui_answers, wait_for_line, wait_until
    from .servers import free_port

    write_study(tmp_path)
    assert tuner(tmp_path, fake_cifar, "study", "create", "tiny").returncode == 0
    port = free_port()
    served = start(tmp_path, fake_cifar, "ui", "tiny", "--port", str(port))
    lines = wait_for_line(served, r"open http://")
    assert re.search(rf"open http://127\.0\.0\.1:{port}/#/experiments/\d+/runs\?"
                     r"viewStateShareKey=tuner-trials&workflowType=machine_learning",
                     "\n".join(lines)), lines  # fmt: skip

    wait_until(lambda: ui_answers(port), "the UI to answer")
    below = _descendants(served.pid)
    assert below, "the server runs under tuner"
    os.kill(served.pid, signal.SIGINT)
    out, err = served.communicate(timeout=60)
    assert served.returncode == 0, out + err
    assert "stopped the MLflow UI" in out and "Traceback" not in out + err
    assert "GET /health" not in out + err, "no line per request"
    wait_until(lambda: not any(running(pid) for pid in below), "the server's processes to end")
    assert not ui_answers(port)


def test_the_trials_view_is_stored_on_the_experiment_for_the_url_to_open(stores, tracker) -> None:
    import json

    experiment = tracker.experiment_id("ui-view", create=True)
    where = ui.study_where(stores, "ui-view")
    assert where == ui.Where(experiment, None)  # no parent run yet
    tags = tracker.client.get_experiment(experiment).tags
    view = json.loads(tags["mlflow.sharedViewState.tuner-trials"])
    assert view["orderByKey"] == "metrics.`objective`" and view["orderByAsc"] is False
    assert view["searchFilter"] == "tags.`tuner.role` = 'trial'"
    assert view["selectedColumns"][:3] == [
        "metrics.`objective`", "metrics.`best_val_acc`", "metrics.`epochs_trained`"
    ]  # fmt: skip
    assert "viewStateShareKey=tuner-trials" in ui.where_lines("http://h:1", where)
