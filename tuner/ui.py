"""`tuner ui`: the MLflow UI on the study's tracking store, bound to loopback unless told."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys

from tuner.errors import ConfigError
from tuner.stores import REMOTE_SCHEMES, Stores, prepare_tracking

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


STOP_SECONDS = 10  # the server gets this long to end after SIGTERM, then is killed
HEALTH_SECONDS = 120  # --open waits this long for the server to answer (a loaded machine)
# the runs of a model-training experiment: MLflow 3's UI reads the view from `workflowType`
VIEW = "#/experiments/{id}?workflowType=machine_learning"


def command(stores: Stores, host: str, port: int, verbose: bool = False) -> list[str]:
    """The `mlflow ui` command line for these stores (one web worker: a person, not a crowd);
    unless `verbose`, without a line per HTTP request."""
    line = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        stores.tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if stores.artifact_root:
        line += ["--default-artifact-root", stores.artifact_root]
    if not verbose:
        line += ["--uvicorn-opts", "--log-level warning --no-access-log"]
    return line


def quiet_env(verbose: bool) -> dict[str, str]:
    """The server's environment: unless `verbose`, without MLflow's INFO lines and Python's
    deprecation warnings (its own, about its own dependencies)."""
    env = os.environ.copy()
    if not verbose:
        env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def study_url(base: str, experiment_id: str | None) -> str:
    """Where to open the UI: the study's runs, in the model-training view (MLflow 3 opens on
    its GenAI pages otherwise); the front page without a study."""
    if experiment_id is None:
        return base
    return f"{base.rstrip('/')}/{VIEW.format(id=experiment_id)}"


def experiment_of(stores: Stores, study: str | None) -> str | None:
    if study is None:
        return None
    from tuner.tracking import Tracker

    return Tracker(stores).experiment_id(study, create=False)


def serve(
    stores: Stores,
    host: str,
    port: int,
    study: str | None = None,
    *,
    open_browser: bool = False,
    verbose: bool = False,
) -> int:
    """Run the UI until Ctrl-C (then 0), or until the server ends (its exit code). The
    server runs in a session of its own, and is stopped with its children whichever way
    `tuner ui` ends. A tracking server is its own UI already."""
    if stores.tracking_uri.split(":", 1)[0] in REMOTE_SCHEMES:
        url = study_url(stores.tracking_uri, experiment_of(stores, study))
        log.info(f"the tracking store is a server already: open {url}")
        return 0
    if host not in LOOPBACK:
        log.info(
            f"warning: binding {host}: the MLflow UI has no authentication; anyone who can "
            "reach this port can read and change your runs"
        )
    check_port_free(host, port)
    prepare_tracking(stores)
    url = study_url(f"http://{host}:{port}", experiment_of(stores, study))
    log.info(f"MLflow UI for {stores.tracking_uri}\n  open {url}  (Ctrl-C to stop)")
    server = subprocess.Popen(
        command(stores, host, port, verbose), env=quiet_env(verbose), start_new_session=True
    )
    try:
        if open_browser and wait_for_health(host, port, server):
            import webbrowser

            webbrowser.open(url)
        return server.wait()
    except KeyboardInterrupt:
        stop(server)
        log.info("stopped the MLflow UI")
        return 0
    finally:
        stop(server)


def wait_for_health(host: str, port: int, server: subprocess.Popen) -> bool:
    """The server answers `/health` (True), or it ended or did not answer in time (False)."""
    import time
    import urllib.request

    deadline = time.monotonic() + HEALTH_SECONDS
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2):
                return True
        except OSError:
            time.sleep(0.2)  # polling a server that is starting
    return False


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's whole session (its web workers too), SIGKILL after
    `STOP_SECONDS`; nothing if it has ended."""
    import signal

    if server.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGTERM)  # a web worker it left behind
        return
    for sig, wait in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, STOP_SECONDS)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def check_port_free(host: str, port: int) -> None:
    """The UI's port can be bound, or a `ConfigError` names it (the server would log the
    failure and exit 0, after the URL was printed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"cannot bind the UI to {host} ({exc}); check --host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # as the server will: a port in TIME_WAIT is free; one that is listened on is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"port {port} on {host} is taken ({exc.strerror}); stop what uses it or "
                "choose another with --port"
            ) from None
