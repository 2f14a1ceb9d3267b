from __future__ import annotations

import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from tuner.records import GIT_COMMIT_TAG
from tuner.tracking import provenance as module


@pytest.fixture(autouse=True)
def _fresh() -> None:
    module.provenance.cache_clear()
    yield
    module.provenance.cache_clear()


def test_versions_are_the_installed_ones_not_the_fallback() -> None:
    tags = module.provenance()
    assert tags["tuner.version"] == version("tuner") != "0.0.0+unknown"
    assert tags["torch.version"] == torch.__version__


def test_the_git_commit_is_the_checkout_that_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    git("init", "-q")
    (tmp_path / "study.yaml").write_text("name: x\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a study")
    monkeypatch.chdir(tmp_path)
    assert module.provenance()[GIT_COMMIT_TAG] == git("rev-parse", "HEAD")


def test_outside_a_checkout_no_commit_is_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert GIT_COMMIT_TAG not in module.provenance()
