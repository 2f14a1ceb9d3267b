from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import TrialState

from tuner import _optuna
from tuner.records import REFIT_SUFFIX, Outcome
from tuner.study.summary import counts, ranked, summarize


def _study(*trials: tuple[TrialState, float | None, dict]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for state, value, attrs in trials:
        trial = study.ask()
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        if state != TrialState.RUNNING:
            study.tell(trial, value, state=state)
    return study


RUN = {"mlflow_run_id": "r"}


def test_top_trials_break_ties_by_the_earlier_trial_and_skip_those_without_a_run() -> None:
    study = _study(
        (TrialState.COMPLETE, 0.5, RUN),
        (TrialState.COMPLETE, 0.7, {}),  # its worker died before it had a run
        (TrialState.COMPLETE, 0.5, RUN),
        (TrialState.PRUNED, None, RUN),
        (TrialState.COMPLETE, 0.6, RUN),
    )
    trials = study.get_trials()
    assert [t.number for t in ranked(trials)] == [1, 4, 0, 2]
    assert [t.number for t in ranked(trials, 2, with_run=True)] == [4, 0]
    assert [t.number for t in ranked(trials, 10, with_run=True)] == [4, 0, 2]


def test_counts_name_every_outcome_even_when_none() -> None:
    study = _study(
        (TrialState.COMPLETE, 0.5, {}),
        (TrialState.PRUNED, None, {"fail_reason": "diverged"}),
        (TrialState.FAIL, None, {"fail_reason": "timeout"}),
        (TrialState.RUNNING, None, {}),
    )
    assert counts(study.get_trials()) == {
        Outcome.COMPLETE: 1,
        Outcome.PRUNED: 0,
        Outcome.DIVERGED: 1,
        Outcome.FAILED: 1,
        Outcome.RUNNING: 1,
        Outcome.WAITING: 0,
    }


def test_a_run_summary_counts_only_its_own_trials() -> None:
    mine = {"session": "me"}
    study = _study(
        (TrialState.COMPLETE, 0.9, {"session": "earlier"}),
        (TrialState.FAIL, None, {**mine, "fail_reason": "worker killed by SIGKILL"}),
        (TrialState.PRUNED, None, {**mine, "fail_reason": "diverged"}),
        (TrialState.COMPLETE, 0.4, {**mine, "retry_of": 1}),
    )
    summary = summarize(study, "me", 1.5)
    assert summary.ran == {Outcome.FAILED: 1, Outcome.DIVERGED: 1, Outcome.COMPLETE: 1}
    assert [(f.number, f.outcome, f.reason) for f in summary.failures] == [
        (1, Outcome.FAILED, "worker killed by SIGKILL"),
        (2, Outcome.DIVERGED, "diverged"),
    ]
    assert summary.retried == {1: 3}
    assert summary.best.number == 0, "the best of the whole study"
    assert not summary.nothing_finished


@pytest.mark.parametrize(
    ("states", "expected"),
    [([], False), ([TrialState.FAIL], True), ([TrialState.FAIL, TrialState.PRUNED], False)],
)
def test_nothing_finished_means_every_trial_failed(states: list, expected: bool) -> None:
    study = _study(*[(s, None, {"session": "me"}) for s in states])
    assert summarize(study, "me", 0.0).nothing_finished is expected


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def study_stores(request, stores):
    """The session's stores, with Optuna on SQLite and on PostgreSQL: the readers below query
    Optuna's tables directly, where the two differ (PostgreSQL keeps a trial's state as an
    enum type that takes no text)."""
    if request.param == "sqlite":
        return stores
    return dataclasses.replace(stores, optuna_url=request.getfixturevalue("postgres_url")())


def _scheme(stores) -> str:
    return stores.optuna_url.split(":")[0]


def test_status_read_by_queries_agrees_with_the_whole_study(study_stores) -> None:
    """`study_status` reads counts and the top trials with a few queries: the same answer as
    every trial loaded and counted (`counts`, `ranked`)."""
    from tuner.records import DIVERGED, REASON_ATTR
    from tuner.spec import parse
    from tuner.study.setup import create, open_study
    from tuner.study.status import study_status

    from ..conftest import TINY_STUDY

    spec = parse({**TINY_STUDY, "name": f"status-{_scheme(study_stores)}"})
    create(spec, study_stores)
    study = open_study(spec, study_stores)
    values = [0.5, 0.7, 0.7, 0.2, None, None, None, None, 0.9]
    for i, value in enumerate(values):
        trial = _optuna.ask(study)
        trial.suggest_float("dropout", 0.0, 0.5)
        trial.suggest_categorical("depth", ["vgg11", "vgg13"])
        if value is not None:
            study.tell(trial, value)
        elif i == 4:
            trial.set_user_attr(REASON_ATTR, DIVERGED)
            study.tell(trial, state=TrialState.PRUNED)
        elif i == 5:
            study.tell(trial, state=TrialState.PRUNED)
        elif i == 6:
            study.tell(trial, state=TrialState.FAIL)  # i == 7 stays running
    study.enqueue_trial({"dropout": 0.1, "depth": "vgg11"})
    refits = optuna.create_study(study_name=spec.name + REFIT_SUFFIX, storage=study._storage)
    refits.add_trial(optuna.trial.create_trial(
        value=1.25, user_attrs={"refit_of": 8, "refit_epochs": 4}))  # fmt: skip
    scored = {"name": "ensemble-greedy-top2", "members": [8, 1], "test_acc": 0.61,
              "gain_points": 1.5}  # fmt: skip
    study.set_user_attr("ensemble:2026-12-07T01:00:00:run1", scored)
    status = study_status(spec, study_stores, top=3)
    assert [(r.of, r.epochs, r.train_loss) for r in status.refits] == [(8, 4, 1.25)]
    assert status.ensembles == (scored,)
    trials = study.get_trials()
    assert status.counts == counts(trials)
    assert status.counts[Outcome.DIVERGED] == 1 and status.counts[Outcome.WAITING] == 1
    expected = ranked(trials, 3)
    assert [t.number for t in status.top] == [t.number for t in expected] == [8, 1, 2]
    assert [t.params for t in status.top] == [t.params for t in expected]
    assert [t.value for t in status.top] == [0.9, 0.7, 0.7]
    assert status.parent_run_id == study.user_attrs["mlflow_parent_run_id"]


def test_status_of_a_study_that_is_not_there_says_how_to_make_it(tmp_path) -> None:
    from tuner.errors import TunerError
    from tuner.spec import parse
    from tuner.stores import resolve
    from tuner.study.status import study_status

    from ..conftest import TINY_STUDY

    with pytest.raises(TunerError, match="no study 'nowhere' .* run `tuner study create`"):
        study_status(parse({**TINY_STUDY, "name": "nowhere"}), resolve(mlruns=tmp_path))
    assert not (tmp_path / "optuna.db").exists(), "reading made no store"


def test_the_best_trials_read_alone_are_those_ranked_from_the_whole_study(study_stores) -> None:
    from tuner.records import RUN_ID_ATTR
    from tuner.spec import parse
    from tuner.study.setup import create, open_study

    from ..conftest import TINY_STUDY

    spec = parse({**TINY_STUDY, "name": f"best-alone-{_scheme(study_stores)}"})
    create(spec, study_stores)
    study = open_study(spec, study_stores)
    for i, value in enumerate([0.5, 0.9, 0.7, 0.9, 0.95, 0.1]):
        trial = _optuna.ask(study)
        trial.suggest_float("dropout", 0.0, 0.5)
        if i != 4:  # its worker died before its run was made
            trial.set_user_attr(RUN_ID_ATTR, f"run-{i}")
        study.tell(trial, value)
    expected = ranked(study.get_trials(), 3, with_run=True)
    best = _optuna.best_trials(study, 3, RUN_ID_ATTR)
    assert [t.number for t in best] == [t.number for t in expected] == [1, 3, 2]
    assert [t.user_attrs[RUN_ID_ATTR] for t in best] == ["run-1", "run-3", "run-2"]
    study.enqueue_trial({"dropout": 0.2})
    _optuna.ask(study)
    assert _optuna.trial_states(study) == {t.number: t.state for t in study.get_trials()}
    assert _optuna.trial_states(study)[6] == TrialState.RUNNING


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_infinite_values_read_and_rank_as_optuna_has_them(study_stores, direction) -> None:
    """Optuna keeps ±inf as a NULL value and its sign (NULL sorts last on SQLite, first on
    PostgreSQL): the status, the refits and the best trials read alone give Optuna's values,
    in its order, and its best trial."""
    from tuner.records import REFIT_OF_ATTR, RUN_ID_ATTR
    from tuner.spec import parse
    from tuner.study.status import study_status

    from ..conftest import TINY_STUDY

    spec = parse({**TINY_STUDY, "name": f"inf-{direction}-{_scheme(study_stores)}"})
    study = optuna.create_study(
        study_name=spec.name, storage=study_stores.optuna_url, direction=direction
    )
    for i, value in enumerate([0.5, float("inf"), 0.9, float("-inf"), 0.2]):
        trial = study.ask()
        trial.suggest_float("dropout", 0.0, 0.5)
        trial.set_user_attr(RUN_ID_ATTR, f"run-{i}")
        study.tell(trial, value)
    refits = optuna.create_study(study_name=spec.name + REFIT_SUFFIX, storage=study._storage)
    refits.add_trial(optuna.trial.create_trial(value=float("inf"), user_attrs={REFIT_OF_ATTR: 1}))
    sign = -1 if direction == "maximize" else 1
    expected = sorted(study.get_trials(), key=lambda t: (sign * t.value, t.number))
    assert expected[0].number == study.best_trial.number

    status = study_status(spec, study_stores, top=5)
    assert [(t.number, t.value) for t in status.top] == [(t.number, t.value) for t in expected]
    assert [t.params for t in status.top] == [t.params for t in expected]
    assert [r.train_loss for r in status.refits] == [float("inf")]
    best = _optuna.best_trials(study, 5, RUN_ID_ATTR)
    assert [(t.number, t.value) for t in best] == [(t.number, t.value) for t in expected]


def test_status_of_a_database_it_cannot_reach_is_one_line(monkeypatch) -> None:
    """A server that cannot be reached (a host that does not resolve) is the same one line
    that every other command gives, not a traceback."""
    import sqlalchemy

    from tuner.errors import ConfigError
    from tuner.spec import parse
    from tuner.stores import resolve
    from tuner.study import status

    from ..conftest import TINY_STUDY

    def unreachable(*args):
        raise sqlalchemy.exc.OperationalError(
            "SELECT", {}, Exception("failed to resolve host 'h': Name or service not known")
        )

    monkeypatch.setattr(status, "overview", unreachable)
    stores = resolve(storage="postgresql://u@h/db", tracking_uri="http://h:5000")
    with pytest.raises(ConfigError, match="^cannot read the Optuna storage postgresql://u@h/db "
                       r"\(.*failed to resolve host 'h'"):  # fmt: skip
        status.study_status(parse(TINY_STUDY), stores)


def test_refits_made_under_the_old_name_are_still_the_studys(tmp_path) -> None:
    """A store whose refits an earlier tuner kept as `NAME.refit` (with the search as their
    source): status reads them, and the first refit or ensemble renames them `NAME:refit`;
    a study of its own that a study file named `NAME.refit` is left alone."""
    from tuner.records import REFIT_EPOCHS_ATTR, REFIT_OF_ATTR, REFITS_OF_ATTR, RUN_ID_ATTR
    from tuner.spec import parse
    from tuner.stores import resolve
    from tuner.study import refit
    from tuner.study.status import study_status

    from ..conftest import TINY_STUDY

    stores = resolve(mlruns=tmp_path)
    url = stores.optuna_url
    for name, source in (("old", "old"), ("other", None)):
        optuna.create_study(study_name=name, storage=url, direction="maximize")
        made = optuna.create_study(study_name=f"{name}.refit", storage=url)
        if source is not None:
            made.set_user_attr(REFITS_OF_ATTR, source)
        made.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={
            REFIT_OF_ATTR: 3, REFIT_EPOCHS_ATTR: 2, RUN_ID_ATTR: "r"}))  # fmt: skip
    old, other = parse({**TINY_STUDY, "name": "old"}), parse({**TINY_STUDY, "name": "other"})
    assert [(r.of, r.epochs) for r in study_status(old, stores).refits] == [(3, 2)]
    assert refit.completed_refits(old, stores) == {3: refit.Refit(3, 0, "r", 2)}
    assert refit.completed_refits(other, stores) == {}
    names = {s.study_name for s in optuna.get_all_study_summaries(url)}
    assert names == {"old", "old:refit", "other", "other.refit"}
