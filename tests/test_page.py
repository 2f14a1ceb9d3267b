from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tuner import spec
from tuner.records import BASELINE_ATTR, PRUNED_AT_ATTR, REASON_ATTR, RUN_ID_ATTR
from tuner.study import page
from tuner.study.setup import create, open_study

from .conftest import TINY_STUDY
from .test_pictures import _trial

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


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_report_is_one_page_written_locally_and_logged_to_the_parent(
    stores, tracker, tmp_path: Path
) -> None:
    raw = {**TINY_STUDY, "name": "report-page"}
    made = spec.parse(raw)
    runs = create(made, stores).runs
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
