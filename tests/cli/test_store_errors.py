"""Every store problem is one line for every command, naming the store and what to do, at
once: bad URLs, missing drivers, damaged files (real files, the real commands, in-process)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ..conftest import write_study
from ..helpers import in_process, quick

COMMANDS = [["study", "status", "tiny"], ["study", "run", "tiny"], ["refit", "tiny"],
            ["ensemble", "tiny"], ["report", "tiny"], ["ui", "tiny"]]  # fmt: skip


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory, fake_cifar: Path) -> Path:
    """A folder with study `tiny` created in its default stores."""
    folder = tmp_path_factory.mktemp("created")
    write_study(folder)
    with pytest.MonkeyPatch.context() as patch:
        assert in_process(folder, fake_cifar, patch, "study", "create", "tiny") == 0
    return folder


@pytest.fixture
def copy(created: Path, tmp_path: Path) -> Path:
    """A copy of the created study's folder, for this test to damage."""
    shutil.copytree(created, tmp_path / "user")
    return tmp_path / "user"


def _one_line(result, *phrases: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode in (1, 2), out
    assert "Traceback" not in out and "SQLAlchemy engine could not be created" not in out, out
    [line] = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("error: ") and all(p in line for p in phrases), line


@pytest.mark.parametrize(
    ("url", "phrases"),
    [
        ("foo", ("Optuna storage URL 'foo' is not a valid database URL",)),
        ("redis://localhost:6379", ("names no database tuner can use", "sqlite:///FILE")),
        ("postgresql+psycopg2://u@localhost/db", ("needs the Python module psycopg2",
                                                  "postgresql://")),
    ],
    ids=["not a URL", "not a database", "a driver not installed"],
)  # fmt: skip
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:-1]))
def test_an_optuna_url_that_cannot_work_is_one_line_for_every_command(
    copy, fake_cifar, monkeypatch, capsys, url: str, phrases: tuple[str, ...], command: list[str]
) -> None:
    _one_line(quick(copy, fake_cifar, monkeypatch, capsys, *command, "--storage", url), *phrases)


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 20)
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)


def _truncated(path: Path) -> None:
    """The file's first 40 KiB: a SQLite header whose pages end early."""
    import sqlite3

    with sqlite3.connect(path) as db:  # the WAL folded in first, so the file holds it all
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path.write_bytes(path.read_bytes()[: 40 * 1024])
    for side in ("-wal", "-shm"):
        Path(f"{path}{side}").unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("store", "damage", "phrase"),
    [
        ("optuna.db", _garbage, "the Optuna storage"),
        ("mlflow.db", _garbage, "the MLflow store"),
        ("mlflow.db", _truncated, "the MLflow store"),
    ],
    ids=["garbage optuna.db", "garbage mlflow.db", "truncated mlflow.db"],
)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:-1]))
def test_a_damaged_store_file_is_named_as_damaged_by_every_command(
    copy, fake_cifar, monkeypatch, capsys, store: str, damage, phrase: str, command: list[str]
) -> None:
    damage(copy / "mlruns" / store)
    result = quick(copy, fake_cifar, monkeypatch, capsys, *command)
    _one_line(result, phrase, str(copy / "mlruns" / store), "damaged", "move it aside")
