"""Refits: the best configurations of a search, trained again on train + validation for the
epochs a short search trial only estimated.

They are the trials of a study of their own beside the search (`NAME:refit`, in the same
Optuna storage), each queued with the configuration it retrains (`enqueue_trial`): so the
study's workers, pool, heartbeats, retries and MLflow runs (nested under the parent, role
`refit`) serve them as they serve the search, and none of the search's ranking, pruning or
counts sees them."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from tuner import _optuna
from tuner.errors import TunerError
from tuner.records import (
    EXPERIMENT_ATTR,
    LEGACY_REFIT_SUFFIX,
    PARENT_ATTR,
    REFIT_EPOCHS_ATTR,
    REFIT_OF_ATTR,
    REFIT_OF_RUN_ATTR,
    REFIT_SUFFIX,
    REFITS_OF_ATTR,
    RUN_ID_ATTR,
)
from tuner.spec import NoPrunerSpec, RandomSamplerSpec, StudySpec
from tuner.stores import Stores, creation_lock
from tuner.study.setup import open_study, storage_for, stored

log = logging.getLogger(__name__)
METRIC_NAME = "train_loss"  # a refit's value: its last epoch's (it has no validation images)


@dataclass(frozen=True)
class Refit:
    """A completed refit: its run, and the search trial it retrained."""

    source: int  # the search trial's number
    number: int  # the refit's own trial number (in the refit study)
    run_id: str
    epochs: int


@dataclass(frozen=True)
class Queued:
    """What `prepare` queued or found queued."""

    spec: StudySpec  # the refit study's: its name, no pruner, a random sampler
    sources: tuple[int, ...]  # the search trials it refits now, best first
    done: tuple[int, ...]  # those among the best that have a refit of these epochs already
    waiting: int  # refits queued in all (also from an earlier `tuner refit` that stopped)


def refit_spec(spec: StudySpec) -> StudySpec:
    """The study file as the refits run it: the refit study's name, never pruned, and a
    sampler that is never asked (each refit is queued with its point)."""
    return spec.model_copy(
        update={
            "name": spec.name + REFIT_SUFFIX,
            "sampler": RandomSamplerSpec(type="random", seed=spec.seed),
            "pruner": NoPrunerSpec(type="none"),
            "baselines": (),
        }
    )


def prepare(spec: StudySpec, stores: Stores, top: int, epochs: int) -> Queued:
    """The refit study, made once beside the study; a refit of `epochs` queued for each of
    the `top` best completed trials that has none done, queued or running."""
    search = open_study(spec, stores)
    best = _optuna.best_trials(search, top, RUN_ID_ATTR)  # read alone, not every trial
    if not best:
        raise TunerError(
            f"study {spec.name!r} has no completed trials to refit; run "
            f"`tuner study run {spec.name}` first"
        )
    rspec = refit_spec(spec)
    with creation_lock(stores):  # two `tuner refit` started together queue each refit once
        adopt_legacy(spec, storage_for(spec, stores))
        study = _refit_study(rspec, stores, search)
        have = {
            (t.user_attrs.get(REFIT_OF_ATTR), t.user_attrs.get(REFIT_EPOCHS_ATTR))
            for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        }
        sources, done = [], []
        for trial in best:
            if (trial.number, epochs) in have:
                done.append(trial.number)
                continue
            study.enqueue_trial(
                trial.params,
                user_attrs={
                    REFIT_OF_ATTR: trial.number,
                    REFIT_EPOCHS_ATTR: epochs,
                    REFIT_OF_RUN_ATTR: trial.user_attrs[RUN_ID_ATTR],
                },
                skip_if_exists=False,  # the same point at other epochs is another refit
            )
            sources.append(trial.number)
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    return Queued(rspec, tuple(sources), tuple(done), waiting)


def _refit_study(rspec: StudySpec, stores: Stores, search: optuna.Study) -> optuna.Study:
    storage = storage_for(rspec, stores)
    study = optuna.create_study(
        study_name=rspec.name, storage=storage, direction="minimize", load_if_exists=True
    )
    attrs = search.user_attrs
    wanted = {
        PARENT_ATTR: attrs[PARENT_ATTR],
        EXPERIMENT_ATTR: attrs[EXPERIMENT_ATTR],
        REFITS_OF_ATTR: search.study_name,
    }
    for key, value in wanted.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and said so on every call
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC_NAME])
    return study


def completed_refits(spec: StudySpec, stores: Stores) -> dict[int, Refit]:
    """Each search trial's completed refit (the latest, when it has several), by its number;
    empty where the study has none."""
    storage = storage_for(spec, stores)
    adopt_legacy(spec, storage)
    study = stored(refit_spec(spec), storage)
    if study is None:
        return {}
    found: dict[int, Refit] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if REFIT_OF_ATTR in t.user_attrs and RUN_ID_ATTR in t.user_attrs:
            source = int(t.user_attrs[REFIT_OF_ATTR])
            refit = Refit(source, t.number, t.user_attrs[RUN_ID_ATTR],
                          int(t.user_attrs.get(REFIT_EPOCHS_ATTR, 0)))  # fmt: skip
            if source not in found or refit.number > found[source].number:
                found[source] = refit
    return found


def adopt_legacy(spec: StudySpec, storage: optuna.storages.RDBStorage) -> None:
    """The refits made when the refit study was `NAME.refit` are NAME's refits still: that
    study, made by `tuner refit NAME` (it names NAME its source), is renamed `NAME:refit`
    where no such study exists yet; else `tuner refit` would train them all again, and
    `tuner ensemble --from refit` and `study status` would not see them."""
    from tuner._tables import rename_study

    legacy, name = spec.name + LEGACY_REFIT_SUFFIX, spec.name + REFIT_SUFFIX
    try:
        storage.get_study_id_from_name(name)
        return
    except KeyError:
        pass
    try:
        study_id = storage.get_study_id_from_name(legacy)
    except KeyError:
        return
    if storage.get_study_user_attrs(study_id).get(REFITS_OF_ATTR) != spec.name:
        return  # a study of its own that a study file named so
    if rename_study(storage.engine, study_id, legacy, name):
        log.info(f"the refits of {spec.name!r} (Optuna study {legacy!r}) are now {name!r}")
