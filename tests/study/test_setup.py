from __future__ import annotations

import optuna
import pytest

from tuner.errors import TunerError
from tuner.space import suggest
from tuner.spec import parse
from tuner.study.setup import (
    TrialSeeded,
    create,
    make_pruner,
    make_sampler,
    open_study,
    spec_changed,
    trial_seed,
)

from ..conftest import TINY_STUDY


def _points(n: int, seed: int = 0, skip: int = 0) -> list[dict]:
    """The points of trials skip .. skip + n - 1 of a fresh study seeded `seed`."""
    spec = parse({**TINY_STUDY, "seed": seed})
    study = optuna.create_study(direction="maximize", sampler=TrialSeeded(spec))
    points = []
    for number in range(skip + n):
        trial = study.ask()
        suggest(trial, spec.space)
        study.tell(trial, 0.5 + 0.01 * number)
        points.append(trial.params)
    return points[skip:]


def test_a_study_in_one_process_draws_the_same_points_trial_for_trial() -> None:
    assert _points(6) == _points(6)
    assert _points(6) != _points(6, seed=1), "another seed, other points"


def test_no_two_trials_share_a_seed_whoever_asks_for_them() -> None:
    """Workers, nodes and later runs ask for trials of other numbers: other seeds."""
    spec = parse(TINY_STUDY)
    assert len({trial_seed(spec, n) for n in range(1000)}) == 1000
    assert trial_seed(spec, 3) == trial_seed(spec, 3)


def test_workers_asking_in_turn_draw_different_points() -> None:
    """Seen: two workers of one run both trained the same first point."""
    points = [tuple(sorted(p.items())) for p in _points(3)]
    assert len(set(points)) == 3


@pytest.mark.parametrize(
    ("pruner", "expected"),
    [
        ({"type": "hyperband", "min_epochs": 1, "reduction_factor": 3},
         optuna.pruners.HyperbandPruner),
        ({"type": "median"}, optuna.pruners.MedianPruner),
        ({"type": "none"}, optuna.pruners.NopPruner),
    ],
)  # fmt: skip
def test_pruner_follows_the_study_file(pruner: dict, expected: type) -> None:
    assert isinstance(make_pruner(parse({**TINY_STUDY, "pruner": pruner})), expected)


def _hopeless_trials_completed(spec_pruner: optuna.pruners.BasePruner) -> tuple[int, set[int]]:
    """60 trials over 9 epochs, each worse than every one before: how many of the last 30
    ran to the end, and the epochs where trials were stopped."""
    study = optuna.create_study(direction="maximize", pruner=spec_pruner, study_name="rungs")
    completed, stopped_at = 0, set()
    for number in range(60):
        trial = study.ask()
        for epoch in range(1, 10):
            trial.report(1.0 / (1 + number) + 0.001 * epoch, epoch)
            if trial.should_prune():
                stopped_at.add(epoch)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, 1.0 / (1 + number) + 0.009)
            completed += number >= 30
    return completed, stopped_at


def test_default_pruner_is_hyperband_over_the_study_epochs() -> None:
    """Hyperband's brackets are sized by the epochs (1 to 9, reduction 3): every bracket has
    a rung within them, so once the rungs have filled, a hopeless trial never completes. Sized
    for 100 epochs, two brackets of five could stop nothing before epoch 27."""
    raw = {k: v for k, v in TINY_STUDY.items() if k != "pruner"}
    pruner = make_pruner(parse({**raw, "train": {**TINY_STUDY["train"], "epochs": 9}}))
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    completed, stopped_at = _hopeless_trials_completed(pruner)
    assert completed == 0 and stopped_at <= {1, 3, 9}, (completed, stopped_at)
    oversized = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=100,
                                               reduction_factor=3)  # fmt: skip
    assert _hopeless_trials_completed(oversized)[0] > 0, "the test tells the two apart"


def test_random_sampler_is_selectable() -> None:
    spec = parse({**TINY_STUDY, "sampler": {"type": "random", "seed": 3}})
    assert isinstance(make_sampler(spec, 0), optuna.samplers.RandomSampler)


