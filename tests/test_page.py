from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pytest
from optuna.trial import TrialState

from tuner import spec
from tuner.errors import ConfigError
from tuner.records import BASELINE_ATTR, PRUNED_AT_ATTR, REASON_ATTR, RUN_ID_ATTR
from tuner.study import page
from tuner.study.refit import Refit
from tuner.study.setup import Created, create, open_study

from .conftest import TINY_STUDY
from .test_pictures import _trial

if TYPE_CHECKING:
    from matplotlib.figure import Figure

POINT = {"depth": "vgg11", "batch_norm": True, "dropout": 0.1, "optimizer": "sgd",
         "lr_sgd": 0.05, "weight_decay": 5e-4, "augment": "flip"}  # fmt: skip


def _with_point(t: optuna.trial.FrozenTrial, **changes: object) -> optuna.trial.FrozenTrial:
    """Trial `t` at a point of the tiny study's space (`POINT`, with `changes`)."""
    params = {**POINT, **changes}
    dists = open_dists()
    t.params = params
    t.distributions = {k: dists[k] for k in params}
    return t


def open_dists() -> dict:
    from tuner.space import conditional_distributions, fixed_distributions

    space = spec.parse(TINY_STUDY).space
    found = dict(fixed_distributions(space))
    for sub in conditional_distributions(space).values():
        found.update(sub)
    return found


def test_failure_modes_name_diverged_stuck_pruned_and_failed_trials() -> None:
    trials = [
        _with_point(_trial(0, TrialState.COMPLETE, 0, 9, "h:1", [0.3, 0.5])),
        _with_point(
            _trial(1, TrialState.PRUNED, 0, 9, "h:1", [], **{REASON_ATTR: "diverged"}), lr_sgd=0.5
        ),  # fmt: skip
        _with_point(_trial(2, TrialState.COMPLETE, 0, 9, "h:1", [0.1, 0.11]), batch_norm=False),
        _with_point(_trial(3, TrialState.PRUNED, 0, 9, "h:1", [0.12], **{PRUNED_AT_ATTR: "1"})),
        _with_point(_trial(4, TrialState.PRUNED, 0, 9, "h:1", [0.11, 0.1])),
        _with_point(_trial(5, TrialState.FAIL, 0, 9, "h:1", [], **{REASON_ATTR: "out_of_memory"})),
    ]
    found = page.failure_modes(trials)
    assert (
        found[0].startswith("1 trial diverged") and "trial 1 (vgg11-bn sgd lr=5.00e-01" in found[0]
    )
    # trained two epochs or completed, and no better than chance; trial 3 only had one epoch
    assert found[1].startswith("2 trials stuck at chance") and "trial 2 " in found[1]
    assert "trial 4 " in found[1] and "trial 3 " not in found[1]
    assert found[2] == "2 trials pruned: 1 at epoch 1, 1 at epoch 2"
    assert found[3] == "1 failed: out_of_memory"


def test_importances_come_with_their_spread_and_include_the_learning_rate() -> None:
    study = optuna.create_study(direction="maximize")
    for n in range(12):
        lr = 10 ** -(1 + n % 3)  # 0.1, 0.01, 0.001
        study.add_trial(_with_point(_trial(n, TrialState.COMPLETE, 0, 1, "h:1", [1 - lr]),
                                    lr_sgd=lr, dropout=0.1 + 0.01 * n))  # fmt: skip
    found = {i.name: i for i in page.importances(study)}
    assert "lr" in found, "the learning rate, drawn per optimizer, is one parameter here"
    assert found["lr"].value == max(i.value for i in found.values())
    assert all(i.spread >= 0 for i in found.values())
    assert any(i.spread > 0 for i in found.values()), "resamples differ"


def _bars(figure: Figure) -> list[tuple[str, float, float]]:
    """The bars of a horizontal bar chart, bottom to top: (name, length, error bar's half)."""
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    try:
        axes = figure.axes[0]
        names = [t.get_text() for t in axes.get_yticklabels()]
        lengths = [b.get_width() for b in axes.patches]
        (errors,) = [c for c in axes.containers if isinstance(c, ErrorbarContainer)]
        lines = errors.lines[2][0].get_segments()  # one from value - sd to value + sd per bar
        halves = [(line[1][0] - line[0][0]) / 2 for line in lines]
    finally:
        plt.close(figure)
    return [(n, round(v, 6), round(h, 6)) for n, v, h in zip(names, lengths, halves, strict=True)]


def test_the_importance_chart_draws_the_tables_spread_as_error_bars() -> None:
    found = (page.Importance("lr", 0.6, 0.55, 0.2), page.Importance("dropout", 0.1, 0.12, 0.05),
             page.Importance("depth", 0.3, 0.3, 0.0))  # fmt: skip
    # the most important on top, each with the importance and spread of the table
    assert _bars(page.importance_chart(found)) == [
        ("dropout", 0.1, 0.05), ("depth", 0.3, 0.0), ("lr", 0.6, 0.2)
    ]  # fmt: skip
    with pytest.raises(ValueError):  # no importances yet: `pictures` leaves the chart out
        page.importance_chart(())


def _small_study(made: spec.StudySpec, stores) -> Created:
    """Study `made` in `stores`, with four trials: three completed (one a baseline), one
    pruned."""
    created = create(made, stores)
    study = open_study(made, stores)
    for n, (state, values) in enumerate([
        (TrialState.COMPLETE, [0.3, 0.5]), (TrialState.COMPLETE, [0.2, 0.42]),
        (TrialState.PRUNED, [0.11]), (TrialState.COMPLETE, [0.1, 0.105]),
    ]):  # fmt: skip
        t = _with_point(_trial(n, state, n, n + 1, "h:1", values), dropout=0.1 * (n + 1))
        t.user_attrs[RUN_ID_ATTR] = f"run{n}"
        if n == 1:
            t.user_attrs[BASELINE_ATTR] = "known-good"
        study.add_trial(t)
    return created


