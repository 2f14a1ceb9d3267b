"""`tuner ui`: the MLflow UI on the study's tracking store, bound to loopback unless told."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tuner import interrupts
from tuner.errors import ConfigError, TunerError
from tuner.records import ROLE_TAG, Role
from tuner.stores import REMOTE_SCHEMES, Stores, prepare_tracking

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


START_SECONDS = 180  # the server must answer within this (about 10 s seen on 2 loaded cores)
TERM_SECONDS = 3  # after SIGTERM, the server's process group gets this long, then SIGKILL
KILL_SECONDS = 5  # after SIGKILL, how long to wait for the kernel to end them all
POLL_SECONDS = 0.1  # between looks at a server that is starting or stopping
TAIL_LINES = 15  # of the server's own output, shown when it fails
# the runs of a model-training experiment: MLflow 3's UI reads the view from `workflowType`,
# and the table's columns, sort and filter from a shared view stored as an experiment tag
VIEW = "#/experiments/{id}/runs?viewStateShareKey={key}&workflowType=machine_learning"
TRIALS_VIEW = "tuner-trials"
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # MLflow's prefix; the key follows
METRICS = ("metrics.`objective`", "metrics.`best_val_acc`", "metrics.`epochs_trained`",
           "params.`state`")  # fmt: skip
VGG_PARAMS = ("depth", "batch_norm", "dropout")  # a study whose file is not at hand: VGG's


def columns(model_params: Sequence[str] = VGG_PARAMS) -> tuple[str, ...]:
    """The summary metrics; the family's first two parameters (what a trial's name says: a
    VGG's depth and batch norm), the optimizer, its learning rate and weight decay, then the
    family's others and the augmentation: the columns a reader compares first come first,
    where the table is not scrolled."""
    first, rest = list(model_params[:2]), list(model_params[2:])
    shown = [*first, "optimizer", "lr", "weight_decay", *rest, "augment"]
    return (*METRICS, *(f"params.`{p}`" for p in shown))


def trials_view(model_params: Sequence[str] = VGG_PARAMS) -> dict[str, object]:
    """The view `tuner ui NAME` opens: the study's trials, best first by `objective` (what
    Optuna holds, pruned trials included), with the summary metrics and the parameters of
    the study's model family as columns. The UI's own state, in the shape its "share view"
    writes."""
    shown = columns(model_params)
    return {
        "searchFilter": f"tags.`{ROLE_TAG}` = '{Role.TRIAL}'",
        "orderByKey": "metrics.`objective`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": list(shown),
        "columnOrder": ["attributes.`Run Name`", *shown],
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


def server_env(verbose: bool) -> dict[str, str]:
    """The server's environment: without MLflow's job runner (seven huey consumers that serve
    its GenAI features, not training runs: they slowed its start and its stop on a small
    machine; set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true for them); unless `verbose`, without
    MLflow's INFO lines and Python's deprecation warnings (its own, about its dependencies)."""
    env = os.environ.copy()
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
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
    view = trials_view(_model_params(stores, study))
    tracker.client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + TRIALS_VIEW,
                                      json.dumps(view))  # fmt: skip
    parents = tracker.parent_runs(experiment_id)
    return Where(experiment_id, parents[0].info.run_id if parents else None)


def _model_params(stores: Stores, study: str) -> Sequence[str]:
    """The parameters of the study's model family, from the study file it was created with
    (VGG's where it cannot be read)."""
    from tuner.spec import parse
    from tuner.study.named import stored_file

    try:
        stored = stored_file(study, stores, patient=False)
        return tuple(parse(stored).space.model_params()) if stored else VGG_PARAMS
    except Exception:  # a file tuner cannot read any more: the view is a convenience
        return VGG_PARAMS


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
    """Run the UI until Ctrl-C, SIGTERM or SIGHUP (the `KeyboardInterrupt` goes on up: the
    CLI says what stopped it, with the exit code of that signal) or until the server ends
    (0, else a `TunerError`). Its address is printed once the server answers there. The
    server runs in a session of its own and is stopped with every process in it whichever
    way `tuner ui` ends. A tracking server is its own UI already."""
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
    base = base_url(host, port)
    where = study_where(stores, study)
    log.info(f"starting the MLflow UI for {stores.tracking_uri}…")
    server = None
    try:
        with interrupts.shielded():  # a Ctrl-C now must not lose the process being started
            server = start(stores, host, port, verbose)
        wait_until_answering(server, base)
        log.info(where_lines(base, where))
        if open_browser:
            import webbrowser

            webbrowser.open(study_url(base, where and where.experiment_id))
        return ended(server, server.process.wait())
    finally:
        if server is not None:
            with interrupts.shielded():  # a second Ctrl-C waits until all of it is stopped
                stop(server)


def base_url(host: str, port: int) -> str:
    """`http://HOST:PORT`, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class Server:
    """The `mlflow ui` process, leader of a session (so of a process group) of its own, and
    the file its output goes to (None: the terminal, with `--verbose`)."""

    process: subprocess.Popen
    output: BinaryIO | None

    def tail(self) -> str:
        """The end of an error: `; its last lines:` and its last `TAIL_LINES` lines, indented;
        nothing if it wrote none, or wrote them on the terminal. Read with `pread`, which
        leaves the offset the server writes at (shared with it) where it is."""
        if self.output is None:
            return ""
        fd = self.output.fileno()
        size = os.fstat(fd).st_size
        start = max(0, size - 200 * TAIL_LINES)  # bytes: about the lines wanted
        lines = os.pread(fd, size - start, start).decode(errors="replace").splitlines()
        shown = [f"    {line}" for line in lines[-TAIL_LINES:] if line.strip()]
        return ("; its last lines:\n" + "\n".join(shown)) if shown else ""


def start(stores: Stores, host: str, port: int, verbose: bool) -> Server:
    """`command` in a session of its own (Ctrl-C on the terminal reaches `tuner` alone, which
    stops the server's whole group), sent SIGTERM if `tuner` dies, even by SIGKILL (Linux);
    its output in a temporary file unless `verbose`: shown only if it fails."""
    import tempfile

    output = None if verbose else tempfile.TemporaryFile()
    process = subprocess.Popen(
        command(stores, host, port, verbose),
        env=server_env(verbose),
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        start_new_session=True,
        # SIGTERM: the server passes it on to its web worker and ends; no grandchild gets it
        preexec_fn=interrupts.on_parent_death(signal.SIGTERM),
    )
    return Server(process, output)


def answers(base: str) -> bool:
    """The server at `base` answers `/health` (asked directly, whatever proxy is set)."""
    import http.client
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{base}/health", timeout=2) as reply:
            return reply.status == 200
    except (OSError, http.client.HTTPException):
        return False


def wait_until_answering(server: Server, base: str) -> None:
    """Return once the server answers at `base`; a `TunerError` with its last lines if it ends
    first or does not answer within `START_SECONDS`."""
    deadline = time.monotonic() + START_SECONDS
    while not answers(base):
        code = server.process.poll()
        if code is not None:
            raise TunerError(
                f"the MLflow UI server exited ({code}) before it answered{server.tail()}"
            )
        if time.monotonic() > deadline:
            raise TunerError(
                f"the MLflow UI server did not answer at {base} within {START_SECONDS} s"
                f"{server.tail()}"
            )
        time.sleep(POLL_SECONDS)  # a server that is starting


def ended(server: Server, code: int) -> int:
    """The server ended by itself, after serving: 0 if it ended well, else a `TunerError`
    with its last lines."""
    if code != 0:
        raise TunerError(f"the MLflow UI server failed ({code}){server.tail()}")
    log.info("the MLflow UI server ended")
    return 0


def stop(server: Server) -> None:
    """End the server's whole process group (its web worker, and any job runner): SIGTERM,
    then SIGKILL after `TERM_SECONDS`; return once none of them runs (or `KILL_SECONDS` after
    the SIGKILL)."""
    for sig, seconds in ((signal.SIGTERM, TERM_SECONDS), (signal.SIGKILL, KILL_SECONDS)):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # none left to signal
            os.killpg(server.process.pid, sig)
        if _group_ends(server.process, seconds):
            break
    if server.output is not None:
        server.output.close()


def _group_ends(leader: subprocess.Popen, seconds: float) -> bool:
    """Wait up to `seconds` until no process of `leader`'s group runs; True if none does."""
    deadline = time.monotonic() + seconds
    while True:
        leader.poll()  # reaps the leader: else it stays in its group as a zombie
        if not _group_runs(leader.pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)  # the group's processes are ending


def _group_runs(pgid: int) -> bool:
    """A process of group `pgid` runs. Zombies do not count: an orphan's zombie waits for
    PID 1 to reap it, which some containers' PID 1 never does."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self/stat").exists():
        return True  # no /proc to tell zombies apart: the group is there
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while we looked
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


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
