"""Every MLflow call of tuner lives here: the study's parent run, one nested run per trial,
the ensemble run. Runs are written through `MlflowClient` with explicit ids, so nothing depends
on a process-global "active run" and parallel workers can share one parent."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuner import __version__
from tuner.errors import ConfigError, TunerError
from tuner.stores import Stores, prepare_tracking
from tuner.train import EpochStats

# mlflow configures its loggers from this variable (INFO by default) when imported: schema
# migrations and progress bars are not news to a user; their own setting still wins.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: E402

ROLE = "tuner.role"  # study | trial | ensemble
STATE = "tuner.state"  # complete | pruned | failed (trial runs)
WEIGHTS = "model/state_dict.pt"
ARCH = "model/architecture.json"
VAL_PREDICTIONS = "predictions/val_predictions.npz"


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


class Tracker:
    """A study's view of the MLflow tracking store."""

    def __init__(self, stores: Stores) -> None:
        prepare_tracking(stores)
        self.stores = stores
        self.client = MlflowClient(tracking_uri=stores.tracking_uri)

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
        """Weights as a plain `state_dict` (loads with weights_only=True) and val predictions."""
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / Path(WEIGHTS).name
            torch.save(dict(state_dict), weights)
            self.client.log_artifact(run_id, str(weights), str(Path(WEIGHTS).parent))
            predictions = Path(tmp) / Path(VAL_PREDICTIONS).name
            np.savez_compressed(predictions, probs=val_probs.astype(np.float32), labels=val_labels)
            self.client.log_artifact(run_id, str(predictions), str(Path(VAL_PREDICTIONS).parent))
        self.client.log_dict(run_id, dict(architecture), ARCH)

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
        """Close a trial's run: complete/pruned → FINISHED, failed → FAILED, killed → KILLED."""
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

    # -- ensembles ------------------------------------------------------------------------------

    def download(self, run_id: str, path: str, into: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, path, str(into)))

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
