"""`tuner report NAME`: the study on one page, HTML (self-contained: the pictures inlined) and
markdown (the pictures beside it), written locally and logged to the parent run. It holds the
best trials and the baselines, the pictures, what mattered (importances, with their spread over
resamples of the trials), the failure modes seen, the ensembles scored, and the provenance."""

from __future__ import annotations

import base64
import datetime
import html
import json
import logging
import re
import statistics
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.console import counted
from tuner.errors import ConfigError, TunerError
from tuner.records import (
    BASELINE_ATTR,
    GIT_COMMIT_TAG,
    PRUNED_AT_ATTR,
    REASON_ATTR,
    RECORDS,
    ROLE_TAG,
    RUN_ID_ATTR,
    TORCH_VERSION_TAG,
    VERSION_TAG,
    Outcome,
    Role,
)
from tuner.space import decode, with_one_lr
from tuner.spec import StudySpec
from tuner.stores import cannot_write, shown
from tuner.study.pictures import CAPTIONS, Picture, in_memory, pictures
from tuner.study.refit import Refit, completed_refits
from tuner.study.setup import open_study, study_runs
from tuner.study.summary import counts, ranked

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.entities import Run

    from tuner.stores import Stores
    from tuner.tracking import Tracker

log = logging.getLogger(__name__)

FOLDER = "report"  # on the parent run
STUCK_MARGIN = 0.05  # a trial whose best validation accuracy stays within this of chance
RESAMPLES = 10  # bootstrap resamples of the completed trials for the importances' spread


@dataclass(frozen=True)
class Row:
    """One trial as the page shows it."""

    number: int
    outcome: str
    objective: float | None  # what Optuna holds (the last reported value, if pruned)
    best_val_acc: float | None
    epochs: int
    what: str  # `vgg16-bn sgd lr=… wd=… dropout=… aug=…`
    baseline: str | None
    run_id: str | None


@dataclass(frozen=True)
class Importance:
    name: str
    value: float  # on all completed trials
    mean: float  # over resamples
    spread: float  # their standard deviation


@dataclass(frozen=True)
class Ensemble:
    run_id: str
    name: str  # `ensemble-greedy-top5-flip`: how it was chosen
    test_acc: float
    test_acc_flip: float | None
    best_single_test_acc: float | None  # the trial with the best validation accuracy, alone
    members: str  # `12:0.40 3:0.20` (trial:weight), or the trial numbers of an older run


@dataclass(frozen=True)
class Page:
    name: str
    made: str  # when, UTC
    counts: dict[str, int]
    best: tuple[Row, ...]
    baselines: tuple[Row, ...]
    importances: tuple[Importance, ...]
    failures: tuple[str, ...]  # one sentence each
    ensembles: tuple[Ensemble, ...]
    refits: tuple[Refit, ...]  # completed, by the search trial they retrain
    pictures: tuple[Picture, ...]
    provenance: dict[str, str]
    spec: dict[str, Any]
    parent_run_id: str  # where the page is logged


def _row(trial: FrozenTrial) -> Row:
    values = [v for _, v in sorted(trial.intermediate_values.items())]
    finite = [v for v in values if v == v]  # NaN is not a score
    try:
        what = decode(trial.params).describe()
    except KeyError:  # a trial that failed before its point was drawn
        what = "(no point drawn)"
    return Row(
        number=trial.number,
        outcome=RECORDS[Outcome.of(trial)].word,
        objective=trial.value if trial.value is not None else (values[-1] if values else None),
        best_val_acc=max(finite) if finite else None,
        epochs=len(values),
        what=what,
        baseline=trial.user_attrs.get(BASELINE_ATTR),
        run_id=trial.user_attrs.get(RUN_ID_ATTR),
    )


