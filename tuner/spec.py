"""The study file: YAML in, one validated and frozen `StudySpec` out, before anything trains."""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Strict,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from tuner.errors import SpecError

NAME_CHARS = 64  # longest study name
# a study name's characters: safe in a URL and a file name. tuner's own studies add a suffix
# outside them (records.REFIT_SUFFIX), so that no study file can name one
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"

Depth = Literal["vgg11", "vgg13", "vgg16", "vgg19"]
Optimizer = Literal["sgd", "nesterov", "adam", "adamw"]
Augment = Literal["none", "flip", "crop_flip", "crop_flip_cutout"]
Schedule = Literal["constant", "cosine", "onecycle"]

# Scalars are strict (no "1e-3" → 0.001, no True → 1); an int is still a valid float.
Float = Annotated[float, Strict()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
# numpy's and scikit-learn's seeds are 32-bit and never negative: a seed they refuse would
# only fail the first trial
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]
# Counts and durations are bounded where they are read, so that no setting reaches torch, a
# thread's timeout or SQLite as a number they cannot take (a day is 86,400 s)
MAX_COUNT, MAX_EPOCHS, MAX_TOP = 1_000_000, 100_000, 1000  # the command line's ceilings too
Count = Annotated[int, Strict(), Field(gt=0, le=MAX_COUNT)]
Epochs = Annotated[int, Strict(), Field(gt=0, le=MAX_EPOCHS)]
Seconds = Annotated[int, Strict(), Field(gt=0, le=30 * 86_400)]  # at most 30 days


