"""Top-k ensembles: the best completed trials by validation accuracy, their saved weights, and
their averaged softmax on the CIFAR-10 test split."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from optuna.trial import FrozenTrial, TrialState
from sklearn.metrics import ConfusionMatrixDisplay, log_loss

from tuner.data import CLASSES, load_test
from tuner.errors import DataError, TunerError
from tuner.models import build_vgg
from tuner.runner import EXPERIMENT_ATTR, PARENT_ATTR, load_study
from tuner.spec import StudySpec
from tuner.stores import Stores
from tuner.tracking import ARCH, WEIGHTS, WEIGHTS_SHA256, Tracker, sha256
from tuner.train import predict
from tuner.trials import RUN_ID_ATTR

CLASS_NAMES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Member:
    trial_number: int
    run_id: str
    val_acc: float
    test_acc: float


@dataclass(frozen=True)
class EnsembleReport:
    members: tuple[Member, ...]
    test_images: int
    accuracy: float
    log_loss: float
    best_member_accuracy: float
    run_id: str

    @property
    def gain(self) -> float:
        """Ensemble accuracy minus the best member's, in accuracy points (0..1)."""
        return self.accuracy - self.best_member_accuracy


def top_trials(trials: list[FrozenTrial], k: int) -> list[FrozenTrial]:
    complete = [
        t for t in trials if t.state == TrialState.COMPLETE and RUN_ID_ATTR in t.user_attrs
    ]
    return sorted(complete, key=lambda t: (-t.value, t.number))[:k]


def load_weights(path: Path, model: torch.nn.Module, name: str | None = None) -> None:
    """Plain tensors only (weights_only=True); a damaged file is named in the error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        kind = type(exc).__name__
        raise DataError(f"{name or path}: cannot load these weights ({kind}: {exc})") from None


def load_member(tracker: Tracker, trial_number: int, run_id: str, into: Path) -> torch.nn.Module:
    """A trial's network with its saved weights, checked against the SHA-256 recorded when
    they were written before a byte of them is unpickled."""
    where = tracker.artifact_location(run_id, WEIGHTS)
    arch = json.loads(tracker.download(run_id, ARCH, into / run_id).read_text())
    model = build_vgg(**arch)
    try:
        weights = tracker.download(run_id, WEIGHTS, into / run_id)
    except Exception as exc:
        raise DataError(
            f"{where}: the weights of trial {trial_number} cannot be read ({exc})"
        ) from None
    expected = tracker.tag(run_id, WEIGHTS_SHA256)
    if expected is not None and sha256(weights) != expected:
        raise DataError(
            f"{where}: the weights of trial {trial_number} (MLflow run {run_id}) do not match "
            "the checksum recorded when they were written: the file was changed or damaged. "
            "Not loading it; restore the file or ensemble fewer trials."
        )
    load_weights(weights, model, f"{where} (trial {trial_number})")
    return model


def evaluate_top(
    spec: StudySpec,
    stores: Stores,
    *,
    k: int,
    data_dir: Path,
    device: torch.device,
    say: Callable[[str], None] = print,
) -> EnsembleReport:
    study = load_study(spec, stores)
    chosen = top_trials(study.get_trials(deepcopy=False), k)
    if not chosen:
        raise TunerError(
            f"study {spec.name!r} has no completed trials to ensemble; "
            f"run `tuner study run {spec.name}` first"
        )
    if len(chosen) < k:
        say(f"warning: only {len(chosen)} completed trials; ensembling those")
    test = load_test(data_dir, spec.data, spec.seed, device)
    labels = test.labels.cpu().numpy()
    say(f"scoring {len(chosen)} members on {len(test)} test images on {device} …")
    tracker = Tracker(stores)
    probs, members = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in chosen:
            run_id = trial.user_attrs[RUN_ID_ATTR]
            model = load_member(tracker, trial.number, run_id, Path(tmp)).to(device)
            p = predict(model, test.images, spec.train.batch_size * 2).cpu().numpy()
            probs.append(p)
            acc = float((p.argmax(1) == labels).mean())
            members.append(Member(trial.number, run_id, float(trial.value), acc))
            say(f"  trial {trial.number}: test_acc {acc:.4f}")
    mean = np.mean(probs, axis=0)
    predicted = mean.argmax(1)
    accuracy = float((predicted == labels).mean())
    loss = float(log_loss(labels, np.clip(mean, 1e-12, 1), labels=list(range(CLASSES))))
    best_member = max(m.test_acc for m in members)
    figure = confusion_figure(labels, predicted, len(members), accuracy)
    run_id = tracker.log_ensemble(
        study.user_attrs[EXPERIMENT_ATTR],
        study.user_attrs[PARENT_ATTR],
        [m.run_id for m in members],
        params={"top_k": k, "members": len(members), "test_images": len(test),
                "trial_numbers": ",".join(str(m.trial_number) for m in members)},
        metrics={
            "test_acc": accuracy,
            "test_log_loss": loss,
            "best_member_test_acc": best_member,
            "gain_over_best_member": accuracy - best_member,
            **{f"member_{m.trial_number}_test_acc": m.test_acc for m in members},
        },
        member_table=member_table(members),
        figure=figure,
    )  # fmt: skip
    import matplotlib.pyplot as plt

    plt.close(figure)
    return EnsembleReport(tuple(members), len(test), accuracy, loss, best_member, run_id)


def member_table(members: list[Member] | tuple[Member, ...]) -> str:
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
