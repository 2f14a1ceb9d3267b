from __future__ import annotations

from pathlib import Path

import pytest

from tuner.errors import ConfigError, StoreError
from tuner.stores import optuna_storage, resolve


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TUNER_STORAGE", "TUNER_MLRUNS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_sqlite_under_mlruns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stores = resolve()
    assert stores.optuna_url == f"sqlite:///{tmp_path}/mlruns/optuna.db"
    assert stores.tracking_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert stores.artifact_root == (tmp_path / "mlruns" / "artifacts").as_uri()


def test_environment_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_STORAGE", "sqlite:////tmp/a.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    stores = resolve(mlruns=tmp_path)
    assert stores.optuna_url == "sqlite:////tmp/a.db"
    assert stores.tracking_uri == "http://127.0.0.1:5000"
    assert stores.artifact_root is None, "a tracking server keeps its own artifacts"


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_STORAGE", "sqlite:////tmp/a.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/b.db")
    stores = resolve(storage="sqlite:////tmp/c.db", tracking_uri="sqlite:////tmp/d.db")
    assert (stores.optuna_url, stores.tracking_uri) == (
        "sqlite:////tmp/c.db",
        "sqlite:////tmp/d.db",
    )


def test_bad_storage_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not-a-url"):
        optuna_storage(resolve(storage="not-a-url"))


def _raised(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise exc from inner
    except BaseException as outer:
        return outer


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (OSError(28, "No space left on device", "/m/weights.pt"), "no space left on the device"),
        (OSError(30, "Read-only file system", "/m/x"), "the file system is read-only"),
        (RuntimeError("(sqlite3.OperationalError) database is locked"),
         "it is locked by another process"),
        (RuntimeError("attempt to write a readonly database"), "it is read-only"),
        (RuntimeError("unable to open database file"), "its file cannot be opened"),
        (RuntimeError("Connection refused"), "the server refuses connections"),
    ],
)  # fmt: skip
def test_store_errors_are_one_line_naming_store_cause_and_fix(
    tmp_path: Path, error: BaseException, cause: str
) -> None:
    from tuner.stores import store_error

    stores = resolve(mlruns=tmp_path)
    wrapped = _raised(RuntimeError("An exception is raised during the commit."), error)
    found = store_error(wrapped, stores)
    assert found is not None and cause in str(found)
    assert "\n" not in str(found) and str(found).endswith("then run the command again")
    where = getattr(error, "filename", None) or f"the MLflow store {stores.tracking_uri}"
    assert str(found).startswith(where)
    assert store_error(ValueError("a bug, not a store"), stores) is None


def _sqlite_store(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")


def test_a_relative_sqlite_url_is_checked_as_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sqlite:///optuna.db` (Optuna's own examples) names a file under the working folder."""
    from tuner.stores import check_files

    monkeypatch.chdir(tmp_path)
    _sqlite_store(tmp_path / "optuna.db")
    (tmp_path / "mlflow.db").write_bytes(bytes(range(256)) * 20)
    check_files(resolve(storage="sqlite:///optuna.db", tracking_uri="sqlite:///optuna.db"))
    with pytest.raises(StoreError, match="the MLflow store sqlite:///mlflow.db: it is damaged"):
        check_files(resolve(storage="sqlite:///optuna.db", tracking_uri="sqlite:///mlflow.db"))


def test_a_store_that_is_a_folder_is_one_line_at_once(tmp_path: Path) -> None:
    from tuner.stores import check_files

    (tmp_path / "mlflow.db").mkdir()
    _sqlite_store(tmp_path / "optuna.db")
    with pytest.raises(StoreError, match=r"mlflow.db is a folder, not a SQLite file"):
        check_files(resolve(mlruns=tmp_path))


def test_a_locked_store_is_not_damaged_and_not_waited_for(tmp_path: Path) -> None:
    """The check reads the schema without waiting: a lock is the command's own to wait out."""
    import sqlite3
    import time

    from tuner.stores import check_files

    for name in ("optuna.db", "mlflow.db"):
        _sqlite_store(tmp_path / name)
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        began = time.monotonic()
        check_files(resolve(mlruns=tmp_path))
        assert time.monotonic() - began < 2
    finally:
        holder.close()


@pytest.mark.parametrize("raw", ["nan", "inf", "-5", "1e9", "soon"])
def test_a_store_wait_that_is_not_a_number_of_seconds_is_refused(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    from tuner.store_errors import store_wait

    monkeypatch.setenv("TUNER_STORE_WAIT", raw)
    with pytest.raises(ConfigError, match=f"TUNER_STORE_WAIT='{raw}' is not a number of sec"):
        store_wait()
    monkeypatch.setenv("TUNER_STORE_WAIT", "0")
    assert store_wait() == 0
