"""The pruner is asked only at its decision epochs, and prunes exactly as when asked at every
epoch: the same studies replayed both ways."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from tuner.pruning import decision_epochs, make_pruner
from tuner.spec import StudySpec, parse

from .conftest import TINY_STUDY

PRUNERS = [
    ({"type": "hyperband", "min_epochs": 1, "reduction_factor": 3}, 15),  # the study file's
    ({"type": "hyperband", "min_epochs": 2, "reduction_factor": 2}, 20),
    ({"type": "hyperband", "min_epochs": 1, "reduction_factor": 4}, 30),
    ({"type": "median", "n_startup_trials": 2, "warmup_epochs": 0}, 8),
    ({"type": "median", "n_startup_trials": 3, "warmup_epochs": 3}, 10),
]


def _spec(pruner: dict, epochs: int) -> StudySpec:
    train = {**TINY_STUDY["train"], "epochs": epochs}
    return parse({**TINY_STUDY, "name": "replay", "train": train, "pruner": pruner})


def replay(spec: StudySpec, curves: np.ndarray, asked: set[int] | None) -> list[int | None]:
    """Each curve as a trial, reported epoch by epoch; the pruner asked at `asked` epochs (None:
    at every one). The epoch each trial was pruned after (None: completed)."""
    study = optuna.create_study(study_name="replay", direction="maximize",
                                pruner=make_pruner(spec))  # fmt: skip
    stopped: list[int | None] = []
    for curve in curves:
        trial = study.ask()
        for epoch, value in enumerate(curve, 1):
            trial.report(float(value), epoch)
            if (asked is None or epoch in asked) and trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                stopped.append(epoch)
                break
        else:
            study.tell(trial, float(curve[-1]))
            stopped.append(None)
    return stopped


@pytest.mark.parametrize(("pruner", "epochs"), PRUNERS)
def test_asking_at_decision_epochs_prunes_as_asking_at_every_epoch(pruner, epochs) -> None:
    spec = _spec(pruner, epochs)
    rng = np.random.default_rng(epochs)
    # 60 learning curves: different ceilings and speeds, with noise
    ceiling, speed = rng.uniform(0.1, 0.9, (60, 1)), rng.uniform(0.05, 0.6, (60, 1))
    steps = np.arange(1, epochs + 1)
    curves = ceiling * (1 - np.exp(-speed * steps)) + rng.normal(0, 0.02, (60, epochs))
    every = replay(spec, curves, None)
    points = decision_epochs(spec)
    assert replay(spec, curves, set(points)) == every
    pruned = [epoch for epoch in every if epoch is not None]
    assert len(pruned) >= 10, "the replay prunes: the comparison means something"
    assert set(pruned) <= points, "asked at every epoch, it prunes only at decision epochs"
    assert len(points) < epochs or pruner["type"] == "median"


def test_the_decision_epochs_of_each_pruner() -> None:
    assert decision_epochs(_spec(*PRUNERS[0])) == {1, 3, 9}
    assert decision_epochs(_spec(*PRUNERS[1])) == {2, 4, 8, 16}
    assert decision_epochs(_spec(*PRUNERS[4])) == set(range(3, 11))
    assert decision_epochs(_spec({"type": "none"}, 5)) == frozenset()
