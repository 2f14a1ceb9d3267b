from __future__ import annotations

import pytest
from optuna.trial import TrialState

from tuner import spec
from tuner.records import BASELINE_ATTR
from tuner.space import decode, encode, suggest
from tuner.study.setup import create, open_study

from .conftest import TINY_STUDY
from .test_spec import GOOD_BASELINE


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_baselines_are_the_first_trials_queued_once_and_drawn_as_written(stores) -> None:
    raw = {**TINY_STUDY, "name": "baselines", "baselines": [GOOD_BASELINE]}
    first = spec.parse(raw)
    create(first, stores)
    create(first, stores)  # a second create (each `study run` makes one) queues nothing more
    study = open_study(first, stores)
    queued = study.get_trials(deepcopy=False)
    assert [t.state for t in queued] == [TrialState.WAITING]
    assert queued[0].user_attrs[BASELINE_ATTR] == "known-good"

    trial = study.ask()  # the queue comes before the sampler
    drawn = suggest(trial, first.space)
    assert drawn == decode(encode(first.baselines[0]))
    assert drawn.lr == 0.05 and drawn.optimizer == "nesterov"
    study.tell(trial, 0.5)

    # a baseline added to the file later is queued by the next create; the first is not again
    second = spec.parse({**raw, "baselines": [GOOD_BASELINE, {**GOOD_BASELINE, "name": "b",
                                                              "lr": 0.1}]})  # fmt: skip
    create(second, stores)
    names = [t.user_attrs.get(BASELINE_ATTR) for t in open_study(second, stores).trials]
    assert names == ["known-good", "b"]


def test_encode_is_what_suggest_draws() -> None:
    point = decode({"depth": "vgg13", "batch_norm": False, "dropout": 0.2, "optimizer": "adam",
                    "lr_adam": 1e-3, "weight_decay": 1e-4, "augment": "flip"})  # fmt: skip
    assert encode(point) == {"depth": "vgg13", "batch_norm": False, "dropout": 0.2,
                             "optimizer": "adam", "lr_adam": 1e-3, "weight_decay": 1e-4,
                             "augment": "flip"}  # fmt: skip