@pytest.fixture(scope="module")
def small_page(stores, tracker) -> tuple[page.Page, dict[str, Callable[[], Figure]]]:
    """The page of `_small_study`, gathered once; and what it drew in place of Optuna's
    pictures."""
    instead: dict[str, Callable[[], Figure]] = {}
    drawn = page.pictures

    def spy(study: optuna.Study, **options: Any) -> list:
        instead.update(options.get("instead") or {})
        return drawn(study, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(page, "pictures", spy)
        made = spec.parse({**TINY_STUDY, "name": "report-html"})
        _small_study(made, stores)
        gathered = page.gather(made, stores, tracker, top=3)
    return gathered, instead


class _Shown(HTMLParser):
    """What a browser shows of a page: its text outside <code> and <pre>, and its tables as
    rows of (tag, text) cells."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.prose: list[str] = []
        self.tables: list[list[list[tuple[str, str]]]] = []
        self.code = 0  # inside this many <code> or <pre>
        self.cell: tuple[str, list[str]] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("code", "pre"):
            self.code += 1
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("th", "td"):
            self.cell = (tag, [])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("code", "pre"):
            self.code -= 1
        elif tag in ("th", "td") and self.cell is not None:
            self.tables[-1][-1].append((self.cell[0], "".join(self.cell[1]).strip()))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell[1].append(data)
        if not self.code:
            self.prose.append(data)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_html_page_shows_code_as_code_and_every_table_under_its_header(small_page) -> None:
    found, _ = small_page
    ensemble = page.Ensemble("ens1", "ensemble-greedy-top3", 0.52, None, 0.5, "0:0.67 1:0.33")
    later = dataclasses.replace(found, ensembles=(ensemble,), refits=(Refit(0, 0, "refit0", 5),))
    for shown, code in [(found, "tuner ensemble report-html --top 3"), (later, "tuner refit")]:
        text = page.to_html(shown)
        assert f"<code>{code}</code>" in text
        seen = _Shown(text)
        prose = "\n".join(seen.prose)
        # no markdown left to read: code spans, bold, links, escaped pipes, headings
        assert not re.search(r"`|\*\*|\]\(|\\\||^#", prose, re.MULTILINE), prose
        assert len(seen.tables) >= 4
        for head, *body in seen.tables:
            assert all(tag == "th" and cell for tag, cell in head), f"a header row: {head}"
            assert body and all(tag == "td" for row in body for tag, _ in row)
    # the markdown keeps its code spans
    assert "`tuner ensemble report-html --top 3`" in page.to_markdown(found, "pictures")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_reports_importance_chart_shows_the_tables_spread_as_error_bars(small_page) -> None:
    found, instead = small_page
    assert found.importances and "param_importances" in [p.name for p in found.pictures]
    assert "param_importances" in instead, "the report draws its own, not Optuna's"
    shown = {name: (value, half) for name, value, half in _bars(instead["param_importances"]())}
    assert shown == {i.name: (round(i.value, 6), round(i.spread, 6)) for i in found.importances}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_report_is_one_page_written_locally_and_logged_to_the_parent(
    stores, tracker, tmp_path: Path
) -> None:
    made = spec.parse({**TINY_STUDY, "name": "report-page"})
    runs = _small_study(made, stores).runs

    written = page.make_report(made, stores, tmp_path / "out", top=3)
    text = written.html.read_text()
    assert written.html == tmp_path / "out" / "report-page.html"
    # self-contained: every picture inlined, nothing fetched from elsewhere
    assert len(re.findall(r"src='data:image/png;base64,", text)) >= 5
    assert not re.search(r"(src|href)=['\"]https?:", text)
    for heading in ["Best 3 trials", "Baselines (from the study file)", "What mattered",
                    "Failure modes seen", "Ensembles", "Provenance"]:  # fmt: skip
        assert f"<h2>{heading}</h2>" in text
    assert "[baseline known-good]" in text and "0.5000" in text
    assert "1 trial stuck at chance" in text and "1 trial pruned: 1 at epoch 1" in text
    md = written.markdown.read_text()
    assert "| 0 | complete | 0.5000 |" in md
    for link in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (written.markdown.parent / link).is_file()
    logged = {a.path for a in tracker.client.list_artifacts(runs.parent_run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/pictures"} <= logged


@pytest.mark.parametrize("where", ["under a file", "a folder none can make"])
def test_a_report_folder_that_cannot_be_written_is_one_line_before_drawing(
    stores, tmp_path: Path, where: str
) -> None:
    made = spec.parse({**TINY_STUDY, "name": f"report-{where.split()[1]}"})
    create(made, stores)
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "reports" if where == "under a file" else Path("/proc/reports")
    drawn = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(page, "gather", lambda *args: drawn.append(args))
        with pytest.raises(ConfigError, match=f"^--out {out}: cannot write there \\("):
            page.make_report(made, stores, out)
    assert not drawn, "refused before the study was read and its pictures drawn"


def test_a_page_that_is_a_link_is_written_through(tmp_path: Path) -> None:
    """reports/NAME.html linked to where a server serves it stays a link, the served file new."""
    served = tmp_path / "www" / "tiny.html"
    served.parent.mkdir()
    served.write_text("old")
    link = tmp_path / "reports" / "tiny.html"
    link.parent.mkdir()
    link.symlink_to(served)
    page._replace(link, b"new")
    assert link.is_symlink() and served.read_text() == "new"
    assert sorted(p.name for p in served.parent.iterdir()) == ["tiny.html"]
