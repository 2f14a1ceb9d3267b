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
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("started a UI"))
    console.show()
    assert ui.serve(resolve(tracking_uri="http://127.0.0.1:5000"), "127.0.0.1", 5000) == 0
    assert "a server already: open http://127.0.0.1:5000" in capsys.readouterr().out


def test_a_taken_port_exits_2_naming_the_port(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from tuner.cli import main

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("started a UI"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            main(["ui", "--port", str(port), "--mlruns", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: port {port} on 127.0.0.1 is taken") and "--port" in err
