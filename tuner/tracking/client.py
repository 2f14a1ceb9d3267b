"""The MLflow client tuner writes through: it waits out a locked SQLite store, is never cut in
half by a signal, and a tracking server that does not answer is an error at start."""

from __future__ import annotations

import functools
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from tuner import interrupts
from tuner.errors import ConfigError
from tuner.store_errors import patiently, shown
from tuner.stores import (
    POOL_OVERFLOW,
    POOL_SIZE,
    Stores,
    cannot_write,
    local_folder,
    prepare_tracking,
)

# mlflow configures its loggers from this variable (INFO by default) when imported: schema
# migrations and progress bars are not news to a user; their own setting still wins.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# two lines per trial with a tracking server ("🏃 View run … at: URL"): tuner prints its own
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# a database server as the MLflow store (no tracking server): a small pool per process, as
# for Optuna's storage (`stores.POOL_SIZE`); MLflow checks each connection before use
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", str(POOL_SIZE))
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", str(POOL_OVERFLOW))

from mlflow import MlflowClient  # noqa: E402

# MLflow's store logs each database error with its whole traceback, then raises it: tuner
# reports store errors itself, in one line (`stores.store_error`)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

HEALTH_TIMEOUT_SECONDS = 5.0  # MLflow's own client retries for minutes before it gives up


class PatientClient:
    """An MlflowClient whose calls wait out a locked SQLite store (several workers write to
    one file, and SQLite lets one writer in at a time; the driver gives up after 5 s; see
    `store_errors.patiently`), and are not cut in half by Ctrl-C or SIGTERM."""

    def __init__(self, tracking_uri: str) -> None:
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._what = f"the MLflow store {shown(tracking_uri)}"

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def shielded(*args: Any, **kwargs: Any) -> Any:
            with interrupts.shielded():  # never leave a SQLite write half done
                return method(*args, **kwargs)

        @functools.wraps(method)
        def patient(*args: Any, **kwargs: Any) -> Any:
            return patiently(lambda: shielded(*args, **kwargs), self._what)

        return patient


def check_reachable(uri: str, timeout: float = HEALTH_TIMEOUT_SECONDS) -> None:
    """An http(s) tracking server answers `/health`, or a `ConfigError` says what to check."""
    if urllib.parse.urlsplit(uri).scheme not in {"http", "https"}:
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        raise ConfigError(
            f"the MLflow tracking server {uri} answered /health with HTTP {exc.code}; check "
            "--tracking-uri or MLFLOW_TRACKING_URI"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot reach the MLflow tracking server {uri} ({exc}); check --tracking-uri or "
            "MLFLOW_TRACKING_URI, and that the server is running"
        ) from None


def build_tracking_schema(url: str) -> None:
    """MLflow's tables and migrations, on a SQLite file no client has opened. MLflow runs them
    on first use, in place; `stores.build_aside` wants them on a file of its choosing."""
    import warnings

    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables  # private: the migrations alone

    engine = sqlalchemy.create_engine(url)
    try:
        with warnings.catch_warnings():  # old migrations use what SQLAlchemy 2.1 deprecates
            warnings.simplefilter("ignore", sqlalchemy.exc.SADeprecationWarning)
            _initialize_tables(engine)
    finally:
        engine.dispose()


def check_tracking(stores: Stores) -> None:
    """The tracking store's folder can be made, or its server answers; a new experiment's
    artifact folder, where it is one, can be written."""
    prepare_tracking(stores)
    check_reachable(stores.tracking_uri)
    check_artifact_folder(stores.artifact_root)


def check_artifact_folder(root: str | None) -> None:
    """A `file:` artifact root is a folder this process can write in (made where missing);
    else a `ConfigError` before any store is written: MLflow would keep the location on the
    experiment for good, and fail every run's first artifact with a traceback."""
    folder = local_folder(root) if root else None
    if folder is None:
        return  # the server's own, or object storage: its first write says
    why = cannot_write(folder)
    if why is not None:
        raise ConfigError(
            f"the MLflow artifact root {folder} cannot be written ({why}); give a "
            "folder tuner can write with --artifact-root (TUNER_ARTIFACT_ROOT)"
        )