def _diverged_picks(tell_the_sampler: bool) -> int:
    """Of 50 TPE picks after 10 random ones, how many land where learning rates 'diverge'."""
    spec = parse({**TINY_STUDY, "sampler": {"type": "tpe", "n_startup_trials": 10}})
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec, 0))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-3, 1e3, log=True)
        if lr > 1:
            if tell_the_sampler:  # what a diverged trial's record is (records.RECORDS)
                trial.set_constraint("diverged", 1.0)
                raise optuna.TrialPruned()
            raise FloatingPointError  # what a plain failed trial does
        return 1 - abs(lr - 0.1)

    study.optimize(objective, n_trials=60, catch=(FloatingPointError,))
    return sum(t.params["lr"] > 1 for t in study.trials[10:])


def test_tpe_steers_away_from_a_diverging_region() -> None:
    """A diverged trial's record (PRUNED + violated constraint) against plain FAIL, which TPE
    ignores, on a cheap objective where half the learning-rate range diverges."""
    told, failed = _diverged_picks(True), _diverged_picks(False)
    assert told <= 12, f"{told} of 50 picks diverged although the sampler was told"
    assert failed >= 2 * told, (told, failed)


def test_create_makes_the_study_once_and_hands_back_its_ids(stores) -> None:
    spec = parse({**TINY_STUDY, "name": "created-once"})
    first, again = create(spec, stores), create(spec, stores)
    assert first.created and not again.created
    assert again.runs == first.runs, "the same experiment and parent run"
    parent = first.tracker.client.get_run(first.runs.parent_run_id)
    assert parent.info.experiment_id == first.runs.experiment_id
    assert parent.data.tags["tuner.role"] == "study"
    study = open_study(spec, stores)
    assert study.metric_names == ["val_acc"], "optuna-dashboard's name for the objective"
    experiment = first.tracker.client.get_experiment(first.runs.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", (
        "MLflow's UI opens it on its runs, not on GenAI traces"
    )


def test_open_study_needs_it_created(stores) -> None:
    with pytest.raises(TunerError, match="no study 'nowhere'.*tuner study create"):
        open_study(parse({**TINY_STUDY, "name": "nowhere"}), stores)


def test_an_edited_study_file_is_noticed(stores) -> None:
    spec = parse({**TINY_STUDY, "name": "edited"})
    create(spec, stores)
    assert not spec_changed(open_study(spec, stores), spec)
    edited = parse({**TINY_STUDY, "name": "edited", "trials": 7})
    assert spec_changed(open_study(edited, stores), edited)


def test_the_study_file_is_the_studys_contract(stores, caplog: pytest.LogCaptureFixture) -> None:
    from tuner.errors import SpecError
    from tuner.study.setup import check_contract

    spec = parse({**TINY_STUDY, "name": "contract"})
    create(spec, stores)
    study = open_study(spec, stores)
    check_contract(study, spec, allow_changed_settings=False)  # unchanged: silent

    space = {**TINY_STUDY["space"], "depth": ["vgg11"]}
    with pytest.raises(SpecError, match=r"studies/contract.yaml: the search space differs"):
        check_contract(study, parse({**TINY_STUDY, "name": "contract", "space": space}), True)
    edited = parse({**TINY_STUDY, "name": "contract", "seed": 3})
    with pytest.raises(SpecError, match=r"(?s)fixed settings differ.*  seed: 0 → 3"):
        check_contract(study, edited, allow_changed_settings=False)
    with caplog.at_level("INFO"):
        check_contract(study, edited, allow_changed_settings=True)
        check_contract(study, parse({**TINY_STUDY, "name": "contract", "trials": 9}), False)
    assert "train with changed settings" in caplog.text and "trials: 4 → 9" in caplog.text
    assert any(k.startswith("settings:") for k in open_study(spec, stores).user_attrs)


def test_a_study_whose_parent_run_is_gone_is_refused(stores) -> None:
    from tuner.tracking import StoresDisagree

    spec = parse({**TINY_STUDY, "name": "orphaned"})
    made = create(spec, stores)
    made.tracker.client.delete_run(made.runs.parent_run_id)
    with pytest.raises(StoresDisagree, match="mlflow runs restore --run-id"):
        create(spec, stores)
    made.tracker.client.restore_run(made.runs.parent_run_id)
    assert not create(spec, stores).created
