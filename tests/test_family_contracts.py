"""Model families and user builders at their edges: what a study file may not say, points read
without the study file, and builders whose networks cannot train."""

from __future__ import annotations

import copy
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn

from tuner.errors import ConfigError, SpecError
from tuner.models import Architecture, check_builder
from tuner.space import decode
from tuner.spec import parse
from tuner.study.setup import check_contract

from .conftest import TINY_STUDY

OPTIMIZER = {"nesterov": {"lr": {"low": 0.01, "high": 0.1, "log": True}}}
TRAINING = {"weight_decay": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
            "augment": ["none"], "optimizer": OPTIMIZER}  # fmt: skip


def _study(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(TINY_STUDY)
    raw.update(changes)
    return raw


def test_space_family_is_not_a_key_of_the_study_file() -> None:
    """`family` is tuner's own tag, set from `model:`: written in `space`, it would make a
    `model: vgg` study train GoogLeNets, in a study whose stored file reads as a VGG's."""
    raw = _study(model="vgg", space={**TRAINING, "family": "googlenet", "stages": [1]})
    with pytest.raises(SpecError, match="space.family"):
        parse(raw)


def test_space_family_builder_under_a_named_family_is_refused() -> None:
    raw = _study(model="googlenet", space={**TRAINING, "family": "builder", "stages": [1]})
    with pytest.raises(SpecError, match="space.family"):
        parse(raw)


def test_a_builder_parameter_named_family_says_why() -> None:
    raw = _study(model={"builder": "examples.resnet:build"},
                 space={**TRAINING, "family": [1, 2]})  # fmt: skip
    with pytest.raises(SpecError) as err:
        parse(raw)
    assert "space.family" in str(err.value)


def test_a_builders_points_named_like_vggs_decode_without_the_study_file() -> None:
    """Points read without the study file: a builder's parameters named `depth` and
    `batch_norm` (names a builder may well use) are a builder's, not a VGG's."""
    point = {"depth": "a", "batch_norm": True, "optimizer": "nesterov", "lr_nesterov": 0.05,
             "weight_decay": 1e-4, "augment": "none"}  # fmt: skip
    params = decode(point)
    assert params.model["depth"] == "a"


class _Study:
    def __init__(self, stored: dict[str, Any]) -> None:
        self.user_attrs = {"spec": stored}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def test_changing_the_builder_of_a_study_is_a_new_search_space() -> None:
    """Another builder trains other networks: its trials are not mixed with the first
    builder's in one study."""
    space = {**TRAINING, "blocks": [1, 2]}
    first = parse(_study(model={"builder": "examples.resnet:build"}, space=space))
    other = parse(_study(model={"builder": "examples.other:build"}, space=space))
    with pytest.raises(SpecError, match="model"):
        check_contract(_Study(first.to_dict()), other, allow_changed_settings=False)


def _module(**functions: Any) -> str:
    module = types.ModuleType("review_builders")
    for name, function in functions.items():
        setattr(module, name, function)
    sys.modules["review_builders"] = module
    return "review_builders"


class _Net(nn.Module):
    def __init__(self, classes: int, mode: str) -> None:
        super().__init__()
        self.fc, self.mode = nn.Linear(1, classes), mode

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.fc(x.mean((1, 2, 3)).unsqueeze(1))
        if self.mode == "tuple":  # (logits, logits) in eval mode too: training cannot use it
            return logits, logits
        return logits[:1] if len(x) != 2 else logits  # right only for a batch of two


@pytest.mark.parametrize("mode", ["tuple", "batch"])
def test_a_builder_whose_network_cannot_train_is_refused_before_any_trial(mode: str) -> None:
    """A network returning a tuple in eval mode, or logits whose batch is not the input's
    (right only for a batch of 2): refused in one line before any trial, not a cryptic
    cross-entropy error in every trial."""
    module = _module(build=lambda params, shape, classes: _Net(classes, mode))
    arch = Architecture("builder", {}, 1.0, 10, (1, 8, 8), f"{module}:build")
    with pytest.raises(ConfigError, match=module):
        check_builder(arch)


def test_a_builders_error_is_one_line() -> None:
    def build(params: Any, shape: Any, classes: int) -> nn.Module:
        raise RuntimeError("first line\nsecond line")

    module = _module(build=build)
    arch = Architecture("builder", {}, 1.0, 10, (1, 8, 8), f"{module}:build")
    with pytest.raises(ConfigError) as err:
        check_builder(arch)
    assert "\n" not in str(err.value)


def test_status_reads_a_builders_points_by_its_study_file() -> None:
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from tuner import report
    from tuner.records import Outcome
    from tuner.study.status import Status

    params = {"depth": 2, "batch_norm": True, "optimizer": "sgd", "lr_sgd": 0.1,
              "weight_decay": 1e-4, "augment": "none"}  # fmt: skip
    dists = {k: CategoricalDistribution([v]) for k, v in params.items()}
    trial = create_trial(value=0.5, params=params, distributions=dists)
    status = Status({Outcome.COMPLETE: 1}, (trial,), None, family="builder",
                    builder="examples.resnet:build", data="fashion-mnist")  # fmt: skip
    text = report.status("s", status, "sqlite:///x.db")
    assert "model examples.resnet:build on fashion-mnist" in text
    assert "0.5000  resnet " in text and "depth=2" in text
    assert '"model": "examples.resnet:build"' in report.status_json("s", status, "x")


def test_a_builder_leaves_the_process_as_it_found_it() -> None:
    """A builder is the user's code: torch's threads and the global random states are put
    back, and an exit it calls is one line, not the end of `study run`."""
    import random

    import numpy as np

    def rude(params: Any, shape: Any, classes: int) -> nn.Module:
        torch.set_num_threads(1)
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, classes))

    def leaves(params: Any, shape: Any, classes: int) -> nn.Module:
        raise SystemExit(3)

    module = _module(build=rude, leave=leaves)
    threads, state = torch.get_num_threads(), (random.getstate(), np.random.get_state()[1][0])
    from tuner.models import build

    build(Architecture("builder", {}, 1.0, 10, (1, 8, 8), f"{module}:build"), seed=5)
    assert torch.get_num_threads() == threads
    assert (random.getstate(), np.random.get_state()[1][0]) == state
    with pytest.raises(ConfigError, match="raised SystemExit: 3"):
        check_builder(Architecture("builder", {}, 1.0, 10, (1, 8, 8), f"{module}:leave"))
