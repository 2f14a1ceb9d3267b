"""`tuner ui`: the MLflow UI on the study's tracking store, bound to loopback unless told."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from tuner.errors import ConfigError
from tuner.records import ROLE_TAG, Role
from tuner.stores import REMOTE_SCHEMES, Stores, prepare_tracking

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


STOP_SECONDS = 10  # the server gets this long to end after SIGTERM, then is killed
HEALTH_SECONDS = 120  # --open waits this long for the server to answer (a loaded machine)
# the runs of a model-training experiment: MLflow 3's UI reads the view from `workflowType`,
# and the table's columns, sort and filter from a shared view stored as an experiment tag
VIEW = "#/experiments/{id}/runs?viewStateShareKey={key}&workflowType=machine_learning"
TRIALS_VIEW = "tuner-trials"
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # MLflow's prefix; the key follows
COLUMNS = (
    "metrics.`objective`",
    "metrics.`best_val_acc`",
    "metrics.`epochs_trained`",
    "params.`state`",
    "params.`depth`",
    "params.`batch_norm`",
    "params.`optimizer`",
    "params.`lr`",
    "params.`weight_decay`",
    "params.`dropout`",
    "params.`augment`",
)


def trials_view() -> dict[str, object]:
    """The view `tuner ui NAME` opens: the study's trials, best first by `objective` (what
    Optuna holds, pruned trials included), with the summary metrics and the parameters as
    columns. The UI's own state, in the shape its "share view" writes."""
    return {
        "searchFilter": f"tags.`{ROLE_TAG}` = '{Role.TRIAL}'",
        "orderByKey": "metrics.`objective`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": list(COLUMNS),
        "columnOrder": ["attributes.`Run Name`", *COLUMNS],
        "columnWidths": {"attributes.`Run Name`": 280},
    }


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
        "--registry-store-uri",  # what it defaults to, said: else MLflow prints that it is
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
    """Where to open the UI: the study's trials (`trials_view`), in the model-training view
    (MLflow 3 opens on its GenAI pages otherwise); the front page without a study."""
    if experiment_id is None:
        return base
    return f"{base.rstrip('/')}/{VIEW.format(id=experiment_id, key=TRIALS_VIEW)}"


@dataclass(frozen=True)
class Where:
    experiment_id: str
    parent_run_id: str | None


def study_where(stores: Stores, study: str | None) -> Where | None:
    """The study's experiment, with the trials view stored on it (again each time: a view
    tuner changed since is brought up to date), and its parent run."""
    if study is None:
        return None
    from tuner.tracking import Tracker

    tracker = Tracker(stores)
    experiment_id = tracker.experiment_id(study, create=False)
    tracker.client.set_experiment_tag(
        experiment_id, SHARED_VIEW_TAG + TRIALS_VIEW, json.dumps(trials_view())
    )
    parents = tracker.parent_runs(experiment_id)
    return Where(experiment_id, parents[0].info.run_id if parents else None)


def where_lines(base: str, where: Where | None, served: bool = True) -> str:
    """`open URL` of the trials, then the parent run's pictures and report; `served`: by
    this command (Ctrl-C stops it)."""
    url = study_url(base, where and where.experiment_id)
    lines = [f"  open {url}" + ("  (Ctrl-C to stop)" if served else "")]
    if where is not None and where.parent_run_id:
        run = f"#/experiments/{where.experiment_id}/runs/{where.parent_run_id}/artifacts"
        lines.append(f"  the study's pictures and report: {base.rstrip('/')}/{run}")
    return "\n".join(lines)


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
        lines = where_lines(stores.tracking_uri, study_where(stores, study), served=False)
        log.info(f"the tracking store is a server already:\n{lines}")
        return 0
    if host not in LOOPBACK:
        log.info(
            f"warning: binding {host}: the MLflow UI has no authentication; anyone who can "
            "reach this port can read and change your runs"
        )
    check_port_free(host, port)
    prepare_tracking(stores)
    base = f"http://{host}:{port}"
    where = study_where(stores, study)
    url = study_url(base, where and where.experiment_id)
    log.info(f"MLflow UI for {stores.tracking_uri}\n{where_lines(base, where)}")
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
