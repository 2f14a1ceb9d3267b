from __future__ import annotations

from pathlib import Path

import pytest

from tuner.errors import ConfigError
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
