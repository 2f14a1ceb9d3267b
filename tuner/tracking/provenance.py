"""What made a run: tuner's version, torch's, and the git commit of the working folder."""

from __future__ import annotations

import functools
import subprocess

from tuner import __version__
from tuner.records import GIT_COMMIT_TAG, TORCH_VERSION_TAG, VERSION_TAG


def git_commit() -> str | None:
    """HEAD of the git checkout around the current folder; None outside one (or without git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@functools.cache
def provenance() -> dict[str, str]:
    """Tags for every run (computed once per process)."""
    import importlib.metadata
    import sys

    # torch's own version (with its build, `+cu130`) where it is imported; else the installed
    # distribution's, read without importing torch (2 s) for `study create` and the like
    torch = sys.modules.get("torch")
    torch_version = torch.__version__ if torch else importlib.metadata.version("torch")
    tags = {VERSION_TAG: __version__, TORCH_VERSION_TAG: torch_version}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    return tags
