"""Real servers for the many-node tests: a PostgreSQL cluster in a temporary folder on loopback,
run as an unprivileged user, and an `mlflow server` with a PostgreSQL backend.

`python -m tests.servers` starts both and prints their URLs, for trying things by hand.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_SECONDS = 120  # a server must answer within this (generous: the machine may be loaded)
UNPRIVILEGED = ("postgres", "nobody")  # PostgreSQL refuses to run as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return versions[0].parent if versions else None


def _as_user() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs a program as an unprivileged user (when this is root)."""
    if os.geteuid() != 0:
        return [], None
    for name in UNPRIVILEGED:
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["runuser", "-u", name, "--"], user
    raise RuntimeError("running as root, and no unprivileged user to run PostgreSQL as")


@dataclass
class Postgres:
    """A PostgreSQL cluster of its own: `url(db)` for a database in it, `restart()` to blip it."""

    bin: Path
    data: Path
    port: int
    prefix: list[str]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://tuner@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.prefix, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
            timeout=START_SECONDS,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c max_connections=200 -c fsync=off -c synchronous_commit=off"
        )
        log = self.data.parent / "postgres.log"
        self._ctl("-o", options, "-l", str(log), "-w", "-t", str(START_SECONDS), "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop for good and delete the cluster."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.data.parent, ignore_errors=True)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop (closing every connection), stay down `down_seconds`, start again."""
        self.stop("immediate")
        time.sleep(down_seconds)  # the outage being simulated, not a wait for a condition
        self.start()

    def create_database(self, name: str | None = None) -> str:
        """A fresh database; its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=tuner dbname=postgres", autocommit=True
        ) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def connections(self, database: str) -> dict[str, int]:
        """Open connections to `database`, by application name (tuner names them host:pid)."""
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=tuner dbname=postgres", autocommit=True
        ) as db:
            rows = db.execute(
                "SELECT application_name, count(*) FROM pg_stat_activity "
                "WHERE datname = %s GROUP BY application_name",
                (database,),
            ).fetchall()
        return {name: count for name, count in rows}


def start_postgres() -> Postgres:
    """initdb a cluster in a temporary folder of its own (trust auth, user `tuner`; owned by
    the unprivileged user, which must reach it) and start it on loopback."""
    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed (initdb not found); "
                           "`apt-get install postgresql` installs it")  # fmt: skip
    prefix, user = _as_user()
    folder = Path(tempfile.mkdtemp(prefix="tuner-pg-"))
    folder.chmod(0o755)
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)
    data = folder / "data"
    subprocess.run(
        [*prefix, str(binaries / "initdb"), "-D", str(data), "-U", "tuner", "-A", "trust",
         "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True, timeout=START_SECONDS,
    )  # fmt: skip
    server = Postgres(binaries, data, free_port(), prefix)
    server.start()
    return server


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_mlflow(backend: str, artifacts: Path, log: Path) -> MlflowServer:
    """`mlflow server` on loopback with `backend` as its store and `artifacts` served through it
    (every node reads and writes artifacts through the server)."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow) if mlflow.exists() else "mlflow", "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # no job runner (its consumer processes take a gigabyte and a core, for jobs tuner has none);
    # the server's own pool at MLflow's defaults (5 + 10), as a user's server has: not the
    # small pool a tuner process sets for itself (and this one would inherit), which every
    # node's writer threads would queue on
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_SQLALCHEMYSTORE_POOL")
           and k != "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"}  # fmt: skip
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({process.returncode}):\n"
                               + log.read_text()[-3000:])  # fmt: skip
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)  # polling for the server to answer
    server.stop()
    raise RuntimeError(f"mlflow server did not answer within {START_SECONDS} s:\n"
                       + log.read_text()[-3000:])  # fmt: skip


@contextlib.contextmanager
def servers(folder: Path) -> Iterator[tuple[Postgres, MlflowServer]]:
    pg = start_postgres()
    try:
        mlflow = start_mlflow(pg.create_database("mlflow"), folder / "artifacts",
                              folder / "mlflow.log")  # fmt: skip
        try:
            yield pg, mlflow
        finally:
            mlflow.stop()
    finally:
        pg.remove()


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp(prefix="tuner-servers-"))
    with servers(root) as (pg, mlflow):
        print(f"export TUNER_STORAGE={pg.create_database('optuna')}")
        print(f"export MLFLOW_TRACKING_URI={mlflow.url}")
        print(f"# PostgreSQL: {pg.url()} (data {pg.data}); Ctrl-C stops both", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
