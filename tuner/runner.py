"""Create, run and report on a study: Optuna storage, sampler and pruner, and the MLflow parent."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import ConfigError, TunerError
from tuner.spec import StudySpec
from tuner.stores import Stores, optuna_storage

if TYPE_CHECKING:
    import torch

    from tuner.tracking import Tracker

# torch, scikit-learn and mlflow are imported by the functions that train or log, not here:
# `tuner study status` needs only Optuna and answers in a second instead of five.

PARENT_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
SPEC_ATTR = "spec_sha256"
STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Optuna logs every failed trial with its traceback; tuner prints one line with the reason and
# keeps the traceback in the trial's MLflow run (error.txt).
logging.getLogger("optuna.study._optimize").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def spec_digest(spec: StudySpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()


def pick_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch")
    return device


def make_sampler(spec: StudySpec, n_existing: int) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already stored: a restarted study must not replay the
    # random start-up points it drew the first time.
    seed = (spec.sampler.seed if spec.sampler.seed is not None else spec.seed) + n_existing
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


@dataclass(frozen=True)
class Created:
    created: bool
    parent_run_id: str
    experiment_id: str


def create_study(spec: StudySpec, stores: Stores, tracker: Tracker | None = None) -> Created:
    """Create the Optuna study, the MLflow experiment and the study's parent run, once."""
    from tuner.tracking import Tracker

    storage = optuna_storage(stores)
    tracker = tracker or Tracker(stores)
    experiment_id = tracker.experiment_id(spec.name, create=True)
    study = optuna.create_study(
        study_name=spec.name, storage=storage, direction="maximize", load_if_exists=True
    )
    attrs = study.user_attrs
    if PARENT_ATTR in attrs:
        return Created(False, attrs[PARENT_ATTR], attrs[EXPERIMENT_ATTR])
    parent = tracker.create_parent(experiment_id, spec.to_dict(), stores.optuna_url)
    study.set_user_attr(PARENT_ATTR, parent)
    study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
    study.set_user_attr(SPEC_ATTR, spec_digest(spec))
    study.set_user_attr("objective", "validation accuracy after the last epoch")
    return Created(True, parent, experiment_id)


def load_study(spec: StudySpec, stores: Stores) -> optuna.Study:
    storage = optuna_storage(stores)
    try:
        n_existing = storage.get_n_trials(storage.get_study_id_from_name(spec.name))
    except KeyError:
        raise TunerError(
            f"no study {spec.name!r} in {stores.optuna_url}; run `tuner study create` first"
        ) from None
    return optuna.load_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec, n_existing),
        pruner=make_pruner(spec),
    )


@dataclass(frozen=True)
class RunSummary:
    ran: dict[str, int]  # this session's trials by state
    seconds: float
    best: FrozenTrial | None
    failures: dict[int, str]  # trial number → reason, this session


def run_study(
    spec: StudySpec,
    stores: Stores,
    *,
    n_trials: int | None,
    timeout: float | None,
    data_dir: Path,
    device: torch.device,
    say: Callable[[str], None] = print,
) -> RunSummary:
    from tuner.data import load_train_val
    from tuner.objective import REASON_ATTR, StudyContext, TrialFailed, make_objective
    from tuner.tracking import Tracker

    tracker = Tracker(stores)
    created = create_study(spec, stores, tracker)
    if created.created:
        say(f"created study {spec.name!r}")
    study = load_study(spec, stores)
    if study.user_attrs.get(SPEC_ATTR) != spec_digest(spec):
        say("warning: the study file changed since the study was created; "
            "earlier trials were run with the old settings")  # fmt: skip
    before = {t.number for t in study.get_trials(deepcopy=False)}
    say(f"loading CIFAR-10 from {data_dir} onto {device} …")
    data = load_train_val(data_dir, spec.data, spec.seed, device)
    say(f"  {len(data.train)} training and {len(data.val)} validation images from {data.source}")
    n = n_trials if n_trials is not None else spec.trials
    say(f"running {n} trials of {spec.name!r} on {device}"
        + (f", for at most {timeout:.0f} s" if timeout else ""))  # fmt: skip
    ctx = StudyContext(spec, data, tracker, created.experiment_id, created.parent_run_id, say)
    started = time.perf_counter()
    tracker.parent_running(created.parent_run_id, True)
    try:
        study.optimize(
            make_objective(ctx), n_trials=n, timeout=timeout, catch=(TrialFailed,),
            gc_after_trial=device.type == "cpu",
        )  # fmt: skip
    finally:
        update_parent(study, tracker, created.parent_run_id)
        tracker.parent_running(created.parent_run_id, False)
    ran = [t for t in study.get_trials(deepcopy=False) if t.number not in before]
    return RunSummary(
        ran=dict(Counter(STATE_NAMES.get(t.state, t.state.name.lower()) for t in ran)),
        seconds=time.perf_counter() - started,
        best=best_trial(study),
        failures={
            t.number: t.user_attrs.get(REASON_ATTR, "unknown")
            for t in ran
            if t.state == TrialState.FAIL
        },
    )


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


def counts(study: optuna.Study) -> dict[str, int]:
    tally = Counter(STATE_NAMES.get(t.state) for t in study.get_trials(deepcopy=False))
    return {name: tally.get(name, 0) for name in ("complete", "pruned", "failed", "running")}


def update_parent(study: optuna.Study, tracker: Tracker, parent_run_id: str) -> None:
    """Best value so far and Optuna's history and importance plots, on the parent run."""
    best = best_trial(study)
    figures = _plots(study)
    try:
        tracker.summarize_parent(
            parent_run_id,
            counts=counts(study),
            best=(best.number, best.value, best.params) if best else None,
            figures=figures,
        )
    finally:
        import matplotlib.pyplot as plt

        for figure in figures.values():
            plt.close(figure)


def _plots(study: optuna.Study) -> dict[str, object]:
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figures: dict[str, object] = {}
    if not complete:
        return figures
    figures["optimization_history"] = ovm.plot_optimization_history(study).figure
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():  # PED-ANOVA warns on a handful of trials
                warnings.simplefilter("ignore", UserWarning)
                figures["param_importances"] = ovm.plot_param_importances(study).figure
        except (ValueError, RuntimeError) as exc:  # too few distinct points to rank
            logging.getLogger(__name__).info("no importance plot yet: %s", exc)
    return figures


@dataclass(frozen=True)
class Status:
    counts: dict[str, int]
    best: FrozenTrial | None
    top: list[FrozenTrial]
    parent_run_id: str | None


def study_status(spec: StudySpec, stores: Stores, top: int = 5) -> Status:
    study = load_study(spec, stores)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(complete, key=lambda t: t.value, reverse=True)
    return Status(
        counts=counts(study),
        best=ranked[0] if ranked else None,
        top=ranked[:top],
        parent_run_id=study.user_attrs.get(PARENT_ATTR),
    )