DataSet = Literal["cifar10", "cifar100", "fashion-mnist"]
# a user's function, `package.module:function` (a model builder, a data loader)
Import = Annotated[
    str, Strict(), Field(max_length=200, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
]


class _Frozen(BaseModel):
    # NaN and ±inf are refused in every float: a NaN bound is never equal to itself (the
    # study would look changed forever), and an infinite one reaches Optuna as a range
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FloatRange(_Frozen):
    """A float searched in [low, high], on a log scale when `log` is set."""

    low: Float
    high: Float
    log: Bool = False

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low must not exceed high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got low={self.low}")
        return self


class OptimizerSpace(_Frozen):
    """Per-optimizer ranges: Adam's useful learning rates are not SGD's."""

    lr: FloatRange


class IntRange(_Frozen):
    """An int searched in [low, high] in steps of `step` (a builder's parameter)."""

    low: Int
    high: Int
    step: Annotated[Int, Field(ge=1)] = 1
    log: Bool = False

    @model_validator(mode="after")
    def _check(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low must not exceed high, got low={self.low}, high={self.high}")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError(f"a log-scale range needs low > 0 and step 1, got {self}")
        return self


Choice = Annotated[bool, Strict()] | Int | Float | Annotated[str, Strict(), Field(max_length=200)]


def _distinct(choices: tuple[Any, ...]) -> tuple[Any, ...]:
    """Optuna takes equal choices for one (`1`, `1.0` and `true`): a value given twice would
    come back as the other."""
    for i, a in enumerate(choices):
        for b in choices[i + 1 :]:
            if a == b:
                raise ValueError(f"choices {a!r} and {b!r} are one to Optuna: give each once")
    return choices


Choices = Annotated[tuple[Choice, ...], Field(min_length=1), AfterValidator(_distinct)]
Param = Choices | FloatRange | IntRange  # how a model parameter is searched


def _param_kind(value: Any) -> str | None:
    if isinstance(value, list | tuple):
        return "choices"
    if isinstance(value, dict):
        return "int" if "step" in value else "float"
    if isinstance(value, FloatRange | IntRange):
        return "float" if isinstance(value, FloatRange) else "int"
    return None


BuilderParam = Annotated[
    Annotated[Choices, Tag("choices")]
    | Annotated[FloatRange, Tag("float")]
    | Annotated[IntRange, Tag("int")],
    Discriminator(
        _param_kind,
        custom_error_type="param_kind",
        custom_error_message="a parameter is a list of choices, or a range {low, high} "
        "(with step: an int range)",
    ),
]


class SpaceSpec(_Frozen):
    """What every family searches: how each trial trains. A family's own parameters are the
    fields of its subclass, with their defaults: one place per family."""

    family: str = Field("", exclude=True)  # set from `model:` (StudySpec); never written
    optimizer: dict[Optimizer, OptimizerSpace] = Field(min_length=1)
    weight_decay: FloatRange
    augment: tuple[Augment, ...] = Field(min_length=1)

    # a parameter drawn only where another took a value: {parameter: (on, value)}
    CONDITIONS: ClassVar[dict[str, tuple[str, Any]]] = {}

    @model_validator(mode="after")
    def _check_training(self) -> SpaceSpec:
        if self.weight_decay.low < 0:
            raise ValueError(f"weight_decay must be >= 0, got low={self.weight_decay.low}")
        dropout = self.model_params().get("dropout")
        if isinstance(dropout, FloatRange) and not 0 <= dropout.low <= dropout.high < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        return self

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """The family's own parameters, as its class declares them, in the order they are drawn
        (none for a builder's: the study file names them)."""
        return tuple(k for k in cls.model_fields if k not in SpaceSpec.model_fields)

    def model_params(self) -> dict[str, Param]:
        """The family's parameters and how each is searched, in the order they are drawn."""
        return {k: getattr(self, k) for k in self.param_names()}


class VGGSpace(SpaceSpec):
    """VGG (`model: vgg`, the default)."""

    family: Literal["vgg"] = Field("vgg", exclude=True)
    depth: tuple[Depth, ...] = Field(("vgg11", "vgg13", "vgg16", "vgg19"), min_length=1)
    batch_norm: tuple[Bool, ...] = Field((True, False), min_length=1)
    dropout: FloatRange = FloatRange(low=0.0, high=0.5)  # before the classifier


class GoogLeNetSpace(SpaceSpec):
    """GoogLeNet for small images (`model: googlenet`): inception stages (1: 3a-3b, 2: + 4a-4e,
    3: + 5a-5b), a channel multiplier, auxiliary classifiers and their loss weight."""

    family: Literal["googlenet"] = Field("googlenet", exclude=True)
    stages: tuple[Annotated[int, Strict(), Field(ge=1, le=3)], ...] = Field(
        (1, 2, 3), min_length=1
    )
    width: FloatRange = FloatRange(low=0.25, high=1.0)  # × train.width
    aux: tuple[Bool, ...] = Field((True, False), min_length=1)
    aux_weight: FloatRange = FloatRange(low=0.1, high=0.5)  # of each auxiliary loss
    dropout: FloatRange = FloatRange(low=0.0, high=0.5)  # before the classifier

    CONDITIONS: ClassVar[dict[str, tuple[str, Any]]] = {"aux_weight": ("aux", True)}

    @model_validator(mode="after")
    def _check_width(self) -> GoogLeNetSpace:
        if self.width.low <= 0 or self.width.high > 4:
            raise ValueError(f"width must lie in (0, 4], got {self.width}")
        if self.aux_weight.low < 0:
            raise ValueError(f"aux_weight must be >= 0, got low={self.aux_weight.low}")
        return self


# parameter names a builder's cannot take: the training keys, and the learning rates' names
# and what tuner logs beside a trial's parameters in MLflow (records.ACCUMULATION_ATTR,
# REFIT_OF_ATTR, the run's `state`, the `log10_` twins)
RESERVED = frozenset({"family", "optimizer", "weight_decay", "augment", "lr", "state",
                      "grad_accumulation", "refit_of"})  # fmt: skip


class BuilderSpace(SpaceSpec):
    """A user's builder (`model: {builder: ...}`): its parameters are the other keys of
    `space`, each a list of choices or a range; it receives them as drawn."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    __pydantic_extra__: dict[str, BuilderParam] = Field(init=False)  # type: ignore[assignment]
    family: Literal["builder"] = Field("builder", exclude=True)

    @model_validator(mode="after")
    def _check_names(self) -> BuilderSpace:
        for name in self.model_params():
            if (name in RESERVED or name.startswith(("lr_", "log10_"))
                    or not name.isidentifier()):  # fmt: skip
                raise ValueError(
                    f"{name!r} cannot name a builder's parameter (tuner's own keys, and names "
                    "that are not Python identifiers, are taken)"
                )
        return self

    def model_params(self) -> dict[str, Param]:
        return dict(self.__pydantic_extra__ or {})


FAMILIES: dict[str, type[SpaceSpec]] = {
    "vgg": VGGSpace, "googlenet": GoogLeNetSpace, "builder": BuilderSpace,
}  # fmt: skip
AnySpace = Annotated[VGGSpace | GoogLeNetSpace | BuilderSpace, Field(discriminator="family")]


class BuilderSpec(_Frozen):
    """`model: {builder: "package.module:function"}`: called with the drawn parameters, the
    input shape (channels, height, width) and the number of classes; returns an nn.Module."""

    builder: Import


# `model:` is a family's name, or a mapping naming a builder: one or the other is read, and
# only its errors are said
ModelChoice = Annotated[
    Annotated[Literal["vgg", "googlenet"], Tag("family")]
    | Annotated[BuilderSpec, Tag("BuilderSpec")],
    Discriminator(lambda v: "BuilderSpec" if isinstance(v, dict | BuilderSpec) else "family"),
]


class TrainSpec(_Frozen):
    epochs: Epochs
    batch_size: Annotated[int, Strict(), Field(gt=0, le=65_536)] = 512
    schedule: Schedule = "onecycle"
    warmup_fraction: Annotated[Float, Field(ge=0, lt=1)] = 0.2  # of all steps (onecycle/cosine)
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.9  # SGD and Nesterov
    label_smoothing: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    width: Annotated[Float, Field(gt=0, le=4)] = 1.0  # channel multiplier; tests use 1/8
    cutout_size: Annotated[Int, Field(ge=1, le=32)] = 8  # pixels, for crop_flip_cutout
    crop_padding: Annotated[Int, Field(ge=0, le=16)] = 4  # pixels, for crop_*
    # the training step: inductor (torch.compile, CUDA graphs on a GPU; `on` says the same),
    # graphs (CUDA graphs without code generation; a GPU only) or off; auto: train.AUTO_ON_GPU
    # on a GPU (inductor, until `.ci/gpu bench` measures that another pays), off on the CPU
    compile: Literal["auto", "on", "inductor", "graphs", "off"] = "auto"


class DataSpec(_Frozen):
    # a known data set (downloaded where it can be), or a user's function returning arrays:
    # ((train_images, train_labels), (test_images, test_labels)), uint8 images, int labels
    set: DataSet | None = "cifar10"
    loader: Import | None = None
    val_size: Count = 5000  # images carved from the training set, stratified and seeded
    train_size: Count | None = None  # cap on training images (None: all that remain)
    test_size: Count | None = None  # cap on test images for `tuner ensemble` (None: all)

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, raw: Any) -> Any:
        """`loader` replaces `set`: given both, say so; given a loader, `set` is null."""
        if isinstance(raw, dict) and raw.get("loader") is not None:
            if raw.get("set") is not None:
                raise ValueError("give data.set or data.loader, not both")
            raw = {**raw, "set": None}
        return raw

    @model_validator(mode="after")
    def _some_source(self) -> DataSpec:
        if self.set is None and self.loader is None:
            raise ValueError("data.set is null: name a data set, or give data.loader")
        return self

    @property
    def name(self) -> str:
        """`cifar10`, or the loader's `package.module:function`."""
        return self.set or str(self.loader)


class LimitsSpec(_Frozen):
    """How a study survives its failures: hung trials, dead workers, out-of-memory."""

    # wall-clock seconds per trial, at most 30 days
    trial_timeout: Annotated[Float, Field(gt=0, le=30 * 86_400)] | None = None
    # seconds between a running trial's heartbeats, at most a day
    heartbeat: Annotated[int, Strict(), Field(gt=0, le=86_400)] = 10
    # seconds of silence after which a trial's worker is taken for dead; more than twice the
    # heartbeat: a live worker waits for a store at most grace - 2 × heartbeat
    grace: Seconds = 60
    retry_out_of_memory: Bool = True  # once, at half the batch with 2-step gradient accumulation

    @model_validator(mode="after")
    def _check(self) -> LimitsSpec:
        if self.grace <= 2 * self.heartbeat:
            raise ValueError(
                "grace must exceed twice heartbeat (a live worker waits for a store at most "
                f"grace - 2 × heartbeat), got heartbeat={self.heartbeat}, grace={self.grace}"
            )
        return self


class TPESamplerSpec(_Frozen):
    type: Literal["tpe"]
    n_startup_trials: Annotated[Int, Field(ge=0, le=1_000_000)] = 10
    seed: Int | None = None  # None: the study's seed; any int (hashed: setup.trial_seed)


class RandomSamplerSpec(_Frozen):
    type: Literal["random"]
    seed: Int | None = None


class HyperbandPrunerSpec(_Frozen):
    type: Literal["hyperband"]
    min_epochs: Epochs = 1  # the smallest budget a trial gets before it can be pruned
    reduction_factor: Annotated[Int, Field(ge=2, le=100)] = 3


class MedianPrunerSpec(_Frozen):
    type: Literal["median"]
    n_startup_trials: Annotated[Int, Field(ge=0, le=1_000_000)] = 5
    warmup_epochs: Annotated[Int, Field(ge=0, le=100_000)] = 1


class NoPrunerSpec(_Frozen):
    type: Literal["none"]


class RefitSpec(_Frozen):
    """`tuner refit`'s defaults: how many of the best configurations to train again on train +
    validation, and for how many epochs (None: the search's `train.epochs`)."""

    top: Annotated[int, Strict(), Field(gt=0, le=MAX_TOP)] = 5
    epochs: Epochs | None = None


class BaselineSpec(_Frozen):
    """A fixed point of the space, tried before the sampler draws any: a known-good recipe
    the study must beat, or a known failure the study should show. Besides these keys, it
    gives a value for each of the family's parameters (a VGG's depth, batch_norm, dropout)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    __pydantic_extra__: dict[str, Choice] = Field(init=False)  # type: ignore[assignment]
    name: Annotated[str, Strict(), Field(min_length=1, max_length=40)]
    optimizer: Optimizer
    lr: Float
    weight_decay: Float
    augment: Augment

    def model_params(self) -> dict[str, Any]:
        """Its values of the family's parameters."""
        return dict(self.__pydantic_extra__ or {})


def _same(value: Any, choice: Any) -> bool:
    """`value` is `choice`, type for type: YAML's `1` is not `true`, nor `1.0`."""
    return type(value) is type(choice) and value == choice


def _outside(b: BaselineSpec, space: SpaceSpec) -> list[str]:
    """What of baseline `b` lies outside the search space (Optuna would sample it anyway), or
    is missing from it, or is not the family's."""
    params = space.model_params()
    given = b.model_params()
    found = [f"{k} is not a parameter of model {space.family!r}" for k in given if k not in params]
    ranges: list[tuple[str, Any, Any]] = [
        ("weight_decay", b.weight_decay, space.weight_decay),
        ("augment", b.augment, space.augment),
        ("optimizer", b.optimizer, tuple(space.optimizer)),
    ]
    if b.optimizer in space.optimizer:
        ranges.append(("lr", b.lr, space.optimizer[b.optimizer].lr))
    for key, how in params.items():
        on = space.CONDITIONS.get(key)
        if on is not None and given.get(on[0]) != on[1]:
            if key in given:  # it would be dropped silently
                found.append(f"{key} is drawn only where {on[0]}={on[1]!r}: leave it out")
            continue  # not drawn for this point
        if key not in given:
            found.append(f"{key} is missing")
        else:
            ranges.append((key, given[key], how))
    for key, value, how in ranges:
        if isinstance(how, tuple) and not any(_same(value, c) for c in how):
            found.append(f"{key}={value!r} is not among {list(how)}")
        elif isinstance(how, FloatRange | IntRange) and not (
            isinstance(value, int | float) and not isinstance(value, bool)
            and how.low <= value <= how.high
        ):  # fmt: skip
            found.append(f"{key}={value!r} is outside [{how.low}, {how.high}]")
        elif isinstance(how, IntRange) and not isinstance(value, int):
            found.append(f"{key}={value!r} is not an int")
        elif isinstance(how, IntRange) and (value - how.low) % how.step:
            found.append(f"{key}={value!r} is off the range's steps ({how.low}, "
                         f"{how.low + how.step}, …)")  # fmt: skip
    return found


SamplerSpec = Annotated[TPESamplerSpec | RandomSamplerSpec, Field(discriminator="type")]
PrunerSpec = Annotated[
    HyperbandPrunerSpec | MedianPrunerSpec | NoPrunerSpec, Field(discriminator="type")
]


class StudySpec(_Frozen):
    """A whole study: what is searched, how each trial trains, how the search runs."""

    # a study name becomes an MLflow experiment and run names: short, and safe in a URL
    name: Annotated[str, Strict(), Field(max_length=NAME_CHARS, pattern=f"^{NAME_PATTERN}$")]
    seed: Seed = 0
    trials: Count = 20  # the finished trials the study aims at, whoever runs them
    model: ModelChoice = "vgg"  # the family searched
    space: AnySpace  # the family's parameters (its defaults where left out) and training's
    train: TrainSpec
    data: DataSpec = DataSpec()
    sampler: SamplerSpec = TPESamplerSpec(type="tpe")
    pruner: PrunerSpec = HyperbandPrunerSpec(type="hyperband")
    limits: LimitsSpec = LimitsSpec()
    baselines: tuple[BaselineSpec, ...] = ()  # enqueued as the study's first trials
    refit: RefitSpec = RefitSpec()
    _source: str = PrivateAttr(default="")  # the file it was read from, for messages

    @field_validator("model", mode="before")
    @classmethod
    def _known_model(cls, value: Any) -> Any:
        if (isinstance(value, str) and value not in ("vgg", "googlenet")) or not isinstance(
            value, str | dict | BuilderSpec
        ):
            raise ValueError(
                'not a model family: write vgg, googlenet, or {builder: "package.module:function"}'
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _family_of_space(cls, raw: Any) -> Any:
        """`space` is read as the family's that `model` names (its parameters and defaults)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("space"), dict):
            return raw
        model = raw.get("model", "vgg")
        family = "builder" if isinstance(model, dict | BuilderSpec) else model
        if isinstance(family, str) and family in FAMILIES and "family" not in raw["space"]:
            raw = {**raw, "space": {**raw["space"], "family": family}}
        return raw

    @property
    def family(self) -> str:
        """`vgg`, `googlenet` or `builder`."""
        return self.space.family

    @property
    def builder(self) -> str | None:
        """A builder's `package.module:function`; None for tuner's own families."""
        return self.model.builder if isinstance(self.model, BuilderSpec) else None

    @model_validator(mode="after")
    def _check_baselines(self) -> StudySpec:
        names = [b.name for b in self.baselines]
        if len(set(names)) < len(names):
            raise ValueError(f"baselines need distinct names, got {names}")
        for b in self.baselines:
            outside = _outside(b, self.space)
            if outside:
                raise ValueError(
                    f"baseline {b.name!r} lies outside the search space: {'; '.join(outside)}"
                )
        return self

    @property
    def source(self) -> str:
        """The study file, for messages ("studies/NAME.yaml" when it was not read from one)."""
        return self._source or f"studies/{self.name}.yaml"

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, defaults filled in, as plain data (logged with every run)."""
        return self.model_dump(mode="json")

    def trial_settings(self) -> dict[str, Any]:
        """What every trial runs with besides its drawn point (logged with each trial's run)."""
        return self.model_dump(mode="json", include={"train", "data", "limits", "seed"})


# Study files are a few hundred lines: anything far bigger or deeper is a mistake or an attack,
# and is refused before it can exhaust memory or Python's recursion limit.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32  # nesting levels of mappings and lists
MAX_ALIASES = 200  # uses of YAML anchors (`*name`): a few are handy, thousands are a bomb

# YAML 1.1 reads these as something other than what was typed; they are errors, not guesses.
_OCTAL_LOOKING = re.compile(r"^[-+]?0[0-9_]+$")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses YAML 1.1 octal-looking ints such as `010` (read as 8)."""

    def construct_yaml_int(self, node: yaml.Node) -> int:
        value = self.construct_scalar(node)
        if isinstance(value, str) and _OCTAL_LOOKING.match(value):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{value!r} is read by YAML 1.1 as an octal number; write it without the "
                "leading zero, or quote it if it is text",
                node.start_mark,
            )
        return super().construct_yaml_int(node)

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooBig(f"nested more than {MAX_DEPTH} levels deep", self.peek_event())
            if self.check_event(yaml.AliasEvent):
                self._aliases = getattr(self, "_aliases", 0) + 1
                if self._aliases > MAX_ALIASES:
                    raise _TooBig(f"more than {MAX_ALIASES} aliases (*name)", self.peek_event())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: merged keys are defaults the mapping may override
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"{key!r} is given twice (first on line {first}); YAML would keep the "
                    "last silently: remove one",
                    key_node.start_mark,
                )
            if isinstance(key, Hashable):
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class _TooBig(yaml.YAMLError):
    def __init__(self, problem: str, event: yaml.Event) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, event.start_mark


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def resolve_path(name_or_path: str, studies_dir: Path = Path("studies")) -> Path:
    """`vgg-cifar` → `studies/vgg-cifar.yaml`; a path to a YAML file is taken as it is."""
    candidate = Path(name_or_path)
    try:
        if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
            path = candidate
        elif not re.fullmatch(NAME_PATTERN, name_or_path) or len(name_or_path) > NAME_CHARS:
            raise SpecError(
                f"{_short(name_or_path)} is neither a study name (at most {NAME_CHARS} letters, "
                "digits, _ . or -, starting with a letter or digit) nor a path to a study file"
            )
        else:
            path = studies_dir / f"{name_or_path}.yaml"
        found = path.is_file()
    except OSError as exc:  # a path too long, or in a folder that cannot be read
        raise SpecError(f"{_short(name_or_path)}: {exc.strerror}") from None
    if not found:
        known = sorted(p.stem for p in studies_dir.glob("*.yaml")) if studies_dir.is_dir() else []
        hint = f" Known studies in {studies_dir}/: {', '.join(known)}." if known else ""
        raise SpecError(f"{path}: no such study file.{hint}")
    return path


def load(name_or_path: str, studies_dir: Path = Path("studies")) -> StudySpec:
    """Read and validate a study file; each problem is a `SpecError` naming file and key."""
    path = resolve_path(name_or_path, studies_dir)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SpecError(
            f"{path}: {size:,} bytes is not a study file (at most {MAX_FILE_BYTES:,}); "
            "check the path"
        )
    try:
        with path.open() as stream:  # a stream, so YAML's marks name the file
            raw = yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise SpecError(_yaml_error(path, exc)) from None
    except RecursionError:  # a backstop: MAX_DEPTH stops the composer long before
        raise SpecError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the file must hold a mapping of keys, got {type(raw).__name__}")
    return parse(raw, source=str(path))


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line: file:line:column, the problem, and the fix where one is known."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    if "python/" in problem:
        problem += " (tuner reads plain YAML: !!python tags are refused, never run)"
    return f"{where}: not valid YAML: {problem}"


def parse(raw: dict[str, Any], source: str = "<spec>") -> StudySpec:
    if isinstance(raw.get("space"), dict) and "family" in raw["space"]:
        raise SpecError(  # tuner's own tag, set from `model:`: the file names the family there
            f"{source}: space.family: unknown key (the model family is `model:` "
            "(vgg, googlenet, or {builder: ...}), not a key of space)"
        )
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # a list whose items failed is also reported "too short": keep the cause only
        failed = {tuple(e["loc"][:-1]) for e in errors if e["type"] != "too_short"}
        errors = [e for e in errors if not (e["type"] == "too_short" and e["loc"] in failed)]
        # a `model:` that is no family leaves `space` without one: its error says it all
        errors = [e for e in errors if not (e["loc"] == ("space",) and e["type"] in (
            "union_tag_not_found", "union_tag_invalid"))]  # fmt: skip
        raise SpecError("\n".join(_describe(err, source) for err in errors)) from None
    if source != "<spec>":
        spec._source = source
    return spec


# union members' tags, which pydantic adds to a key's path: the samplers', pruners', families'
# and a builder parameter's kinds
_TAGS = {"tpe", "random", "hyperband", "median", "none", *FAMILIES, "choices", "float", "int",
         "BuilderSpec", "family"}  # fmt: skip


def _untagged(loc: list[str]) -> list[str]:
    """A key's path without the union tags pydantic puts in it: right after a union-holding
    key (`sampler.tpe.seed` → `sampler.seed`), and a builder parameter's kind
    (`space.blocks.float.high` → `space.blocks.high`)."""
    out: list[str] = []
    for i, part in enumerate(loc):
        after_union = i > 0 and loc[i - 1] in ("sampler", "pruner", "space", "model")
        if (after_union and part in _TAGS) or (
            len(out) == 2 and out[0] == "space" and part in ("choices", "float", "int")
        ):
            continue
        out.append(part)
    return out


def _describe(err: Any, source: str) -> str:
    """One line per problem: file, dotted key, what is wrong, and how to fix it where we know."""
    loc = [str(part) for part in err["loc"] if not str(part).startswith("function-after")]
    # pydantic adds the discriminator tag ("tpe") to the path of union members: drop it
    loc = _untagged(loc)
    key = ".".join(part for part in loc if part != "[key]") or "(top level)"
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        message = "unknown key (a typo, or a setting tuner does not have)"
        owner = [
            f for f, c in FAMILIES.items()
            if loc[:1] == ["space"] and len(loc) == 2
            and loc[1] in c.param_names()
        ]  # fmt: skip
        if owner:
            message = (f"not a parameter of this model family; it is {owner[0]}'s: "
                       f"write `model: {owner[0]}`")  # fmt: skip
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = err["msg"].removeprefix("Value error, ")
        if not isinstance(value, dict | list):
            message += f", got {_short(value)}"
    return f"{source}: {key}: {message}{_hint(kind, value)}"


def _short(value: Any, chars: int = 60) -> str:
    """A value for a message: its repr, cut in the middle when long."""
    text = repr(value)
    if len(text) <= chars:
        return text
    return f"{text[: chars // 2]}…{text[-chars // 4 :]} ({len(str(value)):,} characters)"


def _hint(kind: str, value: Any) -> str:
    if kind == "float_type" and isinstance(value, str) and _is_number(value):
        fixed = _yaml_float(value)
        return f" (YAML 1.1 reads {value} as text: write {fixed})" if fixed != value else ""
    if isinstance(value, bool) and kind in {"string_type", "literal_error"}:
        return " (YAML 1.1 reads yes/no/on/off as booleans: quote the word)"
    return ""


# a decimal number as it is typed (Python's float() takes `inf`, `nan` and other scripts'
# digits too, which no decimal point makes YAML read as a number)
_DECIMAL = re.compile(r"[-+]?(?=\.?[0-9])[0-9_]*\.?[0-9_]*(?:[eE][-+]?[0-9]+)?")


def _is_number(text: str) -> bool:
    """`text` is a finite decimal number that YAML 1.1 reads as text (`1e-3`)."""
    return _DECIMAL.fullmatch(text) is not None and math.isfinite(float(text))


def _yaml_float(text: str) -> str:
    """`text` as YAML 1.1 reads a float: a decimal point, and a sign on any exponent
    (`1e-3` → `1.0e-3`, `1.0e2` → `1.0e+2`)."""
    mantissa, _, exponent = text.lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if exponent and exponent[0] not in "+-":
        exponent = "+" + exponent
    return f"{mantissa}e{exponent}" if exponent else mantissa