def importances(study: optuna.Study, seed: int = 0) -> tuple[Importance, ...]:
    """Optuna's parameter importances on the completed trials (one `lr`), and their mean and
    spread over `RESAMPLES` bootstrap resamples of those trials: with few trials, a ranking
    that a resample turns over is noise."""
    flat = with_one_lr(study.get_trials(deepcopy=False))
    if len(flat) < 3:
        return ()
    with warnings.catch_warnings():  # PED-ANOVA warns when a few trials tie
        warnings.simplefilter("ignore", UserWarning)
        return _importances(flat, seed)


def _importances(flat: list[FrozenTrial], seed: int) -> tuple[Importance, ...]:
    import random

    whole = optuna.importance.get_param_importances(in_memory(flat))
    draws: dict[str, list[float]] = {name: [] for name in whole}
    rng = random.Random(seed)
    for _ in range(RESAMPLES):
        try:
            found = optuna.importance.get_param_importances(
                in_memory([rng.choice(flat) for _ in flat])
            )
        except (ValueError, RuntimeError, ZeroDivisionError):  # a resample with one point
            continue
        for name in draws:
            draws[name].append(found.get(name, 0.0))
    return tuple(
        Importance(name, value, statistics.fmean(draws[name] or [value]),
                   statistics.pstdev(draws[name]) if len(draws[name]) > 1 else 0.0)
        for name, value in whole.items()
    )  # fmt: skip


def importance_chart(found: Sequence[Importance]) -> Figure:
    """The importances as bars, the most important on top, each with its spread over the
    resamples as an error bar: the numbers of the page's table, drawn."""
    import matplotlib.pyplot as plt

    if not found:  # as Optuna's plots do with too few trials: `pictures` leaves it out
        raise ValueError("no importances: fewer than 3 completed trials")
    shown = sorted(found, key=lambda i: i.value)  # barh draws the first at the bottom
    figure, axes = plt.subplots(figsize=(8, 1.5 + 0.4 * len(shown)))
    names, values = [i.name for i in shown], [i.value for i in shown]
    axes.barh(names, values, xerr=[i.spread for i in shown], capsize=4, ecolor="#222")
    axes.set_xlim(left=0)  # an importance is never negative; a wide spread's bar is cut at 0
    axes.set_xlabel(f"importance (Optuna's default evaluator); error bars: ± sd over "
                    f"{RESAMPLES} resamples")  # fmt: skip
    axes.set_title("Hyperparameter importances")
    return figure


def failure_modes(trials: list[FrozenTrial], chance: float | None = 0.1) -> tuple[str, ...]:
    """The ways trials failed, one sentence each: diverged, stuck at `chance` (the accuracy of
    a guess: one in as many as the classes; None: not known), pruned at epoch k, failed for
    a reason."""
    found = []
    by = {t.number: _row(t) for t in trials}
    diverged = [t.number for t in trials if Outcome.of(t) is Outcome.DIVERGED]
    if diverged:
        found.append(f"{_count(diverged)} diverged (the loss became NaN or infinite): "
                     + _examples(diverged, by))  # fmt: skip
    # trained long enough to learn something (completed, or 2 epochs and more), yet did not
    stuck = [
        t.number for t in trials
        if Outcome.of(t) in (Outcome.COMPLETE, Outcome.PRUNED)
        and (t.state == TrialState.COMPLETE or by[t.number].epochs >= 2)
        and chance is not None and (by[t.number].best_val_acc or 0.0) <= chance + STUCK_MARGIN
    ]  # fmt: skip
    if stuck:
        found.append(f"{_count(stuck)} stuck at chance (best validation accuracy ≤ "
                     f"{(chance or 0) + STUCK_MARGIN:.2f}): " + _examples(stuck, by))  # fmt: skip
    pruned = Counter(
        int(t.user_attrs.get(PRUNED_AT_ATTR, len(t.intermediate_values)))
        for t in trials
        if Outcome.of(t) is Outcome.PRUNED
    )
    if pruned:
        at = ", ".join(f"{n} at epoch {k}" for k, n in sorted(pruned.items()))
        found.append(f"{_count(list(pruned.elements()))} pruned: {at}")
    reasons = Counter(
        str(t.user_attrs.get(REASON_ATTR, "unknown"))
        for t in trials
        if Outcome.of(t) is Outcome.FAILED
    )
    for reason, n in reasons.most_common():
        found.append(f"{n} failed: {reason}")
    return tuple(found)


