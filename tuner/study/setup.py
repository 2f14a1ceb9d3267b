"""Set up a study: its Optuna storage, sampler and pruner; create it (with its MLflow experiment
and parent run) once, and open it again."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna

from tuner.errors import TunerError
from tuner.records import EXPERIMENT_ATTR, OBJECTIVE_ATTR, PARENT_ATTR, SPEC_ATTR
from tuner.spec import StudySpec
from tuner.stores import Stores, creation_lock, optuna_storage, use_wal

if TYPE_CHECKING:
    from tuner.tracking import StudyRuns, Tracker

# torch, scikit-learn and mlflow are imported by the functions that train or log, not here:
# `tuner study status` needs only Optuna and answers in a second instead of five.

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
SAMPLER_SEED_STRIDE = 1_000_003  # between workers' seeds: far apart, whatever the study's size


@dataclass(frozen=True)
class Created:
    """What `create` found or made; its ids travel down to every worker and trial."""

    created: bool  # False: the study was there already
    runs: StudyRuns
    tracker: Tracker


def spec_digest(spec: StudySpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()


def make_sampler(spec: StudySpec, n_existing: int, worker: int = 0) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already stored: a restarted study must not replay the
    # random start-up points it drew the first time; and by the worker's index: workers that
    # start together must not all draw the same points.
    base = spec.sampler.seed if spec.sampler.seed is not None else spec.seed
    seed = base + n_existing + SAMPLER_SEED_STRIDE * worker
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        n_startup_trials=spec.sampler.n_startup_trials,
        seed=seed,
        multivariate=True,
        group=True,  # the learning rate is conditional on the optimizer
    )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.type == "hyperband":  # resources are epochs
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_epochs,
            max_resource=spec.train.epochs,
            reduction_factor=p.reduction_factor,
        )
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.warmup_epochs
        )
    return optuna.pruners.NopPruner()


def storage_for(spec: StudySpec, stores: Stores) -> optuna.storages.RDBStorage:
    return optuna_storage(stores, spec.limits.heartbeat, spec.limits.grace)


def create(spec: StudySpec, stores: Stores) -> Created:
    """Create the schemas, the Optuna study, the MLflow experiment and the study's parent run,
    once, whichever of several workers started together gets there first."""
    from tuner.tracking import Tracker, check_tracking

    with creation_lock(stores):
        check_tracking(stores)  # both locations checked before either store is written
        storage = storage_for(spec, stores)
        tracker = Tracker(stores, checked=True)  # MLflow migrates a fresh database here
        created, runs = _create(spec, stores, storage, tracker)
        for url in (stores.optuna_url, stores.tracking_uri):
            use_wal(url)
    return Created(created, runs, tracker)


def _create(
    spec: StudySpec, stores: Stores, storage: optuna.storages.RDBStorage, tracker: Tracker
) -> tuple[bool, StudyRuns]:
    experiment_id = tracker.experiment_id(spec.name, create=True)
    study = optuna.create_study(
        study_name=spec.name, storage=storage, direction="maximize", load_if_exists=True
    )
    if PARENT_ATTR in study.user_attrs:
        return False, study_runs(study)
    parent = tracker.create_parent(experiment_id, spec, stores.optuna_url)
    study.set_user_attr(PARENT_ATTR, parent)
    study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
    study.set_user_attr(SPEC_ATTR, spec_digest(spec))
    study.set_user_attr(OBJECTIVE_ATTR, "validation accuracy after the last epoch")
    return True, study_runs(study)


def study_runs(study: optuna.Study) -> StudyRuns:
    """The MLflow ids `create` stored with the study (read once, then handed down)."""
    from tuner.tracking import StudyRuns

    attrs = study.user_attrs
    return StudyRuns(experiment_id=attrs[EXPERIMENT_ATTR], parent_run_id=attrs[PARENT_ATTR])


def spec_changed(study: optuna.Study, spec: StudySpec) -> bool:
    """The study file differs from the one the study was created with."""
    return study.user_attrs.get(SPEC_ATTR) != spec_digest(spec)


def open_study(spec: StudySpec, stores: Stores, worker: int = 0) -> optuna.Study:
    """The stored study, with a sampler seeded for this worker and the file's pruner."""
    storage = storage_for(spec, stores)
    try:
        n_existing = storage.get_n_trials(storage.get_study_id_from_name(spec.name))
    except KeyError:
        raise TunerError(
            f"no study {spec.name!r} in {stores.optuna_url}; run `tuner study create` first"
        ) from None
    return optuna.load_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec, n_existing, worker),
        pruner=make_pruner(spec),
    )
