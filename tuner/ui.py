"""`tuner ui`: the MLflow UI on the study's tracking store, bound to loopback unless told."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

from tuner.errors import ConfigError
from tuner.stores import REMOTE_SCHEMES, Stores, prepare_tracking

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def command(stores: Stores, host: str, port: int) -> list[str]:
    """The `mlflow ui` command line for these stores (one web worker: a person, not a crowd)."""
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
    return line


def serve(stores: Stores, host: str, port: int) -> int:
    """Run the UI until Ctrl-C; its exit code. A tracking server is its own UI already."""
    if stores.tracking_uri.split(":", 1)[0] in REMOTE_SCHEMES:
        log.info(f"the tracking store is a server already: open {stores.tracking_uri}")
        return 0
    if host not in LOOPBACK:
        log.info(
            f"warning: binding {host}: the MLflow UI has no authentication; anyone who can "
            "reach this port can read and change your runs"
        )
    check_port_free(host, port)
    prepare_tracking(stores)
    log.info(f"MLflow UI for {stores.tracking_uri}\n  open http://{host}:{port}  (Ctrl-C to stop)")
    return subprocess.call(command(stores, host, port), env=os.environ.copy())


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
