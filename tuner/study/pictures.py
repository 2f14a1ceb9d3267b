"""The study's pictures: Optuna's plots (history, importances, intermediate values, parallel
coordinates, slice) and a timeline of the workers, drawn with matplotlib as PNG, and as one
interactive HTML page where plotly is installed. `Painter` logs them on the parent run while the
study runs, again whenever trials have finished since the last time."""

from __future__ import annotations

import datetime
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.records import RECORDS, WORKER_ATTR, Outcome

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tuner.tracking import Tracker

log = logging.getLogger(__name__)

FOLDER = "plots"  # on the parent run
PAINT_EVERY = 60.0  # seconds between looks at the study while it runs (drawn only if it grew)
# a painting that took t seconds is followed by none for SHARE * t: drawing takes at most
# 1/SHARE of the run's time (on a 2-core CPU, 2-6 s of drawing slowed the epoch beside it)
SHARE = 20
# what each picture shows, in the order the report shows them
CAPTIONS = {
    "optimization_history": "Validation accuracy of each completed trial, and the best so far.",
    "param_importances": "How much of the spread in validation accuracy each parameter "
    "explains (Optuna's default evaluator); in the report, error bars give its spread over "
    "resamples of the trials.",
    "intermediate_values": "Validation accuracy after each epoch, for every trial that "
    "reported one: pruned trials stop early.",
    "parallel_coordinate": "Completed trials across the parameters (log-scale parameters on "
    "log axes); the colour is the validation accuracy.",
    "slice": "Validation accuracy against each parameter, completed trials.",
    "timeline": "Each worker's trials over time, by how they ended: packing and pruning.",
}
COLOURS = {
    Outcome.COMPLETE: "#2e7d32",
    Outcome.PRUNED: "#f9a825",
    Outcome.DIVERGED: "#6a1b9a",
    Outcome.FAILED: "#c62828",
    Outcome.RUNNING: "#90a4ae",
}


@dataclass(frozen=True)
class Picture:
    name: str  # file stem: plots/NAME.png
    png: bytes


def _makers(
    study: optuna.Study, plots: Any, timeline: Callable[[], Any]
) -> list[tuple[str, Callable[[], Any]]]:
    """The pictures the study has the trials for, in `CAPTIONS` order: `plots` is Optuna's
    `visualization.matplotlib` or `visualization` (plotly), `timeline` draws the workers."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    makers: dict[str, Callable[[], Any]] = {}
    if complete:
        makers["optimization_history"] = lambda: plots.plot_optimization_history(study)
    if len(complete) >= 2:
        flat = one_lr_view(study)
        makers["param_importances"] = lambda: plots.plot_param_importances(flat)
        makers["parallel_coordinate"] = lambda: plots.plot_parallel_coordinate(flat)
        makers["slice"] = lambda: plots.plot_slice(flat)
    # Optuna draws the epochs of complete, pruned and running trials only (else it logs)
    shown = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    if any(t.intermediate_values for t in trials if t.state in shown):
        makers["intermediate_values"] = lambda: plots.plot_intermediate_values(study)
    if any(t.datetime_complete for t in trials):
        makers["timeline"] = timeline
    return [(name, makers[name]) for name in CAPTIONS if name in makers]


def in_memory(trials: Sequence[FrozenTrial], name: str | None = None) -> optuna.Study:
    """`trials` in a study of their own, in memory, for Optuna's plots and importances."""
    view = optuna.create_study(study_name=name, direction="maximize")
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and said so each time
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        view.set_metric_names(["val_acc"])
    view.add_trials(trials)
    return view


def one_lr_view(study: optuna.Study) -> optuna.Study:
    """The completed trials in a study of their own (in memory), with one `lr` parameter
    (`space.with_one_lr`)."""
    from tuner.space import with_one_lr

    return in_memory(with_one_lr(study.get_trials(deepcopy=False)), study.study_name)