def _count(numbers: list[int]) -> str:
    return counted(len(numbers), "trial")


def _examples(numbers: list[int], by: dict[int, Row], shown: int = 5) -> str:
    listed = "; ".join(f"trial {n} ({by[n].what})" for n in numbers[:shown])
    return listed + (f"; and {len(numbers) - shown} more" if len(numbers) > shown else "")


def _ensemble(run: Run) -> Ensemble:
    metrics, params = run.data.metrics, run.data.params
    numbers = params.get("trial_numbers", "")
    weights = params.get("weights")
    members = numbers.replace(",", " ")
    if weights:
        pairs = zip(numbers.split(","), weights.split(","), strict=False)
        members = " ".join(f"{n}:{float(w):.2f}" for n, w in pairs)
    return Ensemble(
        run.info.run_id,
        run.info.run_name or run.info.run_id,
        metrics.get("test_acc", float("nan")),
        metrics.get("test_acc_flip"),
        metrics.get("best_single_test_acc", metrics.get("best_member_test_acc")),
        members,
    )


def gather(spec: StudySpec, stores: Stores, tracker: Tracker, top: int = 10) -> Page:
    """Everything the page shows, read from the stores."""
    import importlib.metadata

    import mlflow

    study = open_study(spec, stores)
    runs = study_runs(study)
    tracker.check_study_runs(runs, spec.name)  # the stores belong together, or one line says so
    trials = study.get_trials(deepcopy=False)
    parent = tracker.client.get_run(runs.parent_run_id)
    ensembles = tracker.client.search_runs(
        [runs.experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = '{Role.ENSEMBLE}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    tags = parent.data.tags
    found = importances(study, spec.seed)
    from tuner.data import KNOWN  # the known data sets' classes: chance is one in as many

    # a loader's classes are not known without its arrays: no trial is called stuck there
    chance = 1 / KNOWN[spec.data.set].classes if spec.data.set else None
    # the chart shows the table's numbers (Optuna's own has no spread); none without a table
    chart = {"param_importances": lambda: importance_chart(found)}
    return Page(
        name=spec.name,
        made=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        counts={RECORDS[o].word: n for o, n in counts(trials).items()},
        best=tuple(_row(t) for t in ranked(trials, top)),
        baselines=tuple(_row(t) for t in trials if BASELINE_ATTR in t.user_attrs),
        importances=found,
        failures=failure_modes([t for t in trials if t.state != TrialState.WAITING], chance),
        ensembles=tuple(_ensemble(r) for r in ensembles),
        refits=tuple(sorted(completed_refits(spec, stores).values(), key=lambda r: r.source)),
        pictures=tuple(pictures(study, instead=chart)),
        provenance={
            "tuner": tags.get(VERSION_TAG, "?"),
            "git commit": tags.get(GIT_COMMIT_TAG, "(not in a git checkout)"),
            "torch (study created with)": tags.get(TORCH_VERSION_TAG, "?"),
            "torch / optuna / mlflow (report)": (
                f"{importlib.metadata.version('torch')} / {optuna.__version__} / "
                f"{mlflow.__version__}"
            ),
            "Optuna storage": shown(stores.optuna_url),
            "MLflow tracking": shown(stores.tracking_uri),
            "MLflow experiment / parent run": f"{runs.experiment_id} / {runs.parent_run_id}",
            "study file": spec.source,
        },
        spec=spec.to_dict(),
        parent_run_id=runs.parent_run_id,
    )


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _table(rows: tuple[Row, ...]) -> tuple[list[str], list[list[str]]]:
    head = ["trial", "state", "objective", "best val_acc", "epochs", "what", "MLflow run"]
    body = [
        [str(r.number), r.outcome, _num(r.objective), _num(r.best_val_acc), str(r.epochs),
         r.what + (f" [baseline {r.baseline}]" if r.baseline else ""), r.run_id or "–"]
        for r in rows
    ]  # fmt: skip
    return head, body


def _sections(page: Page) -> list[tuple[str, list[str], list[list[str]] | None]]:
    """The page as (title, paragraphs, table rows with a header first, or None)."""
    counted = ", ".join(f"{n} {word}" for word, n in page.counts.items() if n)
    best = page.best[0] if page.best else None
    summary = [f"{sum(page.counts.values())} trials: {counted or 'none yet'}."]
    if best is not None:
        summary.append(f"Best: trial {best.number}, validation accuracy {_num(best.objective)} "
                       f"({best.what}).")  # fmt: skip
    sections: list[tuple[str, list[str], list[list[str]] | None]] = [("Summary", summary, None)]
    head, body = _table(page.best)
    sections.append((f"Best {len(page.best)} trials", [], [head, *body] if body else None))
    if page.baselines:
        head, body = _table(page.baselines)
        note = []
        if best is not None:
            top = max((r.objective or 0.0) for r in page.baselines)
            note = [f"The best baseline reached {_num(top)}; the study's best "
                    f"{_num(best.objective)} ({(best.objective or 0) - top:+.4f})."]  # fmt: skip
        sections.append(("Baselines (from the study file)", note, [head, *body]))
    if page.importances:
        rows = [["parameter", "importance", f"mean of {RESAMPLES} resamples", "spread (sd)"]]
        rows += [[i.name, f"{i.value:.3f}", f"{i.mean:.3f}", f"± {i.spread:.3f}"]
                 for i in page.importances]  # fmt: skip
        note = ["A parameter whose spread is as large as its importance is not known to "
                "matter yet: the study has too few trials to tell."]  # fmt: skip
        sections.append(("What mattered", note, rows))
    sections.append(("Failure modes seen", list(page.failures) or ["None."], None))
    if page.ensembles:
        rows = [["run", "test accuracy", "with flip", "best single trial", "gain",
                 "members (trial:weight)"]]  # fmt: skip
        for e in page.ensembles:
            gain = None if e.best_single_test_acc is None else e.test_acc - e.best_single_test_acc
            rows.append([e.name, _num(e.test_acc), _num(e.test_acc_flip),
                         _num(e.best_single_test_acc),
                         "–" if gain is None else f"{gain * 100:+.2f} points",
                         e.members])  # fmt: skip
        note = ["Best single trial: the one with the best validation accuracy, on the same test "
                "images; gain: the ensemble's test accuracy over it, in percentage points. "
                "Members and weights were chosen on the validation images."]  # fmt: skip
        sections.append(("Ensembles", note, rows))
    else:
        k = max(2, min(5, len(page.best)))
        hint = f"None yet: `tuner ensemble {page.name} --top {k}`."
        sections.append(("Ensembles", [hint], None))
    if page.refits:
        rows = [["trial", "epochs", "refit run"]]
        rows += [[str(r.source), str(r.epochs), r.run_id] for r in page.refits]
        note = [f"Trained again on train + validation (`tuner refit`); "
                f"`tuner ensemble {page.name} --from refit` scores them."]  # fmt: skip
        sections.append(("Refits", note, rows))
    rows = [["what", "value"]] + [[k, v] for k, v in page.provenance.items()]
    sections.append(("Provenance", [f"Made {page.made}."], rows))
    return sections


CODE_SPAN = re.compile(r"`([^`]+)`")  # markdown's inline code, the one markup `_sections` uses


def _inline(text: str) -> str:
    """A paragraph or cell of `_sections` as HTML: escaped, its code spans as <code>."""
    return CODE_SPAN.sub(r"<code>\1</code>", html.escape(text))


def to_html(page: Page) -> str:
    """One self-contained page: the pictures are inlined as data, no file beside it."""
    e = html.escape
    parts = [f"<h1>Study {e(page.name)}</h1>"]
    for title, paragraphs, rows in _sections(page):
        parts.append(f"<h2>{e(title)}</h2>")
        parts += [f"<p>{_inline(p)}</p>" for p in paragraphs]
        if rows:
            head, *body = rows
            parts.append(f"<table><tr>{''.join(f'<th>{_inline(h)}</th>' for h in head)}</tr>")
            parts += [f"<tr>{''.join(f'<td>{_inline(c)}</td>' for c in r)}</tr>" for r in body]
            parts.append("</table>")
        if title.startswith("Best"):
            for p in page.pictures:
                data = base64.b64encode(p.png).decode()
                img = f"<img alt='{e(p.name)}' src='data:image/png;base64,{data}'>"
                caption = f"<figcaption>{_inline(CAPTIONS[p.name])}</figcaption>"
                parts.append(f"<figure>{img}{caption}</figure>")
    spec = e(json.dumps(page.spec, indent=2))
    parts.append(
        f"<details><summary>The study file, resolved</summary><pre>{spec}</pre></details>"
    )
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:left;font-size:90%}img{max-width:100%}"
             "figcaption{color:#555;font-size:90%}")  # fmt: skip
    head = f"<meta charset='utf-8'><title>Study {e(page.name)}</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(page: Page, pictures_dir: str) -> str:
    """The same page in markdown; the pictures are files in `pictures_dir` (relative)."""
    lines = [f"# Study {page.name}", ""]
    for title, paragraphs, rows in _sections(page):
        lines += [f"## {title}", ""]
        for p in paragraphs:
            lines += [p, ""]
        if rows:
            head, *body = rows
            lines.append("| " + " | ".join(_cell(h) for h in head) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in body]
            lines.append("")
        if title.startswith("Best"):
            for p in page.pictures:
                lines += [f"![{p.name}]({pictures_dir}/{p.name}.png)", "", f"*{CAPTIONS[p.name]}*",
                          ""]  # fmt: skip
    return "\n".join(lines)


