"""Where a study lives: the Optuna storage, the MLflow tracking store and its artifacts.

Defaults need no server: SQLite files under `mlruns/`. Each can be moved by a flag or the
environment (`TUNER_STORAGE`, MLflow's own `MLFLOW_TRACKING_URI`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy

from tuner import interrupts
from tuner.errors import ConfigError, StoreError
from tuner.store_errors import (
    ERRNO_CAUSES,
    full,
    raised_in_optuna,
    shown,
    store_cause,
    store_wait,
)

if TYPE_CHECKING:
    import optuna  # imported where a storage is opened: `study status` reads without it

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10  # a running trial writes a heartbeat this often (limits.heartbeat)
GRACE_SECONDS = 60  # a trial silent this long is marked failed (limits.grace)
SQLITE_TIMEOUT_SECONDS = 10  # the driver's own wait on a locked SQLite file, each attempt
REMOTE_SCHEMES = {"http", "https", "databricks"}  # tracking URIs served by an MLflow server
# A database server's connections are shared by every node: each process keeps at most
# POOL_SIZE + POOL_OVERFLOW to each database (its main thread, the heartbeat, the watchdog)
POOL_SIZE = 2
POOL_OVERFLOW = 1
SCHEMA_ATTEMPTS = 5  # nodes that start together race to make the tables; the losers adopt them
DRIVERS = {  # backend: (what to install, the driver it brings)
    "postgresql": ("pip install 'tuner[postgres]'", "psycopg 3"),
    "mysql": ("pip install mysqlclient", "mysqlclient"),
}


@dataclass(frozen=True)
class Stores:
    mlruns: Path  # the folder that holds the default stores
    optuna_url: str
    tracking_uri: str
    artifact_root: str | None  # where new experiments keep artifacts; None: the server decides

    def describe(self) -> str:
        lines = [
            f"  Optuna storage  : {shown(self.optuna_url)}",
            f"  MLflow tracking : {shown(self.tracking_uri)}",
        ]
        if self.artifact_root:
            lines.append(f"  MLflow artifacts: {self.artifact_root}")
        return "\n".join(lines)


def server_database(url: str) -> bool:
    """A database server (PostgreSQL, MySQL) rather than a SQLite file or an MLflow server."""
    scheme = url.split(":", 1)[0]
    local = scheme.startswith(("sqlite", "file"))
    return "://" in url and scheme not in REMOTE_SCHEMES and not local


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def resolve(
    mlruns: str | os.PathLike[str] | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    artifact_root: str | None = None,
) -> Stores:
    """Flags first, then the environment, then SQLite files under `mlruns/`."""
    folder = Path(mlruns or os.environ.get("TUNER_MLRUNS") or "mlruns").expanduser()
    optuna_url = storage or os.environ.get("TUNER_STORAGE") or sqlite_url(folder / "optuna.db")
    tracking = (
        tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_url(folder / "mlflow.db")
    )
    remote = tracking.split(":", 1)[0] in REMOTE_SCHEMES
    artifacts = artifact_root or os.environ.get("TUNER_ARTIFACT_ROOT")
    if remote:
        artifacts = None  # the server's --artifacts-destination
    elif artifacts is None:
        artifacts = (folder / "artifacts").resolve().as_uri()
    elif "://" not in artifacts:
        artifacts = Path(artifacts).expanduser().resolve().as_uri()
    return Stores(folder, optuna_url, tracking, artifacts)


def local_folder(uri: str) -> Path | None:
    """The folder a `file:` URI (or a plain path) names; None for any other scheme (an MLflow
    server's, object storage)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("", "file"):
        return None
    return Path(urllib.request.url2pathname(parsed.path))


def cannot_write(folder: Path) -> str | None:
    """Why this process cannot write in `folder` (made where missing); None when it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def local_artifacts_warning(stores: Stores, name: str, location: Callable[[], str]) -> str | None:
    """The warning for a study whose runs are in a database server (which many nodes share)
    but whose artifacts go to a folder: other nodes cannot read a folder on this one.
    `location()` gives the experiment's artifact location (asked only for a database)."""
    if not server_database(stores.tracking_uri):
        return None
    folder = local_folder(location())
    if folder is None:
        return None
    return (
        f"warning: the artifacts of study {name!r} (weights, predictions) go to the folder "
        f"{folder}, while its runs are in {shown(stores.tracking_uri)}: unless every node "
        "mounts that folder at the same path, other nodes cannot read them, and `tuner "
        "ensemble` fails there. Use an MLflow tracking server (`mlflow server "
        "--backend-store-uri DB --artifacts-destination DIR`, then --tracking-uri "
        "http://HOST:PORT), or create the study with --artifact-root (TUNER_ARTIFACT_ROOT) "
        "on storage every node mounts."
    )


def check_url(url: str, tracking: bool = False) -> None:
    """The Optuna storage URL (or, `tracking`, the MLflow tracking URI) is one tuner can open:
    it parses, SQLAlchemy knows its database, and that database's driver is installed; else
    one `ConfigError` naming the store, at once, where the first use would be a traceback or
    minutes of retries. A tracking URI that is an MLflow server or a folder passes."""
    what = "MLflow tracking" if tracking else "Optuna storage"
    if tracking and ("://" not in url or url.split(":", 1)[0] in REMOTE_SCHEMES | {"file"}):
        return  # a folder or an MLflow server: MLflow's own to check
    parsed = _parsed(url, what)
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as exc:
        raise missing_driver(url, exc) from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise ConfigError(
            f"{what} URL {shown(url)!r} names no database tuner can use: give sqlite:///FILE, "
            "postgresql://USER@HOST/DB or mysql://USER@HOST/DB"
            + (" (or an MLflow server's http://HOST:PORT)" if tracking else "")
        ) from None


def _parsed(url: str, what: str) -> sqlalchemy.engine.URL:
    """`url` parsed, or a `ConfigError` naming the store (`what`) and the URL."""
    try:
        return sqlalchemy.engine.make_url(url)
    except Exception as exc:
        raise ConfigError(
            f"{what} URL {shown(url)!r} is not a valid database URL ({exc})"
        ) from None


def check_files(stores: Stores) -> None:
    """Each store that is a SQLite file, where it exists, reads as one: a damaged file is one
    `StoreError` at once, where MLflow would retry opening it for a minute and a half first."""
    import sqlite3

    for url, what in (
        (stores.optuna_url, "Optuna storage"),
        (stores.tracking_uri, "MLflow store"),
    ):
        path = sqlite_file(url) if url.startswith("sqlite") else None
        if path is None or not path.exists():
            continue
        if not path.is_file():  # MLflow retries opening a folder for a minute and a half too
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise StoreError(
                f"the {what} {shown(url)}: {path} is {kind}, not a SQLite file; move it aside, "
                "or point tuner at the store's file (--mlruns, --storage, --tracking-uri)"
            )
        uri = f"{path.absolute().as_uri()}?mode=ro"
        try:
            # no wait: a locked file is not a damaged one, and the command's own wait says so
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=0)) as db:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            found = store_cause(exc)
            if found is not None and "damaged" in found[0]:  # locked and the like pass
                raise StoreError(f"the {what} {shown(url)}: {found[0]}; {found[1]}") from None


