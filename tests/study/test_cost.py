"""What a study will cost here, measured before it trains; a study far beyond the wait stops."""

from __future__ import annotations

import logging

import pytest
import torch

from tuner import spec as spec_module
from tuner.errors import TunerError
from tuner.pruning import expected_epochs
from tuner.spec import parse
from tuner.study.cost import Cost, check, measure
from tuner.study.named import stored_file
from tuner.study.session import RunRequest, run_study

from ..conftest import TINY_STUDY

CPU = torch.device("cpu")
# the whole CIFAR-10 training split at half the standard widths, 30 epochs a trial: on a CPU
# an epoch costs minutes, and 200 trials of them months
SLOW = {**TINY_STUDY, "trials": 200, "train": {"epochs": 30, "batch_size": 128, "width": 0.5},
        "data": {"val_size": 5000}}  # fmt: skip


def test_a_study_far_beyond_the_wait_stops_before_it_trains_saying_what_to_run_instead(
    stores, fake_cifar
) -> None:
    spec = parse({**SLOW, "name": "cost-slow"})
    request = RunRequest(devices=(CPU,), data_dir=fake_cifar, max_hours=4)
    with pytest.raises(TunerError) as caught:
        run_study(spec, stores, request)
    said = str(caught.value)
    assert "'cost-slow' would take too long on cpu: 200 trials × ~" in said
    assert "more than --max-hours 4" in said and "vgg-cifar-smoke" in said
    assert "--device cuda" in said and "to run it anyway" in said
    assert stored_file("cost-slow", stores) is None, "nothing made: the file can change freely"


def test_a_study_that_fits_says_what_it_will_cost_and_runs(stores, fake_cifar, caplog) -> None:
    spec = parse({**TINY_STUDY, "name": "cost-fits", "trials": 1})
    request = RunRequest(devices=(CPU,), data_dir=fake_cifar, max_hours=4)
    with caplog.at_level(logging.INFO, logger="tuner"):
        summary = run_study(spec, stores, request)
    assert "estimate on cpu: 1 trial × ~1.5 epochs × " in caplog.text
    assert sum(summary.ran.values()) == 1


def test_the_cheaper_depths_alone_can_tell_a_study_is_too_long() -> None:
    spec = parse({**SLOW, "name": "cost-partial"})
    cost = measure(spec, CPU, spec.trials, limit=60.0)
    assert cost.partial and cost.seconds > 60
    assert "the cheaper networks only" in cost.says() and "at least" in cost.says()
    with pytest.raises(TunerError, match="a --max-hours above the whole study's cost") as caught:
        check(cost, spec, CPU, max_hours=60 / 3600)
    assert "`--max-hours " not in str(caught.value), "no number from a floor"


def test_the_epochs_a_trial_trains_follow_its_pruner() -> None:
    vgg_cifar = spec_module.load("vgg-cifar")  # hyperband 2..30 by 3: brackets at 2, 6 and 18
    brackets = (2 + 4 / 3 + 12 / 9 + 12 / 27, 6 + 12 / 3 + 12 / 9, 18 + 12 / 3)  # 1 in 3 go on
    assert expected_epochs(vgg_cifar) == pytest.approx(sum(brackets) / 3)
    median = parse({**TINY_STUDY, "train": {**TINY_STUDY["train"], "epochs": 10}})
    assert expected_epochs(median) == 5.5, "half stop at the first epoch it decides at"
    none = parse({**TINY_STUDY, "pruner": {"type": "none"}})
    assert expected_epochs(none) == TINY_STUDY["train"]["epochs"]


def test_gpus_share_the_trials() -> None:
    assert Cost(10, 2.0, 3.0, devices=2).seconds == 30.0
