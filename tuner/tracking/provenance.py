"""What made a run: tuner's version, torch's, and the git commit of the working folder."""

from __future__ import annotations

import functools
import subprocess

from tuner import __version__

GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: the UI links it


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
    import torch

    tags = {"tuner.version": __version__, "torch.version": torch.__version__}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    return tags