def _prepare_sqlite(url: str, what: str) -> None:
    """Create the folder of a SQLite file; fail early, naming the URL, when it cannot be."""
    parsed = _parsed(url, what)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{what} {url}: cannot create {folder} ({exc})") from None


@contextlib.contextmanager
def creation_lock(stores: Stores) -> Iterator[None]:
    """One process at a time creates schemas, experiment and study: eight workers started
    together on fresh SQLite files would otherwise race on the migrations and crash."""
    try:
        stores.mlruns.mkdir(parents=True, exist_ok=True)
        handle = (stores.mlruns / ".tuner-create.lock").open("a")
    except OSError as exc:
        raise ConfigError(
            f"cannot use the folder {stores.mlruns} for the stores ({exc})"
        ) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def build_aside(url: str, build: Callable[[str], None], what: str) -> None:
    """A SQLite store that does not exist yet is built under a temporary name, then renamed
    into place: an interrupt while its schema is made (seconds, for MLflow's migrations)
    leaves no half-made store behind that every later command would fail on. Call under
    `creation_lock`; `build(url)` makes the schema at the URL it is given; `what` names the
    store in errors."""
    _prepare_sqlite(url, what)
    path = sqlite_file(url)
    if path is None or path.exists():
        return
    for stale in path.parent.glob(f".{path.name}.building-*"):  # a build that was killed
        stale.unlink(missing_ok=True)
    aside = path.with_name(f".{path.name}.building-{os.getpid()}")
    try:
        # Ctrl-C and SIGTERM wait for the build (seconds): raised inside a migration, they
        # are swallowed by its own clean-up, which then fails with another error
        with interrupts.shielded():
            build(sqlite_url(aside))
            use_wal(sqlite_url(aside))
        os.replace(aside, path)
    except BaseException:
        for leftover in path.parent.glob(f"{aside.name}*"):  # with its -wal and -shm
            leftover.unlink(missing_ok=True)
        raise
    log.debug(f"built {path}")