@dataclass(frozen=True)
class Written:
    html: Path
    markdown: Path
    logged_to: str  # the parent run


def make_report(spec: StudySpec, stores: Stores, out: Path, top: int = 10) -> Written:
    """Gather the page, write `out/NAME.html`, `out/NAME.md` and its pictures, and log the
    same on the parent run under `report/`."""
    from tuner.tracking import Tracker

    tracker = Tracker(stores)
    writable_folder(out)  # before the minutes of reading and drawing, not after them
    log.info(f"reading study {spec.name!r}, drawing its pictures and importances …")
    page = gather(spec, stores, tracker, top)
    folder = f"{spec.name}-pictures"
    html_path, md_path = out / f"{spec.name}.html", out / f"{spec.name}.md"
    html_text = to_html(page)
    try:
        (out / folder).mkdir(exist_ok=True)
        for p in page.pictures:
            _replace(out / folder / f"{p.name}.png", p.png)
        _replace(md_path, to_markdown(page, folder).encode())
        _replace(html_path, html_text.encode())
    except OSError as exc:  # the disk filled, or the folder changed while the page was drawn
        raise TunerError(f"the report could not be written to {out}: {exc.strerror}") from None
    files = {
        f"{FOLDER}/report.html": html_text.encode(),
        f"{FOLDER}/report.md": to_markdown(page, "pictures").encode(),
        **{f"{FOLDER}/pictures/{p.name}.png": p.png for p in page.pictures},
    }
    tracker.log_files(page.parent_run_id, files)
    return Written(html_path, md_path, page.parent_run_id)


def writable_folder(out: Path) -> None:
    """`out` is a folder this process can write in (made where missing); else a `ConfigError`
    naming it and why."""
    why = cannot_write(out)
    if why is not None:
        raise ConfigError(f"--out {out}: cannot write there ({why})")


def _replace(path: Path, data: bytes) -> None:
    """`path` holds `data` whole, or keeps what it held: a page is never left half-written.
    A link is written through, as a plain write would: the file it names is replaced."""
    from tuner.tracking.artifacts import replace_whole

    replace_whole(path.resolve() if path.is_symlink() else path, lambda p: p.write_bytes(data))
