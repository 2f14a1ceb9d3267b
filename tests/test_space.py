from __future__ import annotations

import optuna
import pytest

from tuner import space
from tuner.spec import parse

from .conftest import TINY_STUDY

SPACE = parse(TINY_STUDY).space


@pytest.fixture(scope="module")
def sampled() -> list[tuple[optuna.trial.FrozenTrial, space.TrialParams]]:
    """300 points drawn at random from the tiny study's space (the vgg-cifar space)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(300):
        trial = study.ask()
        drawn.append(space.suggest(trial, SPACE))
        study.tell(trial, 0.0)
    return list(zip(study.get_trials(deepcopy=False), drawn, strict=True))


def test_every_choice_is_reachable(sampled) -> None:
    drawn = [p for _, p in sampled]
    assert {p.depth for p in drawn} == set(SPACE.depth)
    assert {p.batch_norm for p in drawn} == {True, False}
    assert {p.optimizer for p in drawn} == set(SPACE.optimizer)
    assert {p.augment for p in drawn} == set(SPACE.augment)


def test_ranges_hold_and_learning_rate_depends_on_optimizer(sampled) -> None:
    for trial, p in sampled:
        lr_range = SPACE.optimizer[p.optimizer].lr
        assert lr_range.low <= p.lr <= lr_range.high
        assert SPACE.dropout.low <= p.dropout <= SPACE.dropout.high
        assert SPACE.weight_decay.low <= p.weight_decay <= SPACE.weight_decay.high
        # only the chosen optimizer's learning rate is a parameter of the trial
        lr_params = {name for name in trial.params if name.startswith("lr_")}
        assert lr_params == {space.lr_name(p.optimizer)}
    adam_lrs = [p.lr for _, p in sampled if p.optimizer == "adam"]
    sgd_lrs = [p.lr for _, p in sampled if p.optimizer == "sgd"]
    assert max(adam_lrs) <= 3.0e-3 < max(sgd_lrs), "SGD's range reaches where Adam's stops"


def test_log_scale_spreads_over_decades(sampled) -> None:
    sgd = [p.lr for _, p in sampled if p.optimizer in ("sgd", "nesterov")]
    # log-uniform on [1e-3, 0.5]: about a third of the draws fall below 1e-2
    assert 0.15 < sum(lr < 1e-2 for lr in sgd) / len(sgd) < 0.6


def test_decode_round_trips_stored_params(sampled) -> None:
    for trial, p in sampled[:20]:
        assert space.decode(trial.params) == p


def test_distributions_match_the_spec() -> None:
    fixed = space.fixed_distributions(SPACE)
    assert fixed["weight_decay"].log and fixed["weight_decay"].low == 1.0e-6
    conditional = space.conditional_distributions(SPACE)
    assert conditional["adam"]["lr_adam"].high == 3.0e-3
    assert conditional["sgd"]["lr_sgd"].high == 0.5


def test_a_point_has_a_short_label_and_log10_twins_of_its_log_scale_parameters() -> None:
    spec = parse({**TINY_STUDY, "space": {**TINY_STUDY["space"],
                  "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True}}})  # fmt: skip
    point = space.TrialParams("nesterov", 0.01, 1e-4, "flip",
                              {"depth": "vgg16", "batch_norm": True, "dropout": 0.25})  # fmt: skip
    assert point.label() == "vgg16-bn nesterov"
    twins = space.log10_twins(point, spec.space)
    lr_is_log = spec.space.optimizer["nesterov"].lr.log
    assert twins == {"log10_weight_decay": pytest.approx(-4.0),
                     **({"log10_lr": pytest.approx(-2.0)} if lr_is_log else {})}  # fmt: skip
    assert "log10_dropout" not in twins, "a linear parameter has none"


def _drawn(raw: dict, n: int = 60) -> list[tuple[optuna.trial.FrozenTrial, space.TrialParams]]:
    spec = parse(raw)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(n):
        trial = study.ask()
        drawn.append(space.suggest(trial, spec.space, spec.builder))
        study.tell(trial, 0.0)
    return list(zip(study.get_trials(deepcopy=False), drawn, strict=True))


TRAINING = {k: TINY_STUDY["space"][k] for k in ("optimizer", "weight_decay", "augment")}


def test_googlenet_draws_its_aux_weight_only_with_aux() -> None:
    sampled = _drawn({**TINY_STUDY, "model": "googlenet", "space": TRAINING})
    for trial, p in sampled:
        assert ("aux_weight" in trial.params) == p.aux
        assert p.stages in (1, 2, 3) and 0.25 <= p.width <= 1.0
        assert space.decode(trial.params, "googlenet") == p
        assert p.label().startswith(f"googlenet-{p.stages}s")
    assert {p.aux for _, p in sampled} == {True, False}


def test_a_builder_draws_choices_floats_and_stepped_ints() -> None:
    raw = {**TINY_STUDY, "model": {"builder": "examples.resnet:build"},
           "space": {**TRAINING, "blocks": [1, 2, 3], "channels": {"low": 8, "high": 32,
                     "step": 8}, "dropout": {"low": 0.0, "high": 0.5}}}  # fmt: skip
    sampled = _drawn(raw)
    for trial, p in sampled:
        assert p.blocks in (1, 2, 3) and p.channels in (8, 16, 24, 32)
        assert isinstance(p.channels, int) and 0 <= p.dropout <= 0.5
        assert space.decode(trial.params, "builder", p.builder) == p
        assert p.label() == f"resnet {p.optimizer}"
        assert space.encode(p) == trial.params
