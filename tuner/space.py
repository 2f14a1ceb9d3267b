"""The search space as data: Optuna distributions; the one place that knows conditionals.
Optuna is imported where a distribution is made: `study status` decodes points without it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuner.spec import (
    Augment,
    FloatRange,
    GoogLeNetSpace,
    IntRange,
    Optimizer,
    Param,
    SpaceSpec,
    VGGSpace,
)

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution


TRAINING = ("optimizer", "weight_decay", "augment")  # drawn for every family; then the lr


@dataclass(frozen=True)
class TrialParams:
    """One point of the space, decoded: what a trial trains with."""

    optimizer: Optimizer
    lr: float
    weight_decay: float
    augment: Augment
    model: Mapping[str, Any] = field(default_factory=dict)  # the family's (a VGG's depth, …)
    family: str = "vgg"
    builder: str | None = None  # a builder's `package.module:function`, for its name

    def __getattr__(self, name: str) -> Any:
        """A model parameter by name (`params.depth`)."""
        model = self.__dict__.get("model", {})
        if name in model:
            return model[name]
        raise AttributeError(name)

    def as_dict(self) -> dict[str, Any]:
        """The model's parameters, then training's: as they are logged to MLflow."""
        return {**self.model, "optimizer": self.optimizer, "lr": self.lr,
                "weight_decay": self.weight_decay, "augment": self.augment}  # fmt: skip

    def label(self) -> str:
        """What the trial is, in a few characters: `vgg16-bn nesterov` (its run's name, and the
        start of its line on the console)."""
        return f"{self.network()} {self.optimizer}"

    def network(self) -> str:
        """`vgg16-bn`, `googlenet-2s-aux`, or a builder's module (`resnet`)."""
        m = self.model
        if self.family == "vgg":
            return f"{m['depth']}-{'bn' if m['batch_norm'] else 'no-bn'}"
        if self.family == "googlenet":
            return f"googlenet-{m['stages']}s{'-aux' if m['aux'] else ''}"
        return (self.builder or "model").partition(":")[0].rsplit(".", 1)[-1]

    def details(self) -> str:
        """The rest of the point: `lr=5.00e-02 wd=5.0e-04 dropout=0.10 aug=crop_flip`."""
        named = _NAMED.get(self.family, ())
        rest = " ".join(f"{k}={_value(v)}" for k, v in self.model.items() if k not in named)
        return (
            f"lr={self.lr:.2e} wd={self.weight_decay:.1e} {rest + ' ' if rest else ''}"
            f"aug={self.augment}"
        )

    def describe(self) -> str:
        """One line: `vgg16-bn sgd lr=5.00e-02 wd=5.0e-04 dropout=0.10 aug=crop_flip`."""
        return f"{self.label()} {self.details()}"


_NAMED = {"vgg": ("depth", "batch_norm"), "googlenet": ("stages", "aux")}  # in `network()`


def _value(value: Any) -> str:
    """A parameter's value in a line: floats to two decimals (`0.10`), tiny ones in exponent
    form."""
    if isinstance(value, float):
        return f"{value:.2f}" if value == 0 or 0.01 <= abs(value) < 1000 else f"{value:.2e}"
    return str(value)


def log10_twins(params: TrialParams, space: SpaceSpec) -> dict[str, float]:
    """The parameters drawn on a log scale, as log10 (`log10_lr`): MLflow's parallel
    coordinates draw every axis linear, where 1e-5 and 1e-3 sit on top of each other."""
    ranges = {"lr": space.optimizer[params.optimizer].lr, "weight_decay": space.weight_decay,
              **space.model_params()}  # fmt: skip
    values = params.as_dict()
    return {
        f"log10_{name}": math.log10(values[name])
        for name, r in ranges.items()
        if isinstance(r, FloatRange | IntRange) and r.log and name in values
        and values[name] > 0
    }  # fmt: skip


def lr_name(optimizer: str) -> str:
    """The learning rate is conditional on the optimizer, so each has its own parameter."""
    return f"lr_{optimizer}"


