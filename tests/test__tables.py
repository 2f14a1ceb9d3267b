"""Optuna's tables read as plain tables, checked against Optuna itself (see also
tests/study/test_summary.py: the status on SQLite and PostgreSQL against a full load)."""

from __future__ import annotations

import pytest
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from tuner import _tables

DISTRIBUTIONS = [
    (CategoricalDistribution(["vgg11", "vgg16"]), [0, 1]),
    (CategoricalDistribution([True, False]), [0, 1]),
    (CategoricalDistribution([None, 3, 2.5, "x"]), [0, 1, 2, 3]),
    (FloatDistribution(1e-5, 1.0, log=True), [1e-5, 0.0123, 1.0]),
    (FloatDistribution(0.0, 0.5, step=0.1), [0.0, 0.30000000000000004, 0.5]),
    (IntDistribution(16, 512, step=16), [16.0, 496.0]),
    (IntDistribution(1, 1024, log=True), [1.0, 37.0]),
]


@pytest.mark.parametrize(("distribution", "stored"), DISTRIBUTIONS)
def test_a_stored_parameter_reads_back_as_optuna_reads_it(distribution, stored) -> None:
    text = distribution_to_json(distribution)
    for internal in stored:
        ours = _tables.external(internal, text)
        theirs = distribution.to_external_repr(internal)
        assert ours == theirs and type(ours) is type(theirs), (distribution, internal)


def test_every_trial_state_name_is_optunas() -> None:
    from optuna.trial import TrialState

    assert set(_tables.STATES) == {s.name for s in TrialState}
