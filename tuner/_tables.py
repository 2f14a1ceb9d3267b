"""Optuna's tables, read as plain tables: what `tuner study status` shows, without importing
Optuna (a quarter of a second of a one-second command) or its ORM models, and without loading
every trial. The schema is Optuna's (private: what `optuna.storages._rdb.models` declares);
tests compare every answer here with Optuna's own, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import sqlalchemy

# Optuna's `TrialState` names. PostgreSQL keeps a state as an enum type of its own
# (`trialstate`), which takes no text: the column is declared as that enum.
STATES = ("RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING")
# Optuna's `TrialValueModel.TrialValueType` names: a value of ±inf is stored as NULL, its sign
# in `value_type` (an enum type, `trialvaluetype`, on PostgreSQL)
VALUE_TYPES = ("FINITE", "INF_POS", "INF_NEG")


def tables() -> dict[str, sqlalchemy.TableClause]:
    """The few columns of Optuna's tables that tuner reads directly."""
    t, c = sqlalchemy.table, sqlalchemy.column
    return {
        "studies": t("studies", c("study_id"), c("study_name")),
        "trials": t("trials", c("trial_id"), c("number"), c("study_id"),
                    c("state", sqlalchemy.Enum(*STATES, name="trialstate"))),
        "values": t("trial_values", c("trial_id"), c("objective"), c("value"),
                    c("value_type", sqlalchemy.Enum(*VALUE_TYPES, name="trialvaluetype"))),
        "directions": t("study_directions", c("study_id"), c("objective"), c("direction")),
        "params": t("trial_params", c("trial_id"), c("param_name"), c("param_value"),
                    c("distribution_json")),
        "trial_attrs": t("trial_user_attributes", c("trial_id"), c("key"), c("value_json")),
        "study_attrs": t("study_user_attributes", c("study_id"), c("key"), c("value_json")),
        "heartbeats": t("trial_heartbeats", c("trial_id")),
    }  # fmt: skip


@dataclass(frozen=True)
class Ranked:
    """A completed trial as a summary shows it."""

    number: int
    value: float
    params: dict[str, Any]


@dataclass(frozen=True)
class Overview:
    """A study's counts, its best trials and its attributes."""

    states: dict[str, int]  # trials by Optuna state name
    tagged: dict[str, int]  # of those, whose user attribute `tag_key` is `tag_value`
    top: tuple[Ranked, ...]  # the best completed trials, best first (a tie: the earlier)
    user_attrs: dict[str, Any]  # the study's


def overview(
    engine: sqlalchemy.engine.Engine, name: str, top: int, tag_key: str, tag_value: str
) -> Overview | None:
    """A study's counts, its `top` trials and its attributes, in a handful of queries; None
    where there is no such study. `optuna.load_study` then `get_trials` builds every trial
    of the study, and opening an `RDBStorage` imports alembic to check the schema: a
    read-only summary needs neither."""
    tb = tables()
    studies, trials, values = tb["studies"], tb["trials"], tb["values"]
    directions = tb["directions"]
    count = sqlalchemy.func.count
    with engine.connect() as db:
        found = db.execute(
            sqlalchemy.select(studies.c.study_id, directions.c.direction)
            .join(directions, directions.c.study_id == studies.c.study_id)
            .where(studies.c.study_name == name, directions.c.objective == 0)
        ).first()
        if found is None:
            return None
        study_id, direction = found
        in_study = trials.c.study_id == study_id
        by_state = sqlalchemy.select(trials.c.state, count()).where(in_study)
        states = dict(db.execute(by_state.group_by(trials.c.state)).all())
        attrs = tb["trial_attrs"]
        tagged_query = (
            sqlalchemy.select(trials.c.state, count())
            .join(attrs, trials.c.trial_id == attrs.c.trial_id)
            .where(in_study, attrs.c.key == tag_key)
            .where(attrs.c.value_json == json.dumps(tag_value))
            .group_by(trials.c.state)
        )
        tagged = dict(db.execute(tagged_query).all())
        best = db.execute(
            sqlalchemy.select(trials.c.trial_id, trials.c.number, values.c.value,
                              values.c.value_type)
            .join(values, values.c.trial_id == trials.c.trial_id)
            .where(in_study, trials.c.state == "COMPLETE")
            .where(values.c.objective == 0)
            .order_by(*best_first(values, trials, maximize=direction == "MAXIMIZE"))
            .limit(top)
        ).all()  # fmt: skip
        p = tb["params"]
        rows = db.execute(
            sqlalchemy.select(p.c.trial_id, p.c.param_name, p.c.param_value,
                              p.c.distribution_json)
            .where(p.c.trial_id.in_([trial_id for trial_id, *_ in best]))
        ).all()  # fmt: skip
        a = tb["study_attrs"]
        study_attrs = db.execute(
            sqlalchemy.select(a.c.key, a.c.value_json).where(a.c.study_id == study_id)
        ).all()
    params: dict[int, dict[str, Any]] = {trial_id: {} for trial_id, *_ in best}
    for trial_id, param, internal, distribution_json in rows:
        params[trial_id][param] = external(internal, distribution_json)
    return Overview(
        states,
        tagged,
        tuple(
            Ranked(number, stored_value(value, kind), params[trial_id])
            for trial_id, number, value, kind in best
        ),
        {key: json.loads(value) for key, value in study_attrs},
    )


