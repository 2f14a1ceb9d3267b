from __future__ import annotations

import datetime

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from tuner.records import REASON_ATTR, WORKER_ATTR
from tuner.study import pictures

T0 = datetime.datetime(2026, 11, 24, 8, 0, 0)
DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-4, 1.0, log=True),
    "depth": CategoricalDistribution(["vgg11", "vgg16"]),
}


def _trial(number: int, state: TrialState, start: float, end: float | None, worker: str,
           values: list[float], **attrs: str) -> FrozenTrial:  # fmt: skip
    """A trial that ran from `start` to `end` seconds (None: still running) on `worker`,
    reporting `values` after each epoch."""
    return FrozenTrial(
        number=number,
        trial_id=number,
        state=state,
        value=values[-1] if state == TrialState.COMPLETE else None,
        values=None,
        datetime_start=T0 + datetime.timedelta(seconds=start),
        datetime_complete=None if end is None else T0 + datetime.timedelta(seconds=end),
        params={"lr": 10 ** -(1 + number % 3), "depth": ["vgg11", "vgg16"][number % 2]},
        distributions=DISTRIBUTIONS,
        user_attrs={WORKER_ATTR: worker, **attrs},
        system_attrs={},
        intermediate_values=dict(enumerate(values, start=1)),
    )


@pytest.fixture
def study() -> optuna.Study:
    """Two workers: complete, pruned, diverged, failed and running trials; trial 2 was asked
    for (started in Optuna) while trial 0 still trained on the same worker."""
    made = optuna.create_study(direction="maximize")
    made.add_trials([
        _trial(0, TrialState.COMPLETE, 0, 10, "h:1", [0.3, 0.5]),
        _trial(1, TrialState.COMPLETE, 0, 12, "h:2", [0.2, 0.4]),
        _trial(2, TrialState.PRUNED, 5, 14, "h:1", [0.1]),
        _trial(3, TrialState.PRUNED, 12, 13, "h:2", [0.1], **{REASON_ATTR: "diverged"}),
        _trial(4, TrialState.FAIL, 14, 15, "h:1", []),
        _trial(5, TrialState.COMPLETE, 13, 20, "h:2", [0.3, 0.45]),
        _trial(6, TrialState.RUNNING, 15, None, "h:1", [0.2]),
    ])  # fmt: skip
    return made


def test_every_picture_is_a_png_once_the_study_has_the_trials(study: optuna.Study) -> None:
    drawn = pictures.pictures(study)
    assert [p.name for p in drawn] == list(pictures.CAPTIONS)
    assert all(p.png.startswith(b"\x89PNG") and len(p.png) > 5000 for p in drawn)


def test_a_study_with_one_completed_trial_has_the_pictures_one_trial_can_show() -> None:
    made = optuna.create_study(direction="maximize")
    made.add_trial(_trial(0, TrialState.COMPLETE, 0, 10, "h:1", [0.3, 0.5]))
    names = [p.name for p in pictures.pictures(made)]
    assert names == ["optimization_history", "intermediate_values", "timeline"]
    assert pictures.pictures(optuna.create_study()) == []


def test_the_timeline_draws_a_trial_asked_ahead_from_when_its_worker_was_free(
    study: optuna.Study,
) -> None:
    import matplotlib.pyplot as plt

    figure = pictures.worker_timeline(study.get_trials())
    try:
        axes = figure.axes[0]
        bars = {round(b.get_x(), 3): round(b.get_width(), 3) for b in axes.patches}
        labels = [t.get_text() for t in axes.get_yticklabels()]
        legend = [t.get_text() for t in axes.get_legend().get_texts()]
    finally:
        plt.close(figure)
    assert labels == ["h:1", "h:2"]
    # trial 2: started in Optuna at 5 s, while trial 0 trained until 10 s: drawn from 10 s
    assert bars[10.0] == 4.0
    assert bars[0.0] in (10.0, 12.0) and 5.0 not in bars
    assert set(legend) == {"complete", "pruned", "diverged", "failed", "running"}


def test_the_interactive_page_holds_each_chart_and_plotly_once(study: optuna.Study) -> None:
    pytest.importorskip("plotly")
    page = pictures.interactive(study)
    assert page is not None and page.startswith("<!doctype html>")
    for name in pictures.CAPTIONS:
        assert f"<h2>{name.replace('_', ' ')}</h2>" in page
    assert page.count("plotly.js v") == 1, "plotly.js inlined once, not once per chart"


def test_paint_logs_every_picture_on_the_parent_run(study: optuna.Study) -> None:
    logged: list[str] = []

    class Tracker:
        def log_files(self, run_id: str, files: dict[str, bytes]) -> None:
            assert run_id == "parent" and all(files.values())
            logged.extend(files)

    drawn = pictures.paint(study, Tracker(), "parent")  # type: ignore[arg-type]
    assert {f"plots/{p.name}.png" for p in drawn} <= set(logged)
    assert "plots/timeline.png" in logged


def test_the_painter_draws_again_only_when_trials_have_finished_and_time_allows(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    painted: list[int] = []

    def paint(s: optuna.Study, t: object, r: str) -> None:  # a painting that takes 1 s
        clock[0] += 1.0
        painted.append(len(s.trials))

    monkeypatch.setattr(pictures.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(pictures, "paint", paint)
    painter = pictures.Painter(study, None, "parent")  # type: ignore[arg-type]
    painter()
    clock[0] += 100
    painter()  # nothing finished since: nothing drawn
    assert painted == [7]
    study.add_trial(_trial(7, TrialState.COMPLETE, 20, 30, "h:2", [0.5, 0.6]))
    painter()
    assert painted == [7, 8]
    study.add_trial(_trial(8, TrialState.COMPLETE, 30, 40, "h:2", [0.5, 0.6]))
    clock[0] += pictures.SHARE - 1  # not yet: a 1 s painting buys SHARE s of training
    painter()
    assert painted == [7, 8]
    clock[0] += 1
    painter()
    assert painted == [7, 8, 9]
