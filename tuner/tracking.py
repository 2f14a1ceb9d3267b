"""Every MLflow call of tuner lives here: the study's parent run, one nested run per trial,
the ensemble run. Runs are written through `MlflowClient` with explicit ids, so nothing depends
on a process-global "active run" and parallel workers can share one parent."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuner import __version__, interrupts
from tuner.errors import ConfigError, TunerError
from tuner.stores import Stores, prepare_tracking
from tuner.train import EpochStats

# mlflow configures its loggers from this variable (INFO by default) when imported: schema
# migrations and progress bars are not news to a user; their own setting still wins.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, Run, RunTag  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: E402

ROLE = "tuner.role"  # study | trial | ensemble
STATE = "tuner.state"  # complete | pruned | failed (trial runs)
WEIGHTS = "model/state_dict.pt"
ARCH = "model/architecture.json"
VAL_PREDICTIONS = "predictions/val_predictions.npz"
WEIGHTS_SHA256 = "tuner.weights_sha256"  # checked before the weights are loaded
LOCKED_RETRY_SECONDS = 120  # keep retrying a write to a locked SQLite store this long
REMOTE_SCHEMES = {"http", "https", "databricks"}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@functools.cache
def provenance() -> dict[str, str]:
    """What made a run: tuner's version, torch's, the git commit of the working folder."""
    tags = {"tuner.version": __version__, "torch.version": torch.__version__}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: str(value)}


def _locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc)


class _PatientClient:
    """An MlflowClient whose calls wait out a locked SQLite store (several workers write to
    one file, and SQLite lets one writer in at a time; the driver gives up after 5 s), and
    are not cut in half by Ctrl-C or SIGTERM."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        def patient(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + LOCKED_RETRY_SECONDS
            delay = 0.05
            while True:
                try:
                    with interrupts.shielded():  # never leave a SQLite write half done
                        return method(*args, **kwargs)
                except Exception as exc:
                    if not _locked(exc) or time.monotonic() > deadline:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

        return patient


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer is an error at start, not after the first trial
    (MLflow's own client retries for minutes before it gives up)."""
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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_tracking(stores: Stores) -> None:
    """The tracking store's folder can be made, or its server answers."""
    prepare_tracking(stores)
    check_reachable(stores.tracking_uri)


class Tracker:
    """A study's view of the MLflow tracking store."""

    def __init__(self, stores: Stores, *, checked: bool = False) -> None:
        if not checked:  # by the caller, just before
            check_tracking(stores)
        self.stores = stores
        self.client = _PatientClient(MlflowClient(tracking_uri=stores.tracking_uri))

    # -- experiment and parent run -------------------------------------------------------------

    def experiment_id(self, name: str, *, create: bool) -> str:
        try:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None and experiment.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"the MLflow experiment {name!r} was deleted; restore it with "
                    f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` "
                    "or give the study another name"
                )
            if experiment is not None:
                return experiment.experiment_id
            if not create:
                raise TunerError(f"no MLflow experiment {name!r} at {self.stores.tracking_uri}")
            return self.client.create_experiment(name, artifact_location=self.stores.artifact_root)
        except TunerError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"cannot use the MLflow tracking store {self.stores.tracking_uri} ({exc}); "
                "check --tracking-uri or MLFLOW_TRACKING_URI"
            ) from None

    def create_parent(self, experiment_id: str, spec: dict[str, Any], optuna_url: str) -> str:
        tags = {ROLE: "study", "optuna.storage": optuna_url, **provenance()}
        run = self.client.create_run(experiment_id, tags=tags, run_name=spec["name"])
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in _flatten("", spec).items()])
        self.client.log_dict(run_id, spec, "spec.yaml")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def parent_running(self, run_id: str, running: bool) -> None:
        """The parent shows RUNNING in the UI while a `tuner study run` works on it."""
        if running:
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, "FINISHED")

    def summarize_parent(
        self,
        run_id: str,
        *,
        counts: Mapping[str, int],
        best: tuple[int, float, Mapping[str, Any]] | None,
        figures: Mapping[str, Any],
    ) -> None:
        finished = sum(counts.values())
        metrics = [Metric(f"trials_{state}", n, _now(), finished) for state, n in counts.items()]
        tags = []
        if best is not None:
            number, value, params = best
            metrics.append(Metric("best_val_acc", value, _now(), finished))
            tags = [RunTag("best.trial", str(number))]
            tags += [RunTag(f"best.{k}", str(v)) for k, v in params.items()]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        for name, figure in figures.items():
            # Optuna's plots put long parameter names outside the axes: keep them in the picture
            self.client.log_figure(
                run_id, figure, f"plots/{name}.png", save_kwargs={"bbox_inches": "tight"}
            )

    # -- trial runs -----------------------------------------------------------------------------

    def start_trial(
        self,
        experiment_id: str,
        parent_run_id: str,
        study_name: str,
        trial_number: int,
        params: Mapping[str, Any],
        settings: Mapping[str, Any],
    ) -> str:
        tags = {
            MLFLOW_PARENT_RUN_ID: parent_run_id,
            ROLE: "trial",
            "optuna.study": study_name,
            "optuna.trial_number": str(trial_number),
            **provenance(),
        }
        run = self.client.create_run(
            experiment_id, tags=tags, run_name=f"{study_name}-trial-{trial_number:04d}"
        )
        run_id = run.info.run_id
        all_params = {**params, **_flatten("", settings), "optuna_trial_number": trial_number}
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in all_params.items()])
        return run_id

    def log_epoch(self, run_id: str, stats: EpochStats) -> None:
        now = _now()
        self.client.log_batch(
            run_id, metrics=[Metric(k, v, now, stats.epoch) for k, v in stats.metrics().items()]
        )

    def save_trial_outputs(
        self,
        run_id: str,
        state_dict: Mapping[str, torch.Tensor],
        architecture: Mapping[str, Any],
        val_probs: np.ndarray,
        val_labels: np.ndarray,
    ) -> None:
        """Weights as a plain `state_dict` (loads with weights_only=True), with its SHA-256
        recorded on the run, and the validation predictions."""
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / Path(WEIGHTS).name
            torch.save(dict(state_dict), weights)
            self.client.set_tag(run_id, WEIGHTS_SHA256, sha256(weights))
            self._log_file(run_id, weights, WEIGHTS)
            predictions = Path(tmp) / Path(VAL_PREDICTIONS).name
            np.savez_compressed(predictions, probs=val_probs.astype(np.float32), labels=val_labels)
            self._log_file(run_id, predictions, VAL_PREDICTIONS)
        self.client.log_dict(run_id, dict(architecture), ARCH)

    def _log_file(self, run_id: str, local: Path, artifact_path: str) -> None:
        """Into a local artifact store through a temporary name and a rename, so the file is
        there whole or not at all; remote stores get MLflow's own upload."""
        root = self.client.get_run(run_id).info.artifact_uri
        parsed = urllib.parse.urlsplit(root)
        if parsed.scheme not in ("", "file"):
            self.client.log_artifact(run_id, str(local), str(Path(artifact_path).parent))
            return
        target = Path(urllib.request.url2pathname(parsed.path)) / artifact_path
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        shutil.copyfile(local, partial)
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)

    def end_trial(
        self,
        run_id: str,
        state: str,
        *,
        value: float | None = None,
        reason: str | None = None,
        epochs: int | None = None,
        details: str | None = None,
    ) -> None:
        """Close a trial's run: complete/pruned → FINISHED, killed → KILLED, failed or
        diverged → FAILED."""
        tags = [RunTag(STATE, state)]
        if reason:
            tags.append(RunTag("tuner.fail_reason", reason))
        if epochs is not None:
            key = "tuner.pruned_at_epoch" if state == "pruned" else "tuner.epochs_run"
            tags.append(RunTag(key, str(epochs)))
        metrics = [Metric("final_val_acc", value, _now(), 0)] if value is not None else []
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        if details:
            self.client.log_text(run_id, details, "error.txt")
        status = {"complete": "FINISHED", "pruned": "FINISHED", "killed": "KILLED"}
        self.client.set_terminated(run_id, status.get(state, "FAILED"))

    def running_trial_runs(self, experiment_id: str) -> list[Run]:
        """Trial runs still marked RUNNING (live, or orphaned by a worker that died)."""
        return self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE}` = 'trial' and attributes.status = 'RUNNING'",
            max_results=10_000,
        )

    # -- ensembles ------------------------------------------------------------------------------

    def download(self, run_id: str, path: str, into: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, path, str(into)))

    def artifact_location(self, run_id: str, path: str) -> str:
        return f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"

    def tag(self, run_id: str, key: str) -> str | None:
        return self.client.get_run(run_id).data.tags.get(key)

    def log_ensemble(
        self,
        experiment_id: str,
        parent_run_id: str,
        member_run_ids: list[str],
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        member_table: str,
        figure: Any,
    ) -> str:
        tags = {
            MLFLOW_PARENT_RUN_ID: parent_run_id,
            ROLE: "ensemble",
            "tuner.members": ",".join(member_run_ids),
            **provenance(),
        }
        run = self.client.create_run(
            experiment_id, tags=tags, run_name=f"ensemble-top{len(member_run_ids)}"
        )
        run_id = run.info.run_id
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), _now(), 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        self.client.log_text(run_id, member_table, "members.txt")
        self.client.log_figure(run_id, figure, "confusion_matrix.png")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id


def _now() -> int:
    return int(time.time() * 1000)