@sqlalchemy.event.listens_for(sqlalchemy.pool.Pool, "connect")
def _tune_sqlite(connection: object, record: object) -> None:
    """Every SQLite connection of this process (Optuna's and MLflow's) commits without waiting
    for the disk: in WAL mode, `synchronous=NORMAL` syncs at checkpoints, not at each commit
    (a trial's epoch costs a few commits, each an fsync otherwise). The database cannot be
    corrupted by it, and a killed process loses nothing; a power cut or an OS crash can undo
    the commits made since the last checkpoint (SQLite makes one every 1,000 pages, about
    4 MB of writes): the last trials' records, which the next `study run` does not miss."""
    import sqlite3

    if isinstance(connection, sqlite3.Connection):
        connection.execute("PRAGMA synchronous=NORMAL")


def build_optuna_schema(url: str, pooled: bool = True) -> None:
    import optuna

    kwargs = {} if pooled else {"engine_kwargs": {"poolclass": sqlalchemy.pool.NullPool}}
    optuna.storages.RDBStorage(url, **kwargs).engine.dispose()


def use_wal(url: str) -> None:
    """Put a SQLite store in write-ahead-log mode (it stays so): readers no longer block the
    writer, which several workers sharing one file otherwise wait on for seconds at a time."""
    import sqlite3

    path = sqlite_file(url)
    if path is None:
        return
    with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_SECONDS)) as db:
        db.execute("PRAGMA journal_mode=WAL")


def store_error(exc: BaseException, stores: Stores) -> StoreError | None:
    """The one-line `StoreError` for an exception that means a store cannot be used: which
    store (from where it was raised), the cause, and what to do. None for other errors."""
    found = store_cause(exc)
    if found is None:
        return None
    cause, fix, filename = found
    if raised_in_optuna(exc):
        where, url = f"the Optuna storage {stores.optuna_url}", stores.optuna_url
    elif filename is not None:
        where, url = f"{filename}", None
    else:
        where, url = f"the MLflow store {stores.tracking_uri}", stores.tracking_uri
    if cause == "a disk I/O error" and url is not None and full(url):
        # SQLite cannot make its -shm file on a full disk, and says only "disk I/O error"
        cause, fix = ERRNO_CAUSES[errno.ENOSPC]
    return StoreError(f"{where}: {cause}; {fix}, then run the command again")


_storages: dict[tuple[str, int, int], optuna.storages.RDBStorage] = {}


def optuna_storage(
    stores: Stores, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS
) -> optuna.storages.RDBStorage:
    """The RDB storage with heartbeats on: a killed worker's trial is failed, then retried.
    One per process and URL: each holds a pool of connections to a server that every node
    shares."""
    if not server_database(stores.optuna_url):  # a file: cheap to open, and may be replaced
        return _open_storage(stores, heartbeat, grace)
    key = (stores.optuna_url, heartbeat, grace)
    if key not in _storages:
        _storages[key] = _open_storage(stores, heartbeat, grace)
    return _storages[key]