def completed_attrs(
    engine: sqlalchemy.engine.Engine, name: str, keys: tuple[str, ...]
) -> list[tuple[int, float, dict[str, Any]]]:
    """Study `name`'s completed trials: number, value and the user attributes `keys`, by
    number; none where there is no such study."""
    tb = tables()
    studies, trials, values, attrs = tb["studies"], tb["trials"], tb["values"], tb["trial_attrs"]
    query = (
        sqlalchemy.select(trials.c.trial_id, trials.c.number, values.c.value, values.c.value_type)
        .join(studies, studies.c.study_id == trials.c.study_id)
        .join(values, values.c.trial_id == trials.c.trial_id)
        .where(studies.c.study_name == name, trials.c.state == "COMPLETE")
        .where(values.c.objective == 0)
        .order_by(trials.c.number)
    )
    with engine.connect() as db:
        rows = db.execute(query).all()
        found = db.execute(
            sqlalchemy.select(attrs.c.trial_id, attrs.c.key, attrs.c.value_json)
            .join(trials, trials.c.trial_id == attrs.c.trial_id)
            .join(studies, studies.c.study_id == trials.c.study_id)
            .where(studies.c.study_name == name, attrs.c.key.in_(keys))
        ).all()
    by_trial: dict[int, dict[str, Any]] = {}
    for trial_id, key, value in found:
        by_trial.setdefault(trial_id, {})[key] = json.loads(value)
    return [
        (number, stored_value(value, kind), by_trial.get(trial_id, {}))
        for trial_id, number, value, kind in rows
    ]


def best_first(
    values: sqlalchemy.TableClause, trials: sqlalchemy.TableClause, maximize: bool
) -> tuple[sqlalchemy.ColumnElement[Any], ...]:
    """ORDER BY completed trials joined to their values, best first as Optuna ranks them
    (`TrialModel.find_max_value_trial_id`), a tie to the earlier trial. The sign comes first:
    ±inf is a NULL value, which SQLite sorts last and PostgreSQL first."""
    kind = values.c.value_type
    sign = sqlalchemy.case((kind == "INF_NEG", -1), (kind == "INF_POS", 1), else_=0)
    if maximize:
        return sign.desc(), values.c.value.desc(), trials.c.number
    return sign.asc(), values.c.value.asc(), trials.c.number


def stored_value(value: float | None, value_type: str) -> float:
    """A trial's value as Optuna reads it back (`TrialValueModel.stored_repr_to_value`)."""
    if value_type == "INF_POS":
        return math.inf
    if value_type == "INF_NEG":
        return -math.inf
    assert value is not None, "a finite value is stored"
    return value


def study_attr(engine: sqlalchemy.engine.Engine, name: str, key: str) -> Any | None:
    """Study `name`'s user attribute `key`; None where there is no such study or attribute."""
    tb = tables()
    studies, attrs = tb["studies"], tb["study_attrs"]
    query = (
        sqlalchemy.select(attrs.c.value_json)
        .join(studies, studies.c.study_id == attrs.c.study_id)
        .where(studies.c.study_name == name, attrs.c.key == key)
    )
    with engine.connect() as db:
        value = db.scalar(query)
    return None if value is None else json.loads(value)


def external(internal: float, distribution_json: str) -> Any:
    """A stored parameter's value as the trial drew it: Optuna's
    `json_to_distribution(distribution_json).to_external_repr(internal)` for the three
    distributions tuner draws from (anything else is handed to Optuna)."""
    distribution = json.loads(distribution_json)
    kind, attributes = distribution.get("name"), distribution.get("attributes", {})
    if kind == "CategoricalDistribution":
        return attributes["choices"][int(internal)]
    if kind == "FloatDistribution":
        return float(internal)
    if kind == "IntDistribution":
        return int(internal)
    from optuna.distributions import json_to_distribution

    return json_to_distribution(distribution_json).to_external_repr(internal)


def rename_study(engine: sqlalchemy.engine.Engine, study_id: int, old: str, new: str) -> bool:
    """Study `study_id`, named `old`, is named `new`: one UPDATE, atomic (Optuna has no
    rename; `copy_study` would copy every trial, and a kill midway would leave half a copy
    under the new name). False where another process renamed it first."""
    studies = tables()["studies"]
    with engine.begin() as db:
        done = db.execute(
            sqlalchemy.update(studies)
            .where(studies.c.study_id == study_id, studies.c.study_name == old)
            .values(study_name=new)
        )
    return done.rowcount == 1
