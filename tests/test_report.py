"""The text a person reads, from results built here."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from tuner import report
from tuner.bench.epochs import Packed, Row
from tuner.ensemble import EnsembleReport, EnsembleRequest, Member, Scores
from tuner.records import Outcome
from tuner.study.status import Status
from tuner.study.summary import Failure, RunSummary


def _trial(number: int, value: float) -> optuna.trial.FrozenTrial:
    params = {"depth": "vgg16", "batch_norm": True, "dropout": 0.25, "optimizer": "sgd",
              "lr_sgd": 0.05, "weight_decay": 5e-4, "augment": "crop_flip"}  # fmt: skip
    trial = optuna.trial.create_trial(
        params=params, distributions={k: optuna.distributions.CategoricalDistribution([v])
                                      for k, v in params.items()},
        value=value, state=TrialState.COMPLETE,
    )  # fmt: skip
    trial.number = number
    return trial


def test_a_run_summary_lists_failures_retries_and_the_best() -> None:
    best = _trial(4, 0.8125)
    summary = RunSummary(
        ran={Outcome.PRUNED: 2, Outcome.COMPLETE: 3, Outcome.DIVERGED: 1, Outcome.FAILED: 1},
        seconds=12.34,
        best=best,
        failures=(Failure(2, Outcome.DIVERGED, "diverged"), Failure(5, Outcome.FAILED, "timeout")),
        workers=("w0: finished", "w1: killed by SIGKILL"), retried={5: 6},
    )  # fmt: skip
    text = report.run_summary("vgg", summary)
    assert (
        "ran 3 complete, 2 pruned, 1 diverged (trial 2), 1 failed (trial 5: timeout) in 12.3 s\n"
        "  trial 5 was retried as trial 6\n" in text
    ), "each trial said once"
    assert "workers: w0: finished; w1: killed by SIGKILL" in text
    assert "best so far: trial 4, val_acc 0.8125" in text


def test_status_prints_the_counts_it_was_given() -> None:
    counts = {Outcome.COMPLETE: 3, Outcome.PRUNED: 7, Outcome.DIVERGED: 1, Outcome.FAILED: 2,
              Outcome.RUNNING: 0, Outcome.WAITING: 0}  # fmt: skip
    top = (_trial(0, 0.9), _trial(1, 0.5))
    text = report.status("vgg", Status(counts, top, "p"), "sqlite:///x.db")
    assert "complete: 3  pruned: 7  diverged: 1  failed: 2  running: 0  waiting: 0" in text
    assert "best: trial 0, val_acc 0.9000" in text and "  lr            0.05" in text
    assert (
        "top 2:" in text
        and "     1    0.5000  vgg16-bn  sgd        5.00e-02  5.0e-04  dropout=0.25 aug=" in text
    )
    assert "refits (on train + validation):\n  none yet: tuner refit vgg" in text
    assert "  none yet: tuner ensemble vgg --top 5" in text
    empty = report.status("vgg", Status(counts, (), None), "sqlite:///x.db")
    assert empty.endswith("no completed trials yet")


def test_status_lists_the_refits_and_the_ensembles_scored() -> None:
    from tuner.study.status import RefitDone

    counts = dict.fromkeys((Outcome.COMPLETE, Outcome.PRUNED), 1)
    scored = {"name": "ensemble-greedy-top2-refit", "members": [0, 5], "test_acc": 0.46,
              "gain_points": 0.5}  # fmt: skip
    status = Status(counts, (_trial(0, 0.9),), "p", (RefitDone(0, 4, 1.5292),), (scored,))
    text = report.status("vgg", status, "sqlite:///x.db")
    assert "refits (on train + validation):\n  of trial 0: 4 epochs, train_loss 1.5292" in text
    assert (
        "ensembles scored (on the test images):\n  ensemble-greedy-top2-refit: trials 0, 5; "
        "test_acc 0.4600, +0.50 points over the best single" in text
    )


def test_the_ensemble_report_shows_members_weights_and_the_gain() -> None:
    members = (
        Member(3, "run3", 0.75, 0.61, 0.60, 0.62),
        Member(1, "run1", 0.25, 0.58, 0.62, 0.63),
    )
    single = Member(0, "run0", 0.0, 0.63, 0.59, 0.60)
    result = EnsembleReport(
        EnsembleRequest(5, "greedy", tta="flip"), members, 12, 500, 1000,
        val=Scores(0.66, 1.1), test=Scores(0.655, 1.2345), single=single,
        single_val=Scores(0.63, 1.3), single_test=Scores(0.59, 1.4),
        val_tta=Scores(0.67, 1.05), test_tta=Scores(0.665, 1.2),
        single_test_tta=Scores(0.60, 1.35),
        run_id="ens",
    )  # fmt: skip
    text = report.ensemble(result)
    assert "greedy ensemble of 2 from 12 completed trials" in text
    assert "     3   0.750   1.00    0.6100    0.6000    0.6200  run3" in text
    assert (
        "     0   0.000   1.00    0.6300    0.5900    0.6000  run0  (best single trial; not"
        in text
    )
    assert "ensemble + flip               0.6700    1.0500    0.6650     1.2000" in text
    assert "best single (trial 0)         0.6300    1.3000    0.5900     1.4000" in text
    assert "gain over the best single trial: +6.50 points (+6.50 with flip on both)" in text
    assert "MLflow run ens" in text


def test_the_bench_table_has_a_row_per_measurement() -> None:
    rows = [Row("vgg16-bn", "DataLoader+PIL fp32 b128", 7.378, 538.0, None, 1.2, None),
            Row("vgg16-bn", "tuner eager b512", 5.614, 638.4, 1.314, 0.3, 2.25)]  # fmt: skip
    text = report.bench_table(rows, [Packed(1, 661.0, 1.0), Packed(2, 741.0, 1.121)])
    lines = text.splitlines()
    assert lines[1].split() == ["vgg16-bn", "DataLoader+PIL", "fp32", "b128", "7.378", "538",
                                "1.2"]  # fmt: skip
    assert lines[2].split() == ["vgg16-bn", "tuner", "eager", "b512", "5.614", "638", "1.31",
                                "0.3", "2.25"]  # fmt: skip
    assert lines[-1].split() == ["2", "741", "1.12"]


def test_status_json_is_the_same_status_for_scripts() -> None:
    import json

    counts = {Outcome.COMPLETE: 2, Outcome.PRUNED: 1, Outcome.DIVERGED: 0, Outcome.FAILED: 0,
              Outcome.RUNNING: 0, Outcome.WAITING: 1}  # fmt: skip
    top = (_trial(3, 0.75), _trial(1, 0.5))
    data = json.loads(report.status_json("vgg", Status(counts, top, "p"), "sqlite:///x.db"))
    assert data["counts"] == {"complete": 2, "pruned": 1, "diverged": 0, "failed": 0,
                              "running": 0, "waiting": 1}  # fmt: skip
    assert data["best"]["number"] == 3 and data["best"]["val_acc"] == 0.75
    assert [t["number"] for t in data["top"]] == [3, 1] and data["parent_run_id"] == "p"
    assert data["best"]["params"]["optimizer"] == "sgd"


def test_status_watch_prints_again_each_round(capsys) -> None:
    from tuner.cli import watch_status

    shown = iter(["first", "second"])
    watch_status(lambda: next(shown), 0.0, rounds=2)
    out = capsys.readouterr().out
    assert out.index("first") < out.index("second") and "Ctrl-C stops" in out


def _ensemble(request: EnsembleRequest, members: int, candidates: int, **kw) -> EnsembleReport:
    """A report of `members` members chosen from `candidates`, test gain +6.5 points."""
    chosen = tuple(Member(n, f"run{n}", 1 / members, 0.6, 0.62) for n in range(members))
    return EnsembleReport(
        request, chosen, candidates, 500, 1000, val=Scores(0.66, 1.1),
        test=Scores(0.655, 1.2), single=chosen[0], single_val=Scores(0.63, 1.3),
        single_test=Scores(0.59, 1.4), run_id="ens", **kw,
    )  # fmt: skip


def test_fewer_members_than_asked_are_explained_in_one_line() -> None:
    """`--top 2 --from refit` with one refit, `--top 5` where greedy kept 3, and a study with
    fewer completed trials than asked: each says why; a full ensemble says nothing of it."""
    refit = report.ensemble(_ensemble(EnsembleRequest(2, source="refit"), 1, 1, study="vgg"))
    assert "greedy ensemble of 1 from 1 refit (" in refit
    assert "fewer than the 2 asked: 1 refit exists (`tuner refit vgg --top 2` makes more)" in refit
    kept = report.ensemble(_ensemble(EnsembleRequest(5), 3, 12, study="vgg"))
    [line] = [x for x in kept.splitlines() if x.startswith("fewer than the 5 asked")]
    assert "greedy kept 3" in line and "new or repeated" in line and "log-loss" in line
    few = report.ensemble(_ensemble(EnsembleRequest(5, "average"), 3, 3, study="vgg", left_out=1))
    assert ("fewer than the 5 asked: the study has 3 completed trials with saved validation "
            "predictions, 1 more without usable validation predictions (`tuner study run vgg` "
            "runs more)") in few  # fmt: skip
    assert "greedy kept" not in few
    full = report.ensemble(_ensemble(EnsembleRequest(2), 2, 12, study="vgg"))
    assert "fewer than" not in full


def test_the_ensemble_says_what_its_weights_lower_and_that_validation_is_in_sample() -> None:
    text = report.ensemble(_ensemble(EnsembleRequest(5), 5, 12))
    assert "weights chosen to lower the validation log-loss" in text
    assert ("validation figures are in-sample: members and weights were chosen on these 500 "
            "images") in text and "the test figures are the fair comparison" in text  # fmt: skip


def test_the_gain_is_in_points_on_the_console_and_on_the_study_page() -> None:
    from tuner.study.page import Ensemble, Page, to_html, to_markdown

    console = report.ensemble(_ensemble(EnsembleRequest(5), 5, 12))
    assert "gain over the best single trial: +6.50 points" in console
    ensemble = Ensemble("ens", "ensemble-greedy-top5", 0.655, None, 0.59, "0:0.20 1:0.20")
    page = Page("vgg", "now", {}, (), (), (), (), (ensemble,), (), (), {}, {}, "p")
    for text in (to_markdown(page, "pictures"), to_html(page)):
        assert "+6.50 points" in text and "+0.0650" not in text
        assert "in percentage points" in text


def test_status_json_is_json_with_infinite_values() -> None:
    """Optuna keeps ±inf; JSON has no infinity: a strict parser reads what status writes."""
    import json

    import pytest

    counts = dict.fromkeys(Outcome, 0)
    top = (_trial(3, float("inf")), _trial(1, 0.5), _trial(2, float("-inf")))
    text = report.status_json("vgg", Status(counts, top, "p"), "sqlite:///x.db")
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert [t["val_acc"] for t in data["top"]] == ["inf", 0.5, "-inf"]