def engine_options(url: str) -> dict[str, object]:
    """SQLAlchemy engine options: SQLite waits on a locked file; a database server gets a
    small pool whose connections are checked before use (a server restart or a dropped
    connection costs a reconnect, not an error), named `tuner host:pid` in the server's
    own views (pg_stat_activity)."""
    if url.startswith("sqlite"):
        # each try waits at most half the store wait: the line that says tuner waits comes
        # after the first, and a second try still fits in the wait (a short TUNER_STORE_WAIT
        # spent whole on one try failed without a word)
        return {"connect_args": {"timeout": min(SQLITE_TIMEOUT_SECONDS, store_wait() / 2)}}
    options: dict[str, object] = {
        "pool_pre_ping": True,
        "pool_size": POOL_SIZE,
        "max_overflow": POOL_OVERFLOW,
    }
    if url.startswith("postgresql"):
        import socket

        options["connect_args"] = {"application_name": f"tuner {socket.gethostname()}:"
                                                       f"{os.getpid()}"[:63]}  # fmt: skip
    return options


def missing_driver(url: str, exc: BaseException) -> ConfigError | None:
    """The error for a database URL whose driver is not installed, naming what to install."""
    found = exc if isinstance(exc, ImportError) else exc.__cause__
    if not isinstance(found, ImportError):
        return None
    backend, _, driver = url.split(":", 1)[0].partition("+")
    if driver:  # a driver the URL chose: tuner's extra would install another
        module = found.name or driver
        return ConfigError(
            f"{shown(url)} needs the Python module {module}, which is not installed: install "
            f"it, or write {backend}:// for tuner's driver"
        )
    install, name = DRIVERS.get(backend, ("the database's Python driver", "its driver"))
    return ConfigError(f"{shown(url)} needs {name}, which is not installed: {install}")


def _open_storage(stores: Stores, heartbeat: int, grace: int) -> optuna.storages.RDBStorage:
    url = stores.optuna_url
    _prepare_sqlite(url, "Optuna storage")
    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            if server_database(url):  # the tables first, on connections closed after use:
                build_optuna_schema(url, pooled=False)  # a lost race leaves none open

            from tuner._optuna import PatientStorage

            return PatientStorage(
                url,
                engine_kwargs=engine_options(url),
                heartbeat_interval=heartbeat,
                grace_period=grace,
                # none: tuner queues a lost trial's point itself (`retries.lost`); Optuna's
                # callback copies every user attribute, the dead attempt's run id and worker too
                heartbeat_stale_trial_callback=None,
            )
        except Exception as exc:
            missing = missing_driver(url, exc)
            if missing is not None:
                raise missing from None
            if schema_race(exc) and attempt < SCHEMA_ATTEMPTS:
                log.debug(f"another node is making the Optuna tables; adopting them ({exc})")
                time.sleep(0.2 * attempt)  # let the other node's transaction finish
                continue
            error = store_error(exc, stores)
            if error is not None and sqlite_file(url) is not None:
                raise error from None  # locked, full, read-only: the URL is right, the file not
            raise unusable_storage(url, exc, "open") from None
    raise AssertionError("unreachable")


def unusable_storage(url: str, exc: BaseException, doing: str) -> ConfigError:
    """One line for an Optuna storage that cannot be opened or read (a server that does not
    answer, a host that does not resolve): the driver's first line, and what to check."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"cannot {doing} the Optuna storage {shown(url)} ({first}); check --storage or "
        "TUNER_STORAGE, and that the database is reachable"
    )


def schema_race(exc: BaseException) -> bool:
    """`exc` is what a node gets when another makes the same tables at the same moment."""
    text = str(exc).lower()
    return isinstance(exc, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.ProgrammingError) and (
        "already exists" in text or "duplicate" in text
    )


def prepare_tracking(stores: Stores) -> None:
    if stores.tracking_uri.startswith("sqlite"):
        _prepare_sqlite(stores.tracking_uri, "MLflow tracking")
