"""How a trial's point is queued again: after running out of memory (at half the batch), after
a store error, and after its worker died. A retry carries the point, not the past: the run id,
reason and worker of the trial it repeats stay on that trial."""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from optuna.trial import FrozenTrial

from tuner.records import (
    ACCUMULATION_ATTR,
    CARRIED_ATTRS,
    FIRST_OF_POINT_ATTR,
    LOST_ATTR,
    RETRY_OF_ATTR,
    RUN_ID_ATTR,
)

MAX_LOST = 1  # a point whose attempts died while training this often is not queued again


def carried(trial: optuna.Trial | FrozenTrial) -> dict[str, object]:
    """What a retry keeps of a trial: its baseline name, what it refits."""
    attrs = trial.user_attrs
    return {k: attrs[k] for k in CARRIED_ATTRS if k in attrs}


def queue_again(
    study: optuna.Study,
    trial: optuna.Trial | FrozenTrial,
    params: Mapping[str, object],
    accumulation: int = 1,
    lost: int = 0,
) -> None:
    """Queue `trial`'s point (`params`) again, with what a retry keeps of it (`carried`) and
    the trial it repeats; `lost`: how many attempts of this point died while training."""
    first = int(trial.user_attrs.get(FIRST_OF_POINT_ATTR, trial.number))
    attrs = {**carried(trial), ACCUMULATION_ATTR: accumulation, RETRY_OF_ATTR: trial.number,
             FIRST_OF_POINT_ATTR: first}  # fmt: skip
    if lost:
        attrs[LOST_ATTR] = lost
    study.enqueue_trial(dict(params), user_attrs=attrs, skip_if_exists=False)


def lost(study: optuna.Study, trial: FrozenTrial) -> bool:
    """A trial failed because its worker died: its point is queued again, whole (what was
    fixed when it was queued, and what it drew). A point lost before it trained (no MLflow run
    yet) is queued again whatever happened to it before; one lost while training, once in
    all: a point that kills its worker twice is left failed. Whether it was queued."""
    attrs = trial.user_attrs
    times = int(attrs.get(LOST_ATTR, 0)) + (RUN_ID_ATTR in attrs)
    if times > MAX_LOST:
        return False
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    queue_again(study, trial, params, int(attrs.get(ACCUMULATION_ATTR, 1)), times)
    return True
