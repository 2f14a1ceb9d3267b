from __future__ import annotations

import optuna
import pytest

from tuner.runner import make_pruner, make_sampler
from tuner.space import suggest
from tuner.spec import parse

from .conftest import TINY_STUDY


def _first_point(n_existing: int, worker: int = 0) -> dict:
    spec = parse(TINY_STUDY)
    sampler = make_sampler(spec, n_existing, worker)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    trial = study.ask()
    suggest(trial, spec.space)
    return trial.params


def test_sampler_is_seeded_and_a_restart_does_not_replay_startup_points() -> None:
    assert _first_point(0) == _first_point(0), "same study, same first point"
    assert _first_point(0) != _first_point(4), "a restart after 4 trials draws new points"


def test_workers_started_together_draw_different_points() -> None:
    """Seen: two workers of one run both trained the same first point."""
    points = [_first_point(0, worker) for worker in range(3)]
    assert points[0] != points[1] != points[2] != points[0]


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


def test_default_pruner_is_hyperband_over_epochs() -> None:
    raw = {k: v for k, v in TINY_STUDY.items() if k != "pruner"}
    pruner = make_pruner(parse(raw))
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert pruner._max_resource == TINY_STUDY["train"]["epochs"]


def test_random_sampler_is_selectable() -> None:
    spec = parse({**TINY_STUDY, "sampler": {"type": "random", "seed": 3}})
    assert isinstance(make_sampler(spec, 0), optuna.samplers.RandomSampler)
