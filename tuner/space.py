"""The search space as data: Optuna distributions; the one place that knows conditionals.
Optuna is imported where a distribution is made: `study status` decodes points without it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tuner.spec import Augment, Depth, FloatRange, Optimizer, SpaceSpec

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution, FloatDistribution


@dataclass(frozen=True)
class TrialParams:
    """One point of the space, decoded: what a trial trains with."""

    depth: Depth
    batch_norm: bool
    dropout: float
    optimizer: Optimizer
    lr: float
    weight_decay: float
    augment: Augment

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        """What the trial is, in a few characters: `vgg16-bn nesterov` (its run's name, and the
        start of its line on the console)."""
        return f"{self.depth}-{'bn' if self.batch_norm else 'no-bn'} {self.optimizer}"

    def details(self) -> str:
        """The rest of the point: `lr=5.00e-02 wd=5.0e-04 dropout=0.10 aug=crop_flip`."""
        return (
            f"lr={self.lr:.2e} wd={self.weight_decay:.1e} dropout={self.dropout:.2f} "
            f"aug={self.augment}"
        )

    def describe(self) -> str:
        """One line: `vgg16-bn sgd lr=5.00e-02 wd=5.0e-04 dropout=0.10 aug=crop_flip`."""
        return f"{self.label()} {self.details()}"


def log10_twins(params: TrialParams, space: SpaceSpec) -> dict[str, float]:
    """The parameters drawn on a log scale, as log10 (`log10_lr`): MLflow's parallel
    coordinates draw every axis linear, where 1e-5 and 1e-3 sit on top of each other."""
    ranges = {"lr": space.optimizer[params.optimizer].lr, "weight_decay": space.weight_decay,
              "dropout": space.dropout}  # fmt: skip
    return {
        f"log10_{name}": math.log10(getattr(params, name))
        for name, r in ranges.items()
        if r.log and getattr(params, name) > 0
    }


def lr_name(optimizer: str) -> str:
    """The learning rate is conditional on the optimizer, so each has its own parameter."""
    return f"lr_{optimizer}"


def _float(r: FloatRange) -> FloatDistribution:
    from optuna.distributions import FloatDistribution

    return FloatDistribution(r.low, r.high, log=r.log)


def fixed_distributions(space: SpaceSpec) -> dict[str, BaseDistribution]:
    """Parameters every trial draws, whatever else it drew."""
    from optuna.distributions import CategoricalDistribution

    return {
        "depth": CategoricalDistribution(space.depth),
        "batch_norm": CategoricalDistribution(space.batch_norm),
        "dropout": _float(space.dropout),
        "optimizer": CategoricalDistribution(tuple(space.optimizer)),
        "weight_decay": _float(space.weight_decay),
        "augment": CategoricalDistribution(space.augment),
    }


def conditional_distributions(space: SpaceSpec) -> dict[str, dict[str, BaseDistribution]]:
    """optimizer → the parameters drawn only when it is chosen."""
    return {opt: {lr_name(opt): _float(sub.lr)} for opt, sub in space.optimizer.items()}


def _draw(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def suggest(trial: optuna.Trial, space: SpaceSpec) -> TrialParams:
    drawn = {name: _draw(trial, name, d) for name, d in fixed_distributions(space).items()}
    for name, dist in conditional_distributions(space)[drawn["optimizer"]].items():
        drawn[name] = _draw(trial, name, dist)
    return decode(drawn)


def encode(point: Any) -> dict[str, Any]:
    """A point (`TrialParams` or a baseline) → Optuna's flat params, as `suggest` draws them."""
    flat = {
        name: getattr(point, name)
        for name in ("depth", "batch_norm", "dropout", "optimizer", "weight_decay", "augment")
    }
    flat[lr_name(point.optimizer)] = point.lr
    return flat


def decode(params: Mapping[str, Any]) -> TrialParams:
    """Optuna's flat `trial.params` → `TrialParams` (also for trials loaded back from storage)."""
    optimizer = params["optimizer"]
    return TrialParams(
        depth=params["depth"],
        batch_norm=bool(params["batch_norm"]),
        dropout=float(params["dropout"]),
        optimizer=optimizer,
        lr=float(params[lr_name(optimizer)]),
        weight_decay=float(params["weight_decay"]),
        augment=params["augment"],
    )


def with_one_lr(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Completed trials with their optimizer's `lr_<optimizer>` renamed `lr`, on one log axis
    spanning every optimizer's range: Optuna's importances, parallel coordinates and slice
    leave out a parameter that some trials lack, so the learning rate, drawn per optimizer,
    would be missing from "what mattered"."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    ranges = [d for t in complete for n, d in t.distributions.items() if n.startswith("lr_")]
    if not ranges:
        return complete
    lr = FloatDistribution(
        min(d.low for d in ranges), max(d.high for d in ranges),  # type: ignore[attr-defined]
        log=all(d.log for d in ranges),  # type: ignore[attr-defined]
    )  # fmt: skip
    flat = []
    for t in complete:
        params = {("lr" if n.startswith("lr_") else n): v for n, v in t.params.items()}
        dists = {("lr" if n.startswith("lr_") else n): (lr if n.startswith("lr_") else d)
                 for n, d in t.distributions.items()}  # fmt: skip
        flat.append(create_trial(value=t.value, params=params, distributions=dists,
                                 user_attrs=t.user_attrs))  # fmt: skip
    return flat
