"""Artifacts that are there whole or not at all, and weights that are checked before a byte of
them is unpickled: written through a temporary name and a rename, with their SHA-256 on the run."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

from tuner.errors import DataError
from tuner.tracking.client import PatientClient

WEIGHTS = "model/state_dict.pt"
ARCHITECTURE = "model/architecture.json"
VAL_PREDICTIONS = "predictions/val_predictions.npz"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time
            digest.update(block)
    return digest.hexdigest()


def log_file(client: PatientClient, run_id: str, local: Path, artifact_path: str) -> None:
    """Into a local artifact store through a temporary name and a rename; remote stores get
    MLflow's own upload."""
    root = client.get_run(run_id).info.artifact_uri
    parsed = urllib.parse.urlsplit(root)
    if parsed.scheme not in ("", "file"):
        client.log_artifact(run_id, str(local), str(Path(artifact_path).parent))
        return
    target = Path(urllib.request.url2pathname(parsed.path)) / artifact_path
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        shutil.copyfile(local, partial)
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException:  # a full disk, a signal: no partial file stays behind
        partial.unlink(missing_ok=True)
        raise


def location(client: PatientClient, run_id: str, artifact_path: str) -> str:
    """Where an artifact lives, for messages."""
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def fetch_verified(
    client: PatientClient,
    run_id: str,
    artifact_path: str,
    expected: str | None,
    what: str,
    into: Path,
) -> Path:
    """Download an artifact and check it against the SHA-256 recorded when it was written;
    `what` names it in the error ("the weights of trial 3")."""
    try:
        path = Path(client.download_artifacts(run_id, artifact_path, str(into)))
    except Exception as exc:
        where = location(client, run_id, artifact_path)
        raise DataError(f"{where}: {what} cannot be read ({exc})") from None
    if expected is not None and sha256(path) != expected:
        raise DataError(
            f"{location(client, run_id, artifact_path)}: {what} (MLflow run {run_id}) do not "
            "match the checksum recorded when they were written: the file was changed or "
            "damaged. Not loading it; restore the file or ensemble fewer trials."
        )
    return path
