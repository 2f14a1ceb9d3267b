"""`tuner ensemble`: choose members and weights from every completed trial's saved validation
predictions (`selection`), score the ensemble and the best single trial on the test split,
with and without flip test-time augmentation, and log it as a run under the study's parent.

With `--from refit`, the members are the refits of those trials (retrained on train +
validation): their weights and temperatures come from the search trials they refit, the only
predictions on images none of them trained on."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import optuna
import torch
from sklearn.metrics import ConfusionMatrixDisplay

from tuner import interrupts
from tuner.console import counted
from tuner.data import CIFAR10_INFO, Split, load_test, load_val, resolve_data_dir
from tuner.ensemble.selection import (
    Selection,
    accuracy,
    average,
    fit_temperature,
    greedy,
    log_loss,
    mixture,
    tempered,
)
from tuner.errors import DataError, TunerError
from tuner.models import build, load_state
from tuner.records import ENSEMBLE_PREFIX, RUN_ID_ATTR, Outcome
from tuner.spec import StudySpec
from tuner.stores import Stores, local_folder
from tuner.study.recovery import reconcile_runs
from tuner.study.refit import completed_refits
from tuner.study.setup import open_study, study_runs
from tuner.study.summary import ranked
from tuner.tracking import VAL_PREDICTIONS, Tracker
from tuner.tracking.artifacts import ArtifactError
from tuner.train import predict

log = logging.getLogger(__name__)
PREDICTIONS = Path(VAL_PREDICTIONS).name  # as messages name the file

Method = Literal["greedy", "average"]
Source = Literal["search", "refit"]
Augmentation = Literal["none", "flip"]


@dataclass(frozen=True)
class EnsembleRequest:
    """What the user asked of one `tuner ensemble`."""

    k: int = 5  # at most this many distinct members
    method: Method = "greedy"
    source: Source = "search"  # the search trials' weights, or their refits'
    tta: Augmentation = "none"  # flip: also score each image with its mirror image
    temperature: bool = False  # fit a temperature per member on the validation images

    @property
    def run_name(self) -> str:
        """`ensemble-greedy-top5` (`-refit`, `-flip`, `-temp` where asked)."""
        parts = [f"ensemble-{self.method}-top{self.k}"]
        parts += ["refit"] * (self.source == "refit") + ["flip"] * (self.tta == "flip")
        return "-".join(parts + ["temp"] * self.temperature)


@dataclass(frozen=True)
class Candidate:
    """A completed trial that may join: its saved validation predictions, and the run whose
    weights are scored (its own, or its refit's)."""

    trial_number: int
    run_id: str
    val_acc: float  # the search trial's, as Optuna holds it
    val_probs: np.ndarray = field(repr=False)
    refit_epochs: int | None = None


@dataclass(frozen=True)
class Scores:
    accuracy: float
    log_loss: float

    @classmethod
    def of(cls, probs: np.ndarray, labels: np.ndarray) -> Scores:
        return cls(accuracy(probs, labels), log_loss(probs, labels))


@dataclass(frozen=True)
class Member:
    trial_number: int
    run_id: str  # whose weights were scored
    weight: float  # 0 for the best single trial when greedy left it out
    val_acc: float
    test_acc: float
    test_acc_tta: float | None = None
    temperature: float = 1.0
    refit_epochs: int | None = None


@dataclass(frozen=True)
class EnsembleReport:
    request: EnsembleRequest
    members: tuple[Member, ...]  # heaviest first
    candidates: int  # completed trials it chose from (with `--from refit`: refits)
    val_images: int
    test_images: int
    val: Scores  # the images the weights were chosen on: optimistic
    test: Scores
    single: Member  # the candidate with the best validation accuracy, alone
    single_val: Scores
    single_test: Scores
    val_tta: Scores | None = None  # with flip TTA (search members only: a refit trained on it)
    test_tta: Scores | None = None
    single_test_tta: Scores | None = None
    run_id: str | None = None  # the ensemble's MLflow run, once logged
    study: str = ""  # its name, for the commands the report suggests
    left_out: int = 0  # completed trials (or refits) without usable validation predictions
    # the ensemble's test predictions (with flip where asked) and the labels: its confusion
    predicted: np.ndarray | None = field(default=None, repr=False, compare=False)
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    class_names: tuple[str, ...] = CIFAR10_INFO.class_names  # the data set's, in label order

    @property
    def top_k(self) -> int:
        return self.request.k

    @property
    def accuracy(self) -> float:
        return self.test.accuracy

    @property
    def gain(self) -> float:
        """Ensemble test accuracy minus the best single trial's, as a fraction (0.012: what
        MLflow holds; people are shown percentage points, +1.20)."""
        return self.test.accuracy - self.single_test.accuracy


def load_weights(path: Path, model: torch.nn.Module, name: str | None = None) -> None:
    """Plain tensors only (weights_only=True); a damaged file is named in the error."""
    try:
        load_state(model, torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        kind = type(exc).__name__
        raise DataError(f"{name or path}: cannot load these weights ({kind}: {exc})") from None


def load_member(tracker: Tracker, trial_number: int, run_id: str, into: Path) -> torch.nn.Module:
    """A trial's network with its saved weights, checked against the SHA-256 recorded when
    they were written before a byte of them is unpickled."""
    arch, weights = tracker.fetch_trial_weights(run_id, trial_number, into)
    model = build(arch)
    load_weights(weights, model, f"{weights.name} of trial {trial_number} (MLflow run {run_id})")
    return model


def evaluate(
    spec: StudySpec,
    stores: Stores,
    request: EnsembleRequest,
    *,
    data_dir: Path | None,
    device: torch.device,
) -> EnsembleReport:
    """Choose, score and log one ensemble of the study's completed trials (or their refits)."""
    if request.temperature and request.source == "refit":
        raise TunerError(
            "--temperature cannot be fitted for refits: they trained on the validation images "
            "(fit it on the search trials, without --from refit)"
        )
    study = open_study(spec, stores)
    tracker, runs = Tracker(stores), study_runs(study)
    tracker.check_study_runs(runs, spec.name)
    reconcile_runs(study, tracker, runs)  # what an ensemble or worker that died left RUNNING
    root = resolve_data_dir(data_dir, spec.data)
    val = load_val(root, spec.data, spec.seed, device)
    labels = val.labels.cpu().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        pool, left = candidates(spec, stores, study, tracker, request.source, labels, Path(tmp),
                                val.info.classes)  # fmt: skip
        if not pool:
            where = tracker.artifact_location(runs.experiment_id)
            raise TunerError(_nothing_to_ensemble(spec.name, request.source, left, where))
        test = load_test(root, spec.data, spec.seed, device)
        run_id = None
        try:
            # a signal that comes while the run is made waits until `run_id` is known (it is
            # raised at the end of the block, inside this `try`), so that the run is closed
            with interrupts.shielded():
                run_id = tracker.start_ensemble(runs, request.run_name)
            batch = spec.train.batch_size * 2  # as training validates
            report = _score(tracker, pool, request, val, test, Path(tmp), batch)
            report = dataclasses.replace(
                report, run_id=run_id, study=spec.name, left_out=len(left)
            )
            log_ensemble(tracker, report)
            _note_on_study(study, report)
        except BaseException as exc:
            stopped = isinstance(exc, KeyboardInterrupt)
            why = interrupts.reason(exc) if stopped else f"error: {type(exc).__name__}: {exc}"
            if run_id is not None:
                with contextlib.suppress(Exception):  # the error that ended it is the one
                    outcome = Outcome.KILLED if stopped else Outcome.FAILED
                    tracker.end_run(run_id, outcome, why[:500])
            raise
    return report


def _note_on_study(study: optuna.Study, report: EnsembleReport) -> None:
    """What `study status` shows of the ensemble (a study attribute: status reads Optuna's
    tables, not MLflow)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S")
    study.set_user_attr(
        f"{ENSEMBLE_PREFIX}{when}:{report.run_id}",
        {
            "name": report.request.run_name,
            "members": [m.trial_number for m in report.members],
            "test_acc": report.accuracy,
            "gain_points": round(100 * report.gain, 2),
            "run_id": report.run_id,
        },
    )


def evaluate_top(
    spec: StudySpec, stores: Stores, *, k: int, data_dir: Path | None, device: torch.device
) -> EnsembleReport:
    """The top-`k` average of the search trials (`tuner ensemble --method average`)."""
    request = EnsembleRequest(k=k, method="average")
    return evaluate(spec, stores, request, data_dir=data_dir, device=device)


@dataclass(frozen=True)
class LeftOut:
    """Completed trials, by number, whose saved validation predictions cannot be used."""

    missing: tuple[int, ...] = ()  # not in the artifact store
    damaged: tuple[int, ...] = ()  # not as written, or not probabilities
    elsewhere: tuple[int, ...] = ()  # on other validation images: the settings changed since

    def __len__(self) -> int:
        return len(self.missing) + len(self.damaged) + len(self.elsewhere)


def _nothing_to_ensemble(name: str, source: Source, left: LeftOut, where: str) -> str:
    """Why no trial can join, and what to do: no completed trials (or refits), or completed
    trials whose saved predictions are missing or unusable."""
    more = f"run new trials (`tuner study run {name} --trials N`)"
    if left.missing and len(left.missing) == len(left):
        trials = counted(len(left), "completed trial")
        return (
            f"study {name!r} has {trials} ({_numbers(left.missing)}), but their artifacts are "
            f"missing from {_shown_location(where)}: restore that folder, or {more}"
        )
    if left:
        return (
            f"study {name!r} has {counted(len(left), 'completed trial')}, but none with usable "
            f"validation predictions (see the warnings above): restore the files, or {more}"
        )
    if source == "refit":
        return (
            f"study {name!r} has no completed refits to ensemble; run "
            f"`tuner refit {name} --top K --epochs E` first"
        )
    return (
        f"study {name!r} has no completed trials to ensemble; run `tuner study run {name}` first"
    )


def _shown_location(uri: str) -> str:
    """An artifact location as a user finds it: a local folder as its path."""
    folder = local_folder(uri)
    return uri if folder is None else str(folder)


def candidates(
    spec: StudySpec,
    stores: Stores,
    study: optuna.Study,
    tracker: Tracker,
    source: Source,
    labels: np.ndarray,
    into: Path,
    classes: int = 10,
) -> tuple[list[Candidate], LeftOut]:
    """Every completed trial whose validation predictions are sound and on today's validation
    images (for `refit`: every one with a completed refit), in trial order, and those left
    out, each named on the console."""
    trials = ranked(study.get_trials(deepcopy=False), with_run=True)
    refits = completed_refits(spec, stores) if source == "refit" else {}
    if source == "refit":
        trials = [t for t in trials if t.number in refits]
    found, missing, damaged, elsewhere = [], [], [], []
    for trial in sorted(trials, key=lambda t: t.number):
        run_id = trial.user_attrs[RUN_ID_ATTR]
        try:
            probs, saved = checked_predictions(tracker, run_id, into, classes)
        except ArtifactError as exc:
            (missing if exc.missing else damaged).append(trial.number)
            if not exc.missing:
                _warn([trial.number], f"{PREDICTIONS} is damaged ({exc.why})")
            continue
        except TunerError:  # the store itself: the command's error, not this trial's
            raise
        except Exception as exc:  # its run gone from MLflow, an artifact store that answers oddly
            damaged.append(trial.number)
            _warn([trial.number], f"{PREDICTIONS} cannot be read ({type(exc).__name__}: {exc})")
            continue
        if saved.shape != labels.shape or not np.array_equal(saved, labels):
            elsewhere.append(trial.number)
            continue
        refit = refits.get(trial.number)
        found.append(
            Candidate(
                trial.number,
                refit.run_id if refit else run_id,
                float(trial.value),
                probs.astype(np.float32),
                refit.epochs if refit else None,
            )
        )
    _warn(missing, f"{PREDICTIONS} is missing from the artifact store")
    _warn(elsewhere, f"{PREDICTIONS} is on other validation images (its data settings changed)")
    return found, LeftOut(tuple(missing), tuple(damaged), tuple(elsewhere))


def _warn(numbers: list[int], what: str) -> None:
    """One line for the trials left out for one reason."""
    if numbers:
        trials = "trial" if len(numbers) == 1 else "trials"
        log.info(f"warning: {trials} {_numbers(numbers)}: {what}; left out")


def _numbers(numbers: Sequence[int]) -> str:
    """`0, 1, 2`: the first ten, then `…`."""
    return ", ".join(map(str, numbers[:10])) + (" …" if len(numbers) > 10 else "")


def checked_predictions(
    tracker: Tracker, run_id: str, into: Path, classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """A trial's saved validation predictions and labels, as written (the recorded SHA-256)
    and sound: N×classes probabilities, finite, in 0..1, each row summing to 1, and N labels; an
    `ArtifactError` saying what is wrong."""
    probs, labels = tracker.fetch_val_predictions(run_id, into)
    why = _unsound(probs, labels, classes)
    if why is not None:
        raise ArtifactError(f"{PREDICTIONS} of MLflow run {run_id}: {why}", why)
    return probs, labels


def _unsound(probs: np.ndarray, labels: np.ndarray, classes: int = 10) -> str | None:
    """What is wrong with saved predictions of a data set of `classes` classes, in a few
    words; None when nothing is."""
    if probs.ndim != 2 or probs.shape[1] != classes or len(probs) == 0:
        return f"probabilities of shape {probs.shape}, expected N×{classes}"
    if probs.dtype.kind != "f":
        return f"probabilities are {probs.dtype}, expected floats"
    if labels.shape != (len(probs),):
        return f"probabilities of {len(probs)} images but labels of shape {labels.shape}"
    bad = int(np.count_nonzero(~np.isfinite(probs)))
    if bad:
        return f"{bad} probabilities are not finite"
    if probs.min() < 0 or probs.max() > 1:
        return f"probabilities from {probs.min():g} to {probs.max():g}, expected 0..1"
    sums = probs.sum(axis=1, dtype=np.float64)
    worst = int(np.abs(sums - 1).argmax())
    if abs(sums[worst] - 1) > 1e-3:  # a float32 softmax sums to 1 within 1e-6
        return f"the probabilities of image {worst} sum to {sums[worst]:.4g}, expected 1"
    return None


def select(pool: list[Candidate], request: EnsembleRequest, labels: np.ndarray) -> Selection:
    probs = [c.val_probs for c in pool]
    if request.method == "average":
        return average([c.val_acc for c in pool], request.k, probs, labels)
    return greedy(probs, labels, request.k)


def _score(
    tracker: Tracker,
    pool: list[Candidate],
    request: EnsembleRequest,
    val: Split,
    test: Split,
    into: Path,
    batch: int,
) -> EnsembleReport:
    """Temperatures, selection, then each member's (and the best single trial's) test
    predictions, plain and flipped; the mixtures' scores."""
    val_labels, test_labels = val.labels.cpu().numpy(), test.labels.cpu().numpy()
    temps = [fit_temperature(c.val_probs, val_labels) if request.temperature else 1.0
             for c in pool]  # fmt: skip
    pool = [Candidate(c.trial_number, c.run_id, c.val_acc, tempered(c.val_probs, t),
                      c.refit_epochs) for c, t in zip(pool, temps, strict=True)]  # fmt: skip
    chosen = select(pool, request, val_labels)
    best = min(range(len(pool)), key=lambda i: (-pool[i].val_acc, pool[i].trial_number))
    scored = list(dict.fromkeys([*chosen.members, best]))
    flip, search = request.tta == "flip", request.source == "search"
    chose = counted(len(pool), "trial" if search else "refit")
    how = f"{counted(len(scored), 'network')} on {len(test)} test images"
    how += ", and flipped" if flip else ""
    log.info(f"{request.method} selection from {chose}; scoring {how} …")
    outputs = {}
    for i in scored:
        c = pool[i]
        model = load_member(tracker, c.trial_number, c.run_id, into).to(test.images.device)
        mirrored_val = val if flip and search else None
        outputs[i] = _predict(model, test, mirrored_val, flip, temps[i], batch)
        del model
        acc = accuracy(outputs[i].test, test_labels)
        log.info(f"  trial {c.trial_number}{' (refit)' if not search else ''}: test_acc {acc:.4f}")
    weights = chosen.weight_of()

    def member(i: int) -> Member:
        c, out = pool[i], outputs[i]
        tta = accuracy(out.test_flip, test_labels) if out.test_flip is not None else None
        return Member(c.trial_number, c.run_id, weights.get(i, 0.0), c.val_acc,
                      accuracy(out.test, test_labels), tta, temps[i],
                      c.refit_epochs)  # fmt: skip

    def mixed(part: str, indices: list[int], w: list[float], y: np.ndarray) -> Scores | None:
        probs = [getattr(outputs[i], part) for i in indices]
        if any(p is None for p in probs):
            return None
        return Scores.of(mixture(probs, w), y)

    members, w = list(chosen.members), list(chosen.weights)
    val_plain = mixture([pool[i].val_probs for i in members], w)
    final = mixture([outputs[i].test_flip if flip else outputs[i].test for i in members], w)
    return EnsembleReport(
        request=request,
        members=tuple(member(i) for i in members),
        candidates=len(pool),
        val_images=len(val),
        test_images=len(test),
        val=Scores.of(val_plain, val_labels),
        test=mixed("test", members, w, test_labels),  # type: ignore[arg-type]
        single=member(best),
        single_val=Scores.of(pool[best].val_probs, val_labels),
        single_test=mixed("test", [best], [1.0], test_labels),  # type: ignore[arg-type]
        val_tta=mixed("val_flip", members, w, val_labels),
        test_tta=mixed("test_flip", members, w, test_labels),
        single_test_tta=mixed("test_flip", [best], [1.0], test_labels),
        predicted=final.argmax(1),
        labels=test_labels,
        class_names=test.info.class_names,
    )


@dataclass(frozen=True)
class Outputs:
    """One network's class probabilities (after its temperature)."""

    test: np.ndarray
    test_flip: np.ndarray | None = None  # the mean of the image's and its mirror's
    val_flip: np.ndarray | None = None


def _predict(
    model: torch.nn.Module,
    test: Split,
    val: Split | None,
    flip: bool,
    temperature: float,
    batch: int,
) -> Outputs:
    """`batch`: images per forward pass (training validates at twice its batch)."""

    def mirrored(split: Split, plain: torch.Tensor | None = None) -> np.ndarray:
        """The mean of the two views' softmax, then the member's temperature."""
        plain = predict(model, split.images, batch, split.info) if plain is None else plain
        both = (plain + predict(model, split.images.flip(3), batch, split.info)) / 2
        return tempered(both.cpu().numpy(), temperature)

    plain = predict(model, test.images, batch, test.info)
    return Outputs(
        test=tempered(plain.cpu().numpy(), temperature),
        test_flip=mirrored(test, plain) if flip else None,
        val_flip=mirrored(val) if val is not None else None,
    )


def log_ensemble(tracker: Tracker, report: EnsembleReport) -> None:
    """The ensemble's results on its MLflow run (under the study's parent), with its members'
    table and its confusion matrix; the run ends FINISHED."""
    import matplotlib.pyplot as plt

    members = report.members
    metrics = {
        "val_acc": report.val.accuracy,
        "val_log_loss": report.val.log_loss,
        "test_acc": report.test.accuracy,
        "test_log_loss": report.test.log_loss,
        "best_single_test_acc": report.single_test.accuracy,
        "gain_over_best_single": report.gain,
        **{f"member_{m.trial_number}_test_acc": m.test_acc for m in members},
        **{f"member_{m.trial_number}_weight": m.weight for m in members},
    }
    for name, scores in (("val", report.val_tta), ("test", report.test_tta)):
        if scores is not None:
            metrics[f"{name}_acc_flip"] = scores.accuracy
            metrics[f"{name}_log_loss_flip"] = scores.log_loss
    if report.single_test_tta is not None:
        metrics["best_single_test_acc_flip"] = report.single_test_tta.accuracy
    figure = confusion_figure(report)
    try:
        _finish(tracker, report, metrics, figure)
    finally:
        plt.close(figure)


def _finish(tracker: Tracker, report: EnsembleReport, metrics: dict, figure: object) -> None:
    r, members = report.request, report.members
    tracker.finish_ensemble(
        report.run_id,
        [m.run_id for m in members],
        params={
            "method": r.method,
            "top_k": r.k,
            "source": r.source,
            "tta": r.tta,
            "temperature": r.temperature,
            "candidates": report.candidates,
            "members": len(members),
            "val_images": report.val_images,
            "test_images": report.test_images,
            "trial_numbers": ",".join(str(m.trial_number) for m in members),
            "weights": ",".join(f"{m.weight:.3f}" for m in members),
            "best_single_trial": report.single.trial_number,
        },
        metrics=metrics,
        member_table=member_table(report),
        figure=figure,
    )


def member_table(report: EnsembleReport) -> str:
    """The members, one line each, and the best single trial below them (printed, and kept
    as the run's members.txt)."""
    flip = report.test_tta is not None
    head = f"{'trial':>6}  {'weight':>6}  {'temp':>5}  {'val_acc':>8}  {'test_acc':>8}"
    head += f"  {'+flip':>8}" * flip + "  mlflow run"

    def row(m: Member, note: str = "") -> str:
        line = f"{m.trial_number:>6}  {m.weight:>6.3f}  {m.temperature:>5.2f}  {m.val_acc:>8.4f}"
        line += f"  {m.test_acc:>8.4f}"
        if flip:
            line += f"  {m.test_acc_tta:>8.4f}" if m.test_acc_tta is not None else f"  {'–':>8}"
        return f"{line}  {m.run_id}{note}"

    rows = [head, *(row(m) for m in report.members)]
    if all(m.trial_number != report.single.trial_number for m in report.members):
        rows.append(row(report.single, "  (best single trial; not a member)"))
    return "\n".join(rows)


def confusion_figure(report: EnsembleReport) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report.class_names
    many = len(names) > 20  # CIFAR-100's: a matrix of colour, without a number in each cell
    figure, axes = plt.subplots(figsize=(12, 11) if many else (7, 6))
    ConfusionMatrixDisplay.from_predictions(
        report.labels,
        report.predicted,
        labels=list(range(len(names))),
        display_labels=None if many else names,
        include_values=not many,
        ax=axes,
        colorbar=many,
        xticks_rotation=45,
    )
    flip = " with flip" if report.request.tta == "flip" else ""
    accuracy = report.test_tta.accuracy if report.test_tta is not None else report.accuracy
    axes.set_title(f"{report.request.run_name}: test accuracy{flip} {accuracy:.4f}")
    figure.tight_layout()
    return figure
