"""Set up a study: its Optuna storage, sampler and pruner; create it (with its MLflow experiment
and parent run) once, check on every later start that the stores and the study file still
belong to it, and open it again."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from tuner import _optuna
from tuner.errors import SpecError, StoreError, TunerError
from tuner.pruning import make_pruner
from tuner.records import (
    BASELINE_ATTR,
    EXPERIMENT_ATTR,
    OBJECTIVE_ATTR,
    PARENT_ATTR,
    SETTINGS_PREFIX,
    SPEC_ATTR,
    SPEC_JSON_ATTR,
)
from tuner.spec import StudySpec, parse
from tuner.store_errors import bound_store_wait
from tuner.stores import (
    Stores,
    build_aside,
    build_optuna_schema,
    creation_lock,
    local_artifacts_warning,
    optuna_storage,
    use_wal,
)

if TYPE_CHECKING:
    from tuner.tracking import StudyRuns, Tracker

# torch, scikit-learn and mlflow are imported by the functions that train or log, not here:
# `tuner study status` needs only Optuna and answers in a second instead of five.

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# What a study file may change once the study exists. The search space: never (Optuna cannot
# mix two spaces in one study). The fixed settings of every trial: only when asked, and then
# each trial records the settings it trained with. The rest steers the search, not what a
# trial trains (trials per run, sampler, pruner, limits): free.
SPACE_KEYS = ("space", "model")  # the family is part of what is searched
SETTINGS_KEYS = ("seed", "train", "data")


@dataclass(frozen=True)
class Created:
    """What `create` found or made; its ids travel down to every worker and trial."""

    created: bool  # False: the study was there already
    runs: StudyRuns
    tracker: Tracker


def spec_digest(spec: StudySpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()


def settings_digest(spec: StudySpec) -> str:
    """What a trial records as the fixed settings it trained with (`records.SETTINGS_ATTR`)."""
    return _digest(_settings(spec.to_dict()))


def _settings(resolved: dict[str, Any]) -> dict[str, Any]:
    return {k: resolved.get(k) for k in SETTINGS_KEYS}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def trial_seed(spec: StudySpec, number: int) -> int:
    """The seed of the sampler that draws trial `number`'s point: the study's seed (or the
    sampler's own) and the trial's number. A study run in one process draws the same points,
    trial for trial, every time; trial numbers are unique in a study, so no two trials share a
    seed, whichever worker, node or run asks for them."""
    base = spec.sampler.seed if spec.sampler.seed is not None else spec.seed
    return int(hashlib.sha256(f"{base}/{number}".encode()).hexdigest()[:8], 16)


class TrialSeeded(optuna.samplers.BaseSampler):
    """The study file's sampler, made afresh for each trial and seeded with `trial_seed`.
    Optuna hands the sampler the new trial (its number) in `before_trial`, before any point
    is drawn; everything else is the file's sampler's own. One trial at a time per process."""

    def __init__(self, spec: StudySpec) -> None:
        self._spec = spec
        self._inner = make_sampler(spec, trial_seed(spec, -1))

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = make_sampler(self._spec, trial_seed(self._spec, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        n_startup_trials=spec.sampler.n_startup_trials,
        seed=seed,
        multivariate=True,
        group=True,  # the learning rate is conditional on the optimizer
        # trials running on other workers and nodes count as if they had scored badly, so
        # that the next point is drawn away from them (Optuna 5's default; said, relied on)
        constant_liar=True,
    )


def storage_for(spec: StudySpec, stores: Stores) -> optuna.storages.RDBStorage:
    """The study's storage; from here on this process waits for a store no longer than the
    study's heartbeat and grace allow (`store_errors.bound_store_wait`)."""
    bound_store_wait(spec.limits.heartbeat, spec.limits.grace)
    return optuna_storage(stores, spec.limits.heartbeat, spec.limits.grace)


def create(spec: StudySpec, stores: Stores, *, allow_changed_settings: bool = False) -> Created:
    """Create the schemas, the Optuna study, the MLflow experiment and the study's parent run,
    once, whichever of several workers started together gets there first. A study that exists
    is checked: its MLflow runs must be there, and the study file must keep its contract."""
    from tuner.tracking import Tracker, build_tracking_schema, check_tracking

    with creation_lock(stores):
        check_tracking(stores)  # both locations checked before either store is written
        build_aside(stores.optuna_url, build_optuna_schema, "Optuna storage")
        storage = storage_for(spec, stores)  # a bad URL fails here, before MLflow is touched
        build_aside(stores.tracking_uri, build_tracking_schema, "MLflow tracking")
        tracker = Tracker(stores, checked=True)
        study = stored(spec, storage)
        if study is not None and PARENT_ATTR in study.user_attrs:
            runs = study_runs(study)
            tracker.check_study_runs(runs, spec.name)
            check_contract(study, spec, allow_changed_settings)
            created = False
            enqueue_baselines(study, spec)
        else:  # new, or its set-up was interrupted (or is under way on another node)
            runs, created = _make(spec, stores, storage, tracker, study)
            if created:  # not by each node that lost the race to make the study
                enqueue_baselines(optuna.load_study(study_name=spec.name, storage=storage), spec)
        for url in (stores.optuna_url, stores.tracking_uri):
            use_wal(url)
    warning = local_artifacts_warning(
        stores, spec.name, lambda: tracker.artifact_location(runs.experiment_id)
    )
    if warning:
        log.info(warning)
    return Created(created, runs, tracker)


def enqueue_baselines(study: optuna.Study, spec: StudySpec) -> None:
    """The study file's baselines, as the first trials the workers take; each once: one whose
    point the study has already (in any state) is not queued again."""
    from tuner.space import encode

    for baseline in spec.baselines:
        before = len(study.get_trials(deepcopy=False))
        study.enqueue_trial(
            encode(baseline), user_attrs={BASELINE_ATTR: baseline.name}, skip_if_exists=True
        )
        if len(study.get_trials(deepcopy=False)) > before:
            log.info(f"baseline {baseline.name!r} queued")


def stored(spec: StudySpec, storage: optuna.storages.RDBStorage) -> optuna.Study | None:
    """The study named by `spec` in `storage`; None where it has none."""
    try:
        storage.get_study_id_from_name(spec.name)
    except KeyError:
        return None
    return optuna.load_study(study_name=spec.name, storage=storage)


METRIC_NAME = "val_acc"


def _make(
    spec: StudySpec,
    stores: Stores,
    storage: optuna.storages.RDBStorage,
    tracker: Tracker,
    study: optuna.Study | None,
) -> tuple[StudyRuns, bool]:
    """Make what the study lacks. Nodes that start together on empty stores all get here;
    each step adopts what another node made first: the study and the experiment (their
    names are unique), the attributes (the same values), and the parent run: each node makes
    a candidate, and the first to claim `PARENT_ATTR` (a unique row) wins; the others
    delete theirs. (runs, whether this process's parent won)"""
    from tuner.tracking import StudyRuns

    experiment_id = tracker.experiment_id(spec.name, create=True)
    if study is None:
        study = optuna.create_study(
            study_name=spec.name, storage=storage, direction="maximize", load_if_exists=True
        )
    study_id = storage.get_study_id_from_name(spec.name)
    resolved = spec.to_dict()
    attrs = {
        EXPERIMENT_ATTR: experiment_id,
        SPEC_ATTR: spec_digest(spec),
        SPEC_JSON_ATTR: resolved,
        OBJECTIVE_ATTR: "validation accuracy after the last epoch",
        SETTINGS_PREFIX + settings_digest(spec): _settings(resolved),
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    # what optuna-dashboard and Optuna's plots call the objective ("Objective 0" without);
    # experimental since Optuna 3.2, and said so on every call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC_NAME])

    def claimed() -> str | None:
        return storage.get_study_user_attrs(study_id).get(PARENT_ATTR)

    # another study's parent in this experiment is refused
    tracker.check_foreign_parents(experiment_id, spec.name, stores.optuna_url, claimed)
    parent = claimed()
    mine = None
    if parent is None:
        try:
            mine = tracker.create_parent(experiment_id, spec, stores.optuna_url)
        except StoreError:  # its artifact store, most likely: a new location needs a new one
            tracker.retire_if_empty(experiment_id, spec.name)
            raise
        except Exception:
            # the node that won the claim a moment ago deletes the other candidates, this
            # one among them while it was being written: adopt the winner
            parent = claimed()
            if parent is None:
                raise
        else:
            # last: its presence says the set-up is whole; a kill before it is repaired
            parent = _optuna.claim_user_attr(storage, study_id, PARENT_ATTR, mine)
    # the parents of set-ups cut short, and of the nodes that lost the claim, go
    tracker.remove_other_parents(experiment_id, parent, stores.optuna_url)
    return StudyRuns(experiment_id=experiment_id, parent_run_id=parent), parent == mine


def study_runs(study: optuna.Study) -> StudyRuns:
    """The MLflow ids `create` stored with the study (read once, then handed down)."""
    from tuner.tracking import StudyRuns

    attrs = study.user_attrs
    if PARENT_ATTR not in attrs or EXPERIMENT_ATTR not in attrs:
        raise TunerError(
            f"study {study.study_name!r} was not fully created (its set-up was interrupted); "
            f"run `tuner study create {study.study_name}` to finish it"
        )
    return StudyRuns(experiment_id=attrs[EXPERIMENT_ATTR], parent_run_id=attrs[PARENT_ATTR])


def spec_changed(study: optuna.Study, spec: StudySpec) -> bool:
    """The study file differs from the one the study was created with."""
    return study.user_attrs.get(SPEC_ATTR) != spec_digest(spec)


def check_contract(study: optuna.Study, spec: StudySpec, allow_changed_settings: bool) -> None:
    """The study file against the one the study was created with: a new search space is
    refused; new fixed settings too, unless allowed; the rest is noted."""
    stored = study.user_attrs.get(SPEC_JSON_ATTR)
    if stored is None:  # created before tuner kept the file itself: only its digest is known
        if spec_changed(study, spec):
            log.info(f"warning: {spec.source} changed since the study was created")
        return
    changes = diff(_resolved(stored), spec.to_dict())
    space = [line for key, line in changes if key.split(".")[0] in SPACE_KEYS]
    settings = [line for key, line in changes if key.split(".")[0] in SETTINGS_KEYS]
    steering = [line for _, line in changes if line not in space and line not in settings]
    created = f"the one study {spec.name!r} was created with"
    if space:
        raise SpecError(
            f"{spec.source}: the search space differs from {created}:\n"
            + "\n".join(space)
            + "\nA study searches one space: undo the edit, or give the study a new `name:` "
            "to search the new space in a study of its own."
        )
    if settings and not allow_changed_settings:
        raise SpecError(
            f"{spec.source}: the fixed settings differ from {created}:\n"
            + "\n".join(settings)
            + "\nTrials trained with other settings do not compare: undo the edit, give the "
            "study a new `name:`, or pass --allow-changed-settings to go on with them (each "
            "trial records the settings it trained with)."
        )
    if settings:
        log.info(
            f"warning: {spec.source}: trials from now on train with changed settings "
            f"({SETTINGS_PREFIX}{settings_digest(spec)}):\n" + "\n".join(settings)
        )
        study.set_user_attr(SETTINGS_PREFIX + settings_digest(spec), _settings(spec.to_dict()))
    if steering:
        log.info(f"{spec.source} changed since the study was created:\n" + "\n".join(steering))


def _resolved(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored study file with today's defaults filled in: a default added to tuner since is
    no change of the user's."""
    try:
        return parse(stored).to_dict()
    except SpecError:
        return stored


def diff(old: Any, new: Any, key: str = "") -> list[tuple[str, str]]:
    """Each changed setting: its dotted key, and a line `  train.epochs: 2 → 3`."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[tuple[str, str]] = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in old:
                found.append((sub, f"  {sub}: (absent) → {new[k]!r}"))
            elif k not in new:
                found.append((sub, f"  {sub}: {old[k]!r} → (absent)"))
            else:
                found += diff(old[k], new[k], sub)
        return found
    return [] if old == new else [(key, f"  {key}: {old!r} → {new!r}")]


def open_study(spec: StudySpec, stores: Stores) -> optuna.Study:
    """The stored study, with the file's sampler (seeded for each trial: `TrialSeeded`) and
    pruner."""
    storage = storage_for(spec, stores)
    try:
        storage.get_study_id_from_name(spec.name)
    except KeyError:
        raise TunerError(
            f"no study {spec.name!r} in {stores.optuna_url}; run `tuner study create` first"
        ) from None
    return optuna.load_study(
        study_name=spec.name,
        storage=storage,
        sampler=TrialSeeded(spec),
        pruner=make_pruner(spec),
    )