def _drawn(name: str, make: Callable[[], Any]) -> Any | None:
    """`make()`, or None where the study has too few distinct points for it yet; Optuna's
    warnings (small studies, experimental APIs) are not the user's concern."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make()
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        log.debug("no %s picture yet: %s", name, exc)
        return None


def figures(
    study: optuna.Study, instead: Mapping[str, Callable[[], Figure]] | None = None
) -> Iterator[tuple[str, Figure]]:
    """Each picture the study has the trials for, as a matplotlib figure (closed by the caller);
    `instead` draws some of them in place of Optuna (the report's importances, with spread)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    trials = study.get_trials(deepcopy=False)
    for name, make in _makers(study, ovm, lambda: worker_timeline(trials)):
        drawn = _drawn(name, (instead or {}).get(name, make))
        if drawn is None:
            continue
        figure = drawn if hasattr(drawn, "savefig") else _figure_of(drawn)
        if name == "parallel_coordinate":  # Optuna's default size crowds 8 axes together
            figure.set_size_inches(12, 5.5)
        yield name, figure


def _figure_of(axes: Any) -> Figure:
    """Optuna returns Axes, or an array of them (slice): the figure they are drawn in."""
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def pictures(
    study: optuna.Study, instead: Mapping[str, Callable[[], Figure]] | None = None
) -> list[Picture]:
    """Every picture the study has the trials for, as PNG bytes (`instead`: as `figures`)."""
    import matplotlib.pyplot as plt

    drawn = []
    for name, figure in figures(study, instead):
        try:
            buffer = io.BytesIO()
            # Optuna's plots put long parameter names outside the axes: keep them in the picture
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            drawn.append(Picture(name, buffer.getvalue()))
        finally:
            plt.close(figure)
    return drawn


def worker_timeline(trials: Sequence[FrozenTrial]) -> Figure:
    """One row per worker process (`host:pid`), one bar per trial from its start to its end,
    coloured by outcome: how well the workers were packed, and how early pruning ended trials."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    started = sorted(
        (t for t in trials if t.datetime_start is not None),
        key=lambda t: (t.datetime_start, t.number),
    )
    origin = started[0].datetime_start
    now = datetime.datetime.now()
    rows: dict[str, int] = {}
    free: dict[str, datetime.datetime] = {}  # when each worker's trial before ended
    figure, axes = plt.subplots(figsize=(10, 1.2 + 0.45 * len({_worker(t) for t in started})))
    seen: set[Outcome] = set()
    for t in started:
        worker = _worker(t)
        row = rows.setdefault(worker, len(rows))
        # on its worker a trial's bar starts no earlier than the one before it ended
        begin_at = max(t.datetime_start, free.get(worker, t.datetime_start))
        end_at = t.datetime_complete or now
        free[worker] = end_at
        outcome = Outcome.of(t)
        seen.add(outcome)
        begin = (begin_at - origin).total_seconds()
        width = max((end_at - begin_at).total_seconds(), 0.01)
        axes.barh(row, width, left=begin, height=0.6, color=COLOURS.get(outcome, "#90a4ae"),
                  edgecolor="white")  # fmt: skip
        axes.text(begin, row, f" {t.number}", va="center", ha="left", fontsize=7)
    axes.set_yticks(range(len(rows)), list(rows))
    axes.invert_yaxis()
    axes.set_xlabel("seconds since the first trial started")
    axes.set_title("Trials by worker")
    handles = [Patch(color=COLOURS[o], label=RECORDS[o].word) for o in COLOURS if o in seen]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return figure


def _worker(trial: FrozenTrial) -> str:
    """`host:pid`, as a person reads it (the worker id also carries the process's start time)."""
    return ":".join(str(trial.user_attrs.get(WORKER_ATTR, "?")).split(":")[:2])


def interactive(study: optuna.Study) -> str | None:
    """The same pictures as one self-contained HTML page of plotly charts (plotly.js inlined
    once), or None where plotly is not installed."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        return None
    from optuna import visualization as ov

    parts, inline = [], True
    for name, make in _makers(study, ov, lambda: ov.plot_timeline(study)):
        figure = _drawn(name, make)
        if figure is None:
            continue
        chart = figure.to_html(full_html=False, include_plotlyjs=inline)
        inline = False  # plotly.js once, in the first chart
        parts.append(f"<h2>{name.replace('_', ' ')}</h2><p>{CAPTIONS[name]}</p>{chart}")
    if not parts:
        return None
    title = f"Study {study.study_name}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body style='font-family:sans-serif;max-width:1100px;margin:auto'><h1>{title}</h1>"
        + "".join(parts)
        + "</body></html>"
    )


def paint(study: optuna.Study, tracker: Tracker, parent_run_id: str) -> list[Picture]:
    """Draw the study's pictures and log them on its parent run (`plots/`), replacing those
    drawn before; what was drawn."""
    drawn = pictures(study)
    files = {f"{FOLDER}/{picture.name}.png": picture.png for picture in drawn}
    page = interactive(study)
    if page is not None:
        files[f"{FOLDER}/interactive.html"] = page.encode()
    tracker.log_files(parent_run_id, files)
    return drawn


class Painter:
    """Paints the parent run's pictures while a study runs: at most every `PAINT_EVERY`
    seconds, if trials finished since the last painting, and never more than 1/`SHARE` of the
    time (the pictures of a long study stay current; a short one is drawn at its end)."""

    def __init__(self, study: optuna.Study, tracker: Tracker, parent_run_id: str) -> None:
        self.study, self.tracker, self.parent_run_id = study, tracker, parent_run_id
        self.painted_at: int | None = None  # finished trials when last painted
        self.not_before = 0.0  # time.monotonic() before which it does not paint again

    def finished(self) -> int:
        return sum(t.state.is_finished() for t in self.study.get_trials(deepcopy=False))

    def __call__(self) -> None:
        if time.monotonic() < self.not_before:
            return
        finished = self.finished()
        if finished == self.painted_at:
            return
        started = time.monotonic()
        paint(self.study, self.tracker, self.parent_run_id)
        self.painted_at = finished
        self.not_before = time.monotonic() + SHARE * (time.monotonic() - started)
