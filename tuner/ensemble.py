"""Top-k ensembles: the best completed trials by validation accuracy, their saved weights, and
their averaged softmax on the CIFAR-10 test split."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from optuna.trial import FrozenTrial
from sklearn.metrics import ConfusionMatrixDisplay, log_loss

from tuner import _optuna, interrupts
from tuner.data import CLASSES, Split, load_test, resolve_data_dir
from tuner.errors import DataError, TunerError
from tuner.models import VGG, load_state
from tuner.records import RUN_ID_ATTR, Outcome
from tuner.spec import StudySpec
from tuner.stores import Stores
from tuner.study.recovery import reconcile_runs
from tuner.study.setup import open_study, study_runs
from tuner.tracking import Tracker
from tuner.train import predict

log = logging.getLogger(__name__)
CLASS_NAMES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Member:
    trial_number: int
    run_id: str
    val_acc: float
    test_acc: float


@dataclass(frozen=True)
class EnsembleReport:
    top_k: int  # as asked; `members` may be fewer
    members: tuple[Member, ...]
    test_images: int
    accuracy: float
    log_loss: float
    run_id: str | None = None  # the ensemble's MLflow run, once logged

    @property
    def best_member_accuracy(self) -> float:
        return max(m.test_acc for m in self.members)

    @property
    def gain(self) -> float:
        """Ensemble accuracy minus the best member's, in accuracy points (0..1)."""
        return self.accuracy - self.best_member_accuracy


def load_weights(path: Path, model: VGG, name: str | None = None) -> None:
    """Plain tensors only (weights_only=True); a damaged file is named in the error."""
    try:
        load_state(model, torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        kind = type(exc).__name__
        raise DataError(f"{name or path}: cannot load these weights ({kind}: {exc})") from None


def load_member(tracker: Tracker, trial_number: int, run_id: str, into: Path) -> VGG:
    """A trial's network with its saved weights, checked against the SHA-256 recorded when
    they were written before a byte of them is unpickled."""
    arch, weights = tracker.fetch_trial_weights(run_id, trial_number, into)
    model = VGG(arch)
    load_weights(weights, model, f"{weights.name} of trial {trial_number} (MLflow run {run_id})")
    return model


def evaluate_top(
    spec: StudySpec, stores: Stores, *, k: int, data_dir: Path | None, device: torch.device
) -> EnsembleReport:
    """Score the `k` best completed trials together on the test split; log it as a run."""
    study = open_study(spec, stores)
    chosen = _optuna.best_trials(study, k, RUN_ID_ATTR)  # as `ranked(…, with_run=True)`
    if not chosen:
        raise TunerError(
            f"study {spec.name!r} has no completed trials to ensemble; "
            f"run `tuner study run {spec.name}` first"
        )
    if len(chosen) < k:
        log.info(f"warning: only {len(chosen)} completed trials; ensembling those")
    test = load_test(resolve_data_dir(data_dir), spec.data, spec.seed, device)
    tracker, runs = Tracker(stores), study_runs(study)
    tracker.check_study_runs(runs, spec.name)
    reconcile_runs(study, tracker, runs)  # what an ensemble or worker that died left RUNNING
    run_id = None
    try:
        # a signal that comes while the run is made waits until `run_id` is known (it is
        # raised at the end of the block, inside this `try`), so that the run is closed
        with interrupts.shielded():
            run_id = tracker.start_ensemble(runs, k)
        log.info(f"scoring {len(chosen)} members on {len(test)} test images on {device} …")
        members, probs = score_members(tracker, chosen, test, spec.train.batch_size * 2)
        labels = test.labels.cpu().numpy()
        mean = np.mean(probs, axis=0)
        accuracy = float((mean.argmax(1) == labels).mean())
        loss = float(log_loss(labels, np.clip(mean, 1e-12, 1), labels=list(range(CLASSES))))
        report = EnsembleReport(k, tuple(members), len(test), accuracy, loss, run_id)
        log_ensemble(tracker, report, labels, mean.argmax(1))
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt)
        why = interrupts.reason(exc) if stopped else f"error: {type(exc).__name__}: {exc}"
        if run_id is not None:
            with contextlib.suppress(Exception):  # the error that ended it is the one to report
                end = tracker.end_run
                end(run_id, Outcome.KILLED if stopped else Outcome.FAILED, why[:500])
        raise
    return report


def score_members(
    tracker: Tracker, chosen: list[FrozenTrial], test: Split, batch_size: int
) -> tuple[list[Member], list[np.ndarray]]:
    """Each member's softmax on the test split, and its own test accuracy."""
    labels = test.labels.cpu().numpy()
    members, probs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in chosen:
            run_id = trial.user_attrs[RUN_ID_ATTR]
            model = load_member(tracker, trial.number, run_id, Path(tmp)).to(test.images.device)
            p = predict(model, test.images, batch_size).cpu().numpy()
            probs.append(p)
            acc = float((p.argmax(1) == labels).mean())
            members.append(Member(trial.number, run_id, float(trial.value), acc))
            log.info(f"  trial {trial.number}: test_acc {acc:.4f}")
    return members, probs


def log_ensemble(
    tracker: Tracker, report: EnsembleReport, labels: np.ndarray, predicted: np.ndarray
) -> None:
    """The ensemble's results on its MLflow run (under the study's parent), with its
    confusion matrix; the run ends FINISHED."""
    import matplotlib.pyplot as plt

    members = report.members
    figure = confusion_figure(labels, predicted, len(members), report.accuracy)
    try:
        tracker.finish_ensemble(
            report.run_id,
            [m.run_id for m in members],
            params={
                "top_k": report.top_k,
                "members": len(members),
                "test_images": report.test_images,
                "trial_numbers": ",".join(str(m.trial_number) for m in members),
            },
            metrics={
                "test_acc": report.accuracy,
                "test_log_loss": report.log_loss,
                "best_member_test_acc": report.best_member_accuracy,
                "gain_over_best_member": report.gain,
                **{f"member_{m.trial_number}_test_acc": m.test_acc for m in members},
            },
            member_table=member_table(members),
            figure=figure,
        )
    finally:
        plt.close(figure)


def member_table(members: tuple[Member, ...] | list[Member]) -> str:
    """The members, one line each (printed, and kept as the run's members.txt)."""
    rows = [f"{'trial':>6}  {'val_acc':>8}  {'test_acc':>8}  mlflow run"]
    rows += [
        f"{m.trial_number:>6}  {m.val_acc:>8.4f}  {m.test_acc:>8.4f}  {m.run_id}" for m in members
    ]
    return "\n".join(rows)


def confusion_figure(labels: np.ndarray, predicted: np.ndarray, k: int, accuracy: float) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay.from_predictions(
        labels,
        predicted,
        labels=list(range(CLASSES)),
        display_labels=CLASS_NAMES,
        ax=axes,
        colorbar=False,
        xticks_rotation=45,
    )
    axes.set_title(f"top-{k} ensemble, test accuracy {accuracy:.4f}")
    figure.tight_layout()
    return figure
