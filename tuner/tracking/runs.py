"""A study's runs in MLflow: the parent run, one nested run per trial, the ensemble runs.

Runs are written through the client with explicit ids, so nothing depends on a process-global
"active run", and workers in many processes share one parent.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tuner.errors import ConfigError, DataError, StoreError, TunerError
from tuner.records import (
    ARCHITECTURE_SHA256_TAG,
    BEST_TAG_PREFIX,
    EPOCHS_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MEMBERS_TAG,
    PREDICTIONS_SHA256_TAG,
    PROCESS_TAG,
    PRUNED_AT_TAG,
    REASON_TAG,
    RECORDS,
    REFIT_SUFFIX,
    ROLE_TAG,
    STATE_PARAM,
    STATE_TAG,
    STORAGE_TAG,
    STUDY_TAG,
    TRIAL_NUMBER_TAG,
    WEIGHTS_SHA256_TAG,
    Outcome,
    Role,
    worker_id,
)
from tuner.stores import Stores, shown
from tuner.tracking.artifacts import (
    ARCHITECTURE,
    VAL_PREDICTIONS,
    WEIGHTS,
    ArtifactError,
    fetch_verified,
    write_artifact,
)
from tuner.tracking.client import PatientClient, check_tracking
from tuner.tracking.provenance import provenance

if TYPE_CHECKING:
    import torch
    from optuna.trial import FrozenTrial

    from tuner.models import Architecture
    from tuner.spec import StudySpec

log = logging.getLogger(__name__)
METRICS_PER_BATCH = 1000  # MLflow's limit on metrics in one log_batch


class StoresDisagree(ConfigError):
    """The Optuna storage and the MLflow store describe different studies: refused, not
    merged (exit 2)."""


@dataclass(frozen=True)
class StudyRuns:
    """Where a study lives in MLflow; made once by `study create`, handed down to every trial."""

    experiment_id: str
    parent_run_id: str


@dataclass(frozen=True)
class TrialRunRef:
    """A trial's MLflow run, as `start_trial` made it."""

    run_id: str
    artifact_uri: str  # where its artifacts go: known from the start, never looked up
    name: str = ""  # as the runs table shows it: `0007 vgg16-bn nesterov`


@dataclass(frozen=True)
class TrialOutputs:
    """What a completed trial leaves: its weights, how to rebuild the network, its predictions."""

    state_dict: Mapping[str, torch.Tensor]
    architecture: Architecture
    val_probs: np.ndarray | None  # N×classes softmax on the validation split (none: a refit)
    val_labels: np.ndarray | None


