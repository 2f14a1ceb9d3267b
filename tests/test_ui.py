from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    assert ui.server_env(False)["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert ui.server_env(True)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false", "no huey"


STOP_BOUND = 15  # seconds from the signal to `tuner ui`'s exit: SIGKILL comes after 3


def _stats() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields after its name (state, ppid, pgrp, …)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
    return found


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, theirs, …)."""
    parents = {child: int(fields[1]) for child, fields in _stats().items()}
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _server_group(pid: int) -> int:
    """The process group of the server that `tuner` (`pid`) started: its child that leads a
    group of its own."""
    stats = _stats()
    leaders = [c for c, f in stats.items() if int(f[1]) == pid and int(f[3]) == c]
    assert len(leaders) == 1, f"the server leads a group of its own: {leaders}"
    return leaders[0]


def _left(group: int, below: set[int]) -> list[int]:
    """The processes of `group` (0: none), or of `below`, that still run (zombies do not)."""
    return [
        pid
        for pid, fields in _stats().items()
        if fields[0] not in "ZX" and (pid in below or (group > 0 and int(fields[3]) == group))
    ]


@dataclass
class Serving:
    """A `tuner ui` started by a test: the process, its port, what it printed up to its
    address, and the server's process group and processes seen then."""

    process: subprocess.Popen
    port: int
    printed: str = ""
    group: int = 0
    below: set[int] = field(default_factory=set)


@pytest.fixture
def served() -> Iterator[list[Serving]]:
    """The `tuner ui`s a test starts; whatever of them and their servers still runs at its
    end is killed (a failing test leaves no server behind)."""
    started: list[Serving] = []
    yield started
    for serving in started:
        below = set()
        if serving.process.poll() is None:  # unreaped, its pid names it still
            below = _descendants(serving.process.pid)
            serving.process.kill()
            serving.process.wait()
        for pid in _left(serving.group, below):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _serving(cwd: Path, data: Path, served: list[Serving], *args: str) -> Serving:
    """`tuner ui ARGS --port P` started and read up to its address, which must answer the
    moment it is printed: one try, no retry."""
    from .helpers import start, ui_answers, wait_for_line
    from .servers import free_port

    port = free_port()
    serving = Serving(start(cwd, data, "ui", *args, "--port", str(port)), port)
    served.append(serving)
    lines = wait_for_line(serving.process, r"open http://")
    assert ui_answers(port), f"printed before the server answers:\n{''.join(lines)}"
    serving.printed = "".join(lines)
    serving.group, serving.below = (
        _server_group(serving.process.pid),
        _descendants(serving.process.pid),
    )
    return serving


def _stop(serving: Serving, sig: signal.Signals) -> tuple[str, str, float]:
    """Send `sig` to `tuner` alone (not its group): its output and the seconds it took."""
    sent = time.monotonic()
    os.kill(serving.process.pid, sig)
    out, err = serving.process.communicate(timeout=60)
    return out, err, time.monotonic() - sent


@pytest.mark.slow
def test_ctrl_c_to_tuner_alone_stops_the_server_and_its_workers(
    tmp_path, fake_cifar, served
) -> None:
    """`tuner ui NAME` prints the study's URL once it answers, keeps the server's own lines
    to itself, and a SIGINT to `tuner` alone (not its group) stops the server and every
    process under it within seconds, with one line and exit 130."""
    from .conftest import write_study
    from .helpers import tuner, ui_answers

    write_study(tmp_path)
    assert tuner(tmp_path, fake_cifar, "study", "create", "tiny").returncode == 0
    started = _serving(tmp_path, fake_cifar, served, "tiny")
    assert re.search(rf"open http://127\.0\.0\.1:{started.port}/#/experiments/\d+/runs\?"
                     r"viewStateShareKey=tuner-trials&workflowType=machine_learning",
                     started.printed), started.printed  # fmt: skip
    assert started.below, "the server runs under tuner"
    out, err, took = _stop(started, signal.SIGINT)
    assert started.process.returncode == 130, out + err
    assert took < STOP_BOUND, f"stopped in {took:.1f} s"
    assert not _left(started.group, started.below), "a process of the server outlived tuner"
    assert not ui_answers(started.port)
    assert err.strip() == "interrupted: stopped the MLflow UI and every process it started"
    assert "allowed-hosts" not in out + err and "[MLflow]" not in out + err, "quiet"
    assert "Traceback" not in out + err and "GET /health" not in out + err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["SIGTERM", "SIGHUP"]
)
def test_sigterm_and_sighup_stop_it_with_their_exit_codes(
    tmp_path, fake_cifar, served, sig: signal.Signals, code: int
) -> None:
    started = _serving(tmp_path, fake_cifar, served)
    out, err, took = _stop(started, sig)
    assert started.process.returncode == code, out + err
    assert took < STOP_BOUND, f"stopped in {took:.1f} s"
    assert not _left(started.group, started.below), "a process of the server outlived tuner"
    assert "stopped the MLflow UI" in err


@pytest.mark.slow
def test_the_server_dies_with_a_killed_tuner(tmp_path, fake_cifar, served) -> None:
    """`kill -9` of `tuner ui`: no clean-up of its runs, yet the server stops (Linux)."""
    from .helpers import wait_until

    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel's parent-death signal is Linux's")
    started = _serving(tmp_path, fake_cifar, served)
    started.process.kill()
    started.process.wait()  # not its output: a server that outlives it holds the pipes
    wait_until(lambda: not _left(started.group, started.below), "the server to end", timeout=30)


@pytest.mark.slow
def test_a_server_that_fails_at_start_is_one_error_with_its_last_lines(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.errors import TunerError

    failing = [sys.executable, "-c", "import sys; sys.exit('no such store: boom')"]
    monkeypatch.setattr(ui, "command", lambda *a, **k: failing)
    console.show()
    stores = resolve(mlruns=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(TunerError) as info:
        ui.serve(stores, "127.0.0.1", 5055)
    assert str(info.value).startswith("the MLflow UI server exited (1) before it answered")
    assert str(info.value).endswith("its last lines:\n    no such store: boom")
    assert "open http" not in capsys.readouterr().out, "no address for a server that is not"


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