def _distribution(how: Param) -> BaseDistribution:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if isinstance(how, FloatRange):
        return FloatDistribution(how.low, how.high, log=how.log)
    if isinstance(how, IntRange):
        return IntDistribution(how.low, how.high, log=how.log, step=how.step)
    return CategoricalDistribution(how)


def fixed_distributions(space: SpaceSpec) -> dict[str, BaseDistribution]:
    """Parameters every trial draws, whatever else it drew: the family's, then training's (a
    VGG's in the order tuner always drew them: a seeded study draws the same points)."""
    model = {name: _distribution(how) for name, how in space.model_params().items()
             if name not in space.CONDITIONS}  # fmt: skip
    training = {"optimizer": _distribution(tuple(space.optimizer)),
                "weight_decay": _distribution(space.weight_decay),
                "augment": _distribution(space.augment)}  # fmt: skip
    return {**model, **training}


def conditional_distributions(space: SpaceSpec) -> dict[str, dict[str, BaseDistribution]]:
    """optimizer → the parameters drawn only when it is chosen."""
    return {opt: {lr_name(opt): _distribution(sub.lr)} for opt, sub in space.optimizer.items()}


def model_conditions(space: SpaceSpec) -> dict[str, tuple[str, Any, BaseDistribution]]:
    """The family's parameters drawn only where another took a value (GoogLeNet's aux_weight,
    where aux is on): {parameter: (on, value, distribution)}."""
    params = space.model_params()
    return {name: (on, value, _distribution(params[name]))
            for name, (on, value) in space.CONDITIONS.items()}  # fmt: skip


def _draw(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)


def suggest(trial: optuna.Trial, space: SpaceSpec, builder: str | None = None) -> TrialParams:
    drawn = {name: _draw(trial, name, d) for name, d in fixed_distributions(space).items()}
    for name, dist in conditional_distributions(space)[drawn["optimizer"]].items():
        drawn[name] = _draw(trial, name, dist)
    for name, (on, value, dist) in model_conditions(space).items():
        if drawn.get(on) == value:
            drawn[name] = _draw(trial, name, dist)
    return decode(drawn, space.family, builder)


def encode(point: Any) -> dict[str, Any]:
    """A point (`TrialParams` or a baseline) → Optuna's flat params, as `suggest` draws them."""
    model = point.model if isinstance(point, TrialParams) else point.model_params()
    flat = {**model, **{name: getattr(point, name) for name in TRAINING}}
    flat[lr_name(point.optimizer)] = point.lr
    return flat


def family_of(params: Mapping[str, Any]) -> str:
    """The family a stored point was drawn from, by its parameters (where no study file is at
    hand: `study status` reads the tables alone)."""
    model = {k for k in params if k not in TRAINING and not k.startswith("lr_")}
    vgg, googlenet = set(VGGSpace.param_names()), set(GoogLeNetSpace.param_names())
    if model == vgg and str(params["depth"]).startswith("vgg"):
        return "vgg"
    if googlenet - GoogLeNetSpace.CONDITIONS.keys() <= model <= googlenet:
        return "googlenet"
    return "builder"  # a builder's parameters may take any name: the label is its module's


def decode(
    params: Mapping[str, Any], family: str | None = None, builder: str | None = None
) -> TrialParams:
    """Optuna's flat `trial.params` → `TrialParams` (also for trials loaded back from storage)."""
    optimizer = params["optimizer"]
    lr = lr_name(optimizer)
    model = {k: v for k, v in params.items()
             if k not in TRAINING and not k.startswith("lr_")}  # fmt: skip
    if family is None:
        family = family_of(params)
    if family == "vgg":  # its values, in the order and types tuner always gave them
        first = {"depth": model["depth"], "batch_norm": bool(model["batch_norm"]),
                 "dropout": float(model["dropout"])}  # fmt: skip
        model = {**first, **{k: v for k, v in model.items() if k not in first}}
    return TrialParams(
        optimizer=optimizer,
        lr=float(params[lr]),
        weight_decay=float(params["weight_decay"]),
        augment=params["augment"],
        model=model,
        family=family,
        builder=builder,
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