class Tracker:
    """A study's view of the MLflow tracking store."""

    def __init__(self, stores: Stores, *, checked: bool = False) -> None:
        if not checked:  # by the caller, just before
            check_tracking(stores)
        self.stores = stores
        self.client = PatientClient(stores.tracking_uri)
        self.made: set[str] = set()  # the experiments this tracker created (not adopted)

    # -- experiment and parent run -------------------------------------------------------------

    def experiment_id(self, name: str, *, create: bool) -> str:
        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None and found.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"the MLflow experiment {name!r} was deleted; restore it with "
                    f"`mlflow experiments restore --experiment-id {found.experiment_id}` "
                    "or give the study another name"
                )
            if found is not None:
                if create and found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                    # made before tuner said what it is (once; `create` paths only)
                    self.client.set_experiment_tag(
                        found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                    )
                return found.experiment_id
            if not create:
                raise TunerError(f"no MLflow experiment {name!r} at {self.stores.tracking_uri}")
            return self._create_experiment(name)
        except TunerError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"cannot use the MLflow tracking store {self.stores.tracking_uri} ({exc}); "
                "check --tracking-uri or MLFLOW_TRACKING_URI"
            ) from None

    def _create_experiment(self, name: str) -> str:
        """A new experiment; or, when another node made it a moment ago, that one (the name
        is unique in the store)."""
        from mlflow.exceptions import MlflowException

        try:
            made = self.client.create_experiment(
                name,
                artifact_location=self.stores.artifact_root,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
            self.made.add(made)
            return made
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = self.client.get_experiment_by_name(name)
        if found is None or found.lifecycle_stage == "deleted":
            raise ConfigError(f"the MLflow experiment {name!r} could not be created or found")
        return found.experiment_id

    def artifact_location(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).artifact_location

    def create_parent(self, experiment_id: str, spec: StudySpec, optuna_url: str) -> str:
        """The study's run: the resolved study file, as parameters and as `spec.yaml`."""
        tags = {ROLE_TAG: Role.STUDY, STORAGE_TAG: shown(optuna_url), **provenance()}
        run = self.client.create_run(experiment_id, tags=tags, run_name=spec.name)
        run_id = run.info.run_id
        resolved = spec.to_dict()
        try:
            self.client.log_batch(
                run_id, params=[Param(k, v) for k, v in flatten("", resolved).items()]
            )
            self.client.log_dict(run_id, resolved, "spec.yaml")  # the experiment's first artifact
        except BaseException as exc:
            with contextlib.suppress(Exception):  # no candidate parent is left RUNNING
                self.client.delete_run(run_id)
            if not isinstance(exc, Exception):
                raise
            location = self.artifact_location(experiment_id)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise StoreError(
                f"the study's parent run could not be written to MLflow (artifacts at "
                f"{location}): {first}; check the artifact store, or give another location "
                "with --artifact-root, then run the command again"
            ) from exc
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def retire_if_empty(self, experiment_id: str, name: str) -> None:
        """A set-up that failed leaves no experiment behind that it made and that holds
        nothing: MLflow keeps an experiment's artifact location for good, so a corrected
        --artifact-root needs a new one. It is renamed aside (a deleted experiment keeps its
        name) and deleted. One this process adopted (another node's, or the user's) stays."""
        if experiment_id not in self.made:
            return
        with contextlib.suppress(Exception):  # the next `create` says what is still wrong
            if self.client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY):
                return
            aside = f"{name} (set-up failed {datetime.datetime.now():%Y-%m-%d %H:%M:%S})"
            self.client.rename_experiment(experiment_id, aside)
            self.client.delete_experiment(experiment_id)
            log.debug(f"experiment {experiment_id} held nothing: renamed {aside!r}, deleted")

    def check_study_runs(self, runs: StudyRuns, name: str) -> None:
        """The experiment and parent run that the Optuna study names are in this tracking
        store; else the stores no longer belong together, and nothing is merged into them."""
        where = self.stores.tracking_uri
        fix = (
            f"Point --tracking-uri (MLFLOW_TRACKING_URI) at the store study {name!r} was "
            f"created with, or start afresh: remove the study from {self.stores.optuna_url} "
            f"(`optuna delete-study --study-name {name} --storage URL`, and its refits', "
            f"`{name}{REFIT_SUFFIX}`, if it has any) and run "
            f"`tuner study create {name}`."
        )
        experiment = self._get(self.client.get_experiment, runs.experiment_id)
        if (
            experiment is None
            or experiment.lifecycle_stage == "deleted"
            or (experiment.name != name)
        ):
            found = (
                "no such experiment"
                if experiment is None
                else f"experiment {experiment.name!r} ({experiment.lifecycle_stage})"
            )
            raise StoresDisagree(
                f"the Optuna study {name!r} belongs to MLflow experiment {runs.experiment_id}, "
                f"but {where} has {found} under that id. {fix}"
            )
        parent = self._get(self.client.get_run, runs.parent_run_id)
        if parent is None or parent.info.lifecycle_stage == "deleted":
            restore = (
                f" If it was only deleted, `mlflow runs restore --run-id {runs.parent_run_id}` "
                "brings it back."
                if parent is not None
                else ""
            )
            raise StoresDisagree(
                f"the parent run {runs.parent_run_id} of study {name!r} is "
                f"{'deleted' if parent is not None else 'gone'} from {where}.{restore} {fix}"
            )

    def _get(self, method: Any, key: str) -> Any:
        """`get_experiment` or `get_run`; None where the store has no such thing."""
        from mlflow.exceptions import MlflowException

        try:
            return method(key)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def parent_runs(self, experiment_id: str) -> list[Run]:
        """The experiment's study runs (one, unless a set-up was cut short or raced)."""
        return self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{Role.STUDY}'"
        )

    def _has_trials(self, experiment_id: str, run_id: str) -> bool:
        return bool(
            self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'",
                max_results=1,
            )
        )

    def check_foreign_parents(
        self,
        experiment_id: str,
        name: str,
        optuna_url: str,
        claimed: Callable[[], str | None],
    ) -> None:
        """Before a study's parent run is made: a parent of another study in its experiment
        (another Optuna storage, or trial runs under it that this study does not know) is
        refused. `claimed()`: the parent the study has now (another node may have just
        made it)."""
        for parent in self.parent_runs(experiment_id):
            run_id = parent.info.run_id
            storage = parent.data.tags.get(STORAGE_TAG)
            ours = storage == shown(optuna_url)
            if ours and not self._has_trials(experiment_id, run_id):
                continue  # a candidate of a set-up cut short or under way
            if ours and claimed() == run_id:
                continue  # made by another node a moment ago
            raise StoresDisagree(
                f"the MLflow experiment {name!r} ({experiment_id}) in "
                f"{shown(self.stores.tracking_uri)} already holds study {name!r} (parent run "
                f"{run_id}, with trial runs, made with Optuna storage {storage}), but "
                f"{shown(optuna_url)} has no such study: was the Optuna storage deleted or "
                "moved? Point --storage (TUNER_STORAGE) at the one it was made with, or start "
                f"afresh under another `name:`, or delete the experiment (`mlflow "
                f"experiments delete --experiment-id {experiment_id}`)."
            )

    def remove_other_parents(self, experiment_id: str, keep: str, optuna_url: str) -> None:
        """Once the study's parent is claimed: the other parents of this storage with no trial
        under them (left by a set-up that was cut short, or by the nodes that lost the claim)
        are deleted."""
        for parent in self.parent_runs(experiment_id):
            run_id = parent.info.run_id
            if run_id == keep or parent.data.tags.get(STORAGE_TAG) != shown(optuna_url):
                continue
            if self._has_trials(experiment_id, run_id):
                continue
            with contextlib.suppress(Exception):  # another node deleted it first
                self.client.delete_run(run_id)
                log.debug(f"removed parent run {run_id}: not the study's")

    def parent_running(self, run_id: str, running: bool) -> None:
        """The parent shows RUNNING in the UI while a `tuner study run` works on it."""
        if running:
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, "FINISHED")

    def summarize_parent(
        self,
        run_id: str,
        counts: Mapping[Outcome, int],
        best: FrozenTrial | None,
    ) -> None:
        """Trial counts, the best value and its parameters."""
        finished = sum(counts.values())
        metrics = [Metric(f"trials_{o}", n, now(), finished) for o, n in counts.items()]
        tags = []
        if best is not None:
            metrics.append(Metric("best_val_acc", best.value, now(), finished))
            tags = [RunTag(f"{BEST_TAG_PREFIX}trial", str(best.number))]
            tags += [RunTag(f"{BEST_TAG_PREFIX}{k}", str(v)) for k, v in best.params.items()]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)

    def log_files(self, run_id: str, files: Mapping[str, bytes]) -> None:
        """Small artifacts (artifact path → content), each replacing the one before whole: a
        reader (the UI) never sees half of one."""
        uri = self.client.get_run(run_id).info.artifact_uri
        for path, data in files.items():
            write_artifact(self.client, run_id, uri, path, functools.partial(_write, data))

    # -- trial runs -----------------------------------------------------------------------------

    def start_trial(
        self,
        runs: StudyRuns,
        study_name: str,
        number: int,
        params: Mapping[str, Any],
        settings: Mapping[str, Any],
        label: str = "",
        *,
        role: Role = Role.TRIAL,
        tags: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> TrialRunRef:
        """A trial's run (or a refit's: `role`), nested under the parent: its parameters and the
        fixed settings. Its name is the trial's number, then `label` (what the trial is): the
        runs table cuts a long name short, and the number first tells the trials apart."""
        name = name or f"{number:04d} {label}".strip()
        tags = {
            MLFLOW_PARENT_RUN_ID: runs.parent_run_id,
            ROLE_TAG: role,
            STUDY_TAG: study_name,
            TRIAL_NUMBER_TAG: str(number),
            **(tags or {}),
            **provenance(),
        }
        run = self.client.create_run(runs.experiment_id, tags=tags, run_name=name)
        run_id = run.info.run_id
        logged = {**params, **flatten("", settings), "optuna_trial_number": number}
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in logged.items()])
        return TrialRunRef(run_id, run.info.artifact_uri, name)

    def log_epochs(self, run_id: str, epochs: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Several epochs' metrics of one run, in one call: (epoch, {name: value}) each."""
        stamp = now()
        metrics = [Metric(k, v, stamp, step) for step, values in epochs for k, v in values.items()]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    def save_trial_outputs(self, run: TrialRunRef, outputs: TrialOutputs) -> str:
        """Weights as a plain `state_dict` (loads with weights_only=True), the architecture, and
        the validation predictions (a refit has none), each written once; the weights' SHA-256,
        for `end_trial` to record."""

        def write(path: str, dump: Callable[[BinaryIO], object]) -> str:
            return write_artifact(self.client, run.run_id, run.artifact_uri, path, dump)

        labels = outputs.val_labels
        import torch  # here, not at the top: `study create`, `ui` and `report` never need it

        digest = write(WEIGHTS, lambda f: torch.save(dict(outputs.state_dict), f))
        tags = [RunTag(WEIGHTS_SHA256_TAG, digest)]
        if outputs.val_probs is not None:
            probs = outputs.val_probs.astype(np.float32)
            dump = functools.partial(np.savez_compressed, probs=probs, labels=labels)
            tags.append(RunTag(PREDICTIONS_SHA256_TAG, write(VAL_PREDICTIONS, dump)))
        text = json.dumps(outputs.architecture.to_dict(), indent=2).encode()
        tags.append(RunTag(ARCHITECTURE_SHA256_TAG, write(ARCHITECTURE, lambda f: f.write(text))))
        # on the run now, not only when it is closed: a run closed by another process (its
        # worker died after telling Optuna) keeps the checksums its files are checked with
        self.client.log_batch(run.run_id, tags=tags)
        return digest

    def end_trial(
        self,
        run_id: str,
        outcome: Outcome,
        *,
        value: float | None = None,
        reason: str | None = None,
        epochs: int | None = None,
        details: str | None = None,
        weights_sha256: str | None = None,
        summary: Mapping[str, float] | None = None,
        name: str | None = None,
    ) -> None:
        """Close a trial's run with the status its outcome maps to (`records.RECORDS`): the
        summary metrics every trial logs alike (`summary_metrics`), the outcome as a tag and
        as the parameter `state` (to filter and plot by), and, for a trial that did not
        complete, its word after its `name` (`0007 vgg16-bn sgd [pruned]`)."""
        word = RECORDS[outcome].word
        tags = [RunTag(STATE_TAG, word)]
        if weights_sha256:
            tags.append(RunTag(WEIGHTS_SHA256_TAG, weights_sha256))
        if reason:
            tags.append(RunTag(REASON_TAG, reason))
        if epochs is not None:
            tags.append(
                RunTag(PRUNED_AT_TAG if outcome is Outcome.PRUNED else EPOCHS_TAG, str(epochs))
            )
        stamp = now()
        metrics = [Metric("final_val_acc", value, stamp, 0)] if value is not None else []
        metrics += [Metric(k, v, stamp, 0) for k, v in (summary or {}).items()]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        try:
            self.client.log_batch(run_id, params=[Param(STATE_PARAM, word)])
        except MlflowException as exc:  # recorded already, as another outcome: the first stays
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
        if details:
            # a courtesy: the status and the reason are what must be recorded, and a full
            # artifact store (the likely cause of the error) must not stop them
            with contextlib.suppress(Exception):
                self.client.log_text(run_id, details, "error.txt")
        if name and outcome is not Outcome.COMPLETE:
            # not as the `mlflow.runName` tag in the batch above: with it, MLflow's SQL store
            # waited 30 s for a second connection from tuner's pool, then failed the batch
            self.client.update_run(run_id, name=f"{name} [{word}]")
        self.client.set_terminated(run_id, RECORDS[outcome].mlflow)

    def running_trial_runs(self, experiment_id: str, role: Role = Role.TRIAL) -> list[Run]:
        """Trial (or refit) runs still marked RUNNING (live, or orphaned by a worker that
        died)."""
        return self.running_runs(experiment_id, role)

    def parent_is_running(self, run_id: str) -> bool:
        return self.client.get_run(run_id).info.status == "RUNNING"

    # -- ensembles ------------------------------------------------------------------------------

    def fetch_trial_weights(
        self, run_id: str, trial_number: int, into: Path
    ) -> tuple[Architecture, Path]:
        """A trial's architecture and its weights file, each checked against the SHA-256
        recorded when it was written."""
        folder, tags = into / run_id, self.client.get_run(run_id).data.tags
        expected = tags.get(ARCHITECTURE_SHA256_TAG)
        what = f"the architecture settings of trial {trial_number}"
        arch_file = fetch_verified(self.client, run_id, ARCHITECTURE, expected, what, folder)
        from tuner.models import Architecture  # torch: only where weights are read

        try:
            arch = Architecture.from_dict(json.loads(arch_file.read_text()))
        except Exception as exc:  # edited, in a run written before its checksum was recorded
            raise DataError(
                f"{arch_file.name} of trial {trial_number} (MLflow run {run_id}) is not an "
                f"architecture tuner wrote ({type(exc).__name__}: {exc}); restore the file or "
                "ensemble fewer trials"
            ) from None
        what = f"the weights of trial {trial_number}"
        expected = tags.get(WEIGHTS_SHA256_TAG)
        return arch, fetch_verified(self.client, run_id, WEIGHTS, expected, what, folder)

    def fetch_val_predictions(self, run_id: str, into: Path) -> tuple[np.ndarray, np.ndarray]:
        """A completed trial's softmax on the validation images and their labels, checked
        against the SHA-256 recorded when they were written (plain arrays: nothing is
        unpickled); an `ArtifactError` if they are missing or not as written."""
        tags = self.client.get_run(run_id).data.tags
        what = f"the validation predictions of trial {tags.get(TRIAL_NUMBER_TAG, '?')}"
        expected = tags.get(PREDICTIONS_SHA256_TAG)
        path = fetch_verified(self.client, run_id, VAL_PREDICTIONS, expected, what, into / run_id)
        try:
            with np.load(path, allow_pickle=False) as saved:
                return saved["probs"], saved["labels"]
        except Exception as exc:  # not a zip, a key missing, an array of objects
            why = f"not a readable .npz of probs and labels: {exc}"
            raise ArtifactError(f"{path}: {what} are {why}", why) from None

    def start_ensemble(self, runs: StudyRuns, name: str) -> str:
        """An ensemble's run, RUNNING while it is scored; tagged with this process, so that a
        run left RUNNING by a process that died is closed (`recovery.reconcile_runs`)."""
        tags = {
            MLFLOW_PARENT_RUN_ID: runs.parent_run_id,
            ROLE_TAG: Role.ENSEMBLE,
            PROCESS_TAG: worker_id(),
            **provenance(),
        }
        run = self.client.create_run(runs.experiment_id, tags=tags, run_name=name)
        return run.info.run_id

    def finish_ensemble(
        self,
        run_id: str,
        member_run_ids: list[str],
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        member_table: str,
        figure: Any,
    ) -> None:
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now(), 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[RunTag(MEMBERS_TAG, ",".join(member_run_ids))],
        )
        self.client.log_text(run_id, member_table, "members.txt")
        self.client.log_figure(run_id, figure, "confusion_matrix.png")
        self.client.set_terminated(run_id, "FINISHED")

    def end_run(self, run_id: str, outcome: Outcome, reason: str) -> None:
        """Close a run outside trials (an ensemble) that did not finish its work."""
        self.client.set_tag(run_id, REASON_TAG, reason)
        self.client.set_terminated(run_id, RECORDS[outcome].mlflow)

    def running_runs(self, experiment_id: str, role: Role) -> list[Run]:
        """Runs of a role still marked RUNNING (live, or left so by a process that died)."""
        return self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{role}' and attributes.status = 'RUNNING'",
            max_results=10_000,
        )


def _write(data: bytes, file: BinaryIO) -> None:
    file.write(data)


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested settings → dotted MLflow parameter names (`train.epochs`)."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: str(value)}


def now() -> int:
    """MLflow's timestamps: milliseconds since the epoch."""
    return int(time.time() * 1000)
