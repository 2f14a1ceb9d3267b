"""Artifacts that are there whole or not at all, and weights that are checked before a byte of
them is unpickled: written once, through a temporary name and a rename, hashed as they are
written, with their SHA-256 on the run."""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from tuner.errors import DataError
from tuner.stores import local_folder
from tuner.tracking.client import PatientClient

T = TypeVar("T")  # what a `replace_whole` writer returns

WEIGHTS = "model/state_dict.pt"
ARCHITECTURE = "model/architecture.json"
VAL_PREDICTIONS = "predictions/val_predictions.npz"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time
            digest.update(block)
    return digest.hexdigest()


class _Hashing(io.RawIOBase):
    """A file that hashes what goes into it as it goes in: a 59 MB state_dict is hashed while
    it is written (on another core: hashlib and the write each let go of the GIL), not read
    back afterwards."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) < PARALLEL_BYTES:
            self.digest.update(view)
            return self.file.write(view)
        hashed = _hasher().submit(self.digest.update, view)
        try:
            return self.file.write(view)
        finally:
            hashed.result()  # before the caller may reuse its buffer


PARALLEL_BYTES = 1 << 20  # a write this large is hashed in the other thread meanwhile


@functools.cache
def _hasher() -> concurrent.futures.ThreadPoolExecutor:
    from tuner.background import leave_signals_to_the_main_thread

    return concurrent.futures.ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="tuner-hash",
        initializer=leave_signals_to_the_main_thread,
    )


def write_artifact(
    client: PatientClient,
    run_id: str,
    artifact_uri: str,
    artifact_path: str,
    dump: Callable[[BinaryIO], object],
) -> str:
    """`dump(file)` writes an artifact once, straight into a local artifact store under a
    temporary name that is then renamed (a remote store gets MLflow's upload of a temporary
    file); its SHA-256, computed as it was written. `artifact_uri`: the run's, known since
    it was created (no `get_run` to find it).

    Not fsynced: a killed process leaves the whole file or none; a power cut can leave a
    damaged one, which the recorded SHA-256 refuses to load (`fetch_verified`)."""
    folder = local_folder(artifact_uri)
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(artifact_path).name
            digest = _dump(local, dump)
            client.log_artifact(run_id, str(local), str(Path(artifact_path).parent))
        return digest
    target = folder / artifact_path
    target.parent.mkdir(parents=True, exist_ok=True)
    return replace_whole(target, lambda partial: _dump(partial, dump))


def replace_whole(target: Path, write: Callable[[Path], T]) -> T:
    """`write(path)` to a temporary name beside `target`, then renamed onto it: `target` holds
    the whole of what was written, or what it held before; no partial file stays behind (a
    full disk, a signal). What `write` returns."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        written = write(partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written


def _dump(path: Path, dump: Callable[[BinaryIO], object]) -> str:
    try:
        with path.open("wb", buffering=0) as raw:
            hashing = _Hashing(raw)
            with io.BufferedWriter(hashing, buffer_size=PARALLEL_BYTES) as buffered:
                dump(buffered)  # type: ignore[arg-type]
            return hashing.digest.hexdigest()
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        # a write that fails (a full disk) says no file: the error must name it
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def location(client: PatientClient, run_id: str, artifact_path: str) -> str:
    """Where an artifact lives, for messages."""
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


class ArtifactError(DataError):
    """An artifact that is missing or not as it was written: the message names it and what to
    do; `why` says what is wrong in a few words, for a line that names its trial."""

    def __init__(self, message: str, why: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.why = why
        self.missing = missing


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
        missing = not _listed(client, run_id, artifact_path)
        why = "missing" if missing else f"unreadable: {exc}"
        raise ArtifactError(
            f"{where}: {what} cannot be read ({exc})", why, missing=missing
        ) from None
    if expected is not None and sha256(path) != expected:
        raise ArtifactError(
            f"{location(client, run_id, artifact_path)}: {what} (MLflow run {run_id}) do not "
            "match the checksum recorded when they were written: the file was changed or "
            "damaged. Not loading it; restore the file or ensemble fewer trials.",
            "does not match the checksum recorded when it was written",
        )
    return path


def _listed(client: PatientClient, run_id: str, artifact_path: str) -> bool:
    """The artifact store lists the artifact (True when it cannot say: not known missing)."""
    try:
        folder = str(Path(artifact_path).parent)
        return any(a.path == artifact_path for a in client.list_artifacts(run_id, folder))
    except Exception:
        return True
