"""The options several commands share, and parsing what the options say into typed values."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import click

from tuner import devices
from tuner.spec import Depth


class Finite(click.FloatRange):
    """A FloatRange with both ends, that refuses NaN too: NaN compares false with both ends,
    and an open end lets `inf` through to a sleep or a thread's timeout, which refuse it."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"takes a number, got {value!r}", param, ctx)
        return number


WEEK = 7 * 86_400.0  # seconds: the longest --timeout or --watch period that is not a typo


def store_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where the study lives; every command takes the same four."""

    @click.option(
        "--mlruns",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder of the default stores [env TUNER_MLRUNS; default ./mlruns].",
    )
    @click.option(
        "--storage",
        default=None,
        help="Optuna storage URL [env TUNER_STORAGE; default sqlite:///mlruns/optuna.db].",
    )
    @click.option(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///mlruns/mlflow.db].",
    )
    @click.option(
        "--artifact-root",
        default=None,
        help="Where a new study's MLflow experiment keeps its artifacts, when the tracking "
        "URI is a database: a folder every node mounts, or s3://… [env TUNER_ARTIFACT_ROOT; "
        "default mlruns/artifacts; a tracking server decides its own].",
    )
    @functools.wraps(command)
    def wrapper(
        *args: Any,
        mlruns: str | None,
        storage: str | None,
        tracking_uri: str | None,
        artifact_root: str | None,
        **kwargs: Any,
    ) -> Any:
        from tuner.errors import TunerError
        from tuner.stores import check_files, check_url, resolve, store_error

        stores = resolve(mlruns, storage, tracking_uri, artifact_root)
        check_url(stores.optuna_url)
        check_url(stores.tracking_uri, tracking=True)
        check_files(stores)
        try:
            return command(*args, stores=stores, **kwargs)
        except TunerError:  # says what it means already
            raise
        except Exception as exc:  # locked, full, read-only, missing, unreachable: one line
            error = store_error(exc, stores)
            if error is None:
                raise
            raise error from exc

    return wrapper


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    @click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="The data set's folder (holding cifar-10-batches-py/, cifar-100-python/ or "
        "fashion-mnist/, as data.set says) [env TUNER_DATA_DIR; default "
        "~/.cache/tuner/<set>].",
    )
    @click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (the GPU when there is one), cpu, cuda or cuda:N.",
    )
    @functools.wraps(command)
    def wrapper(*args: Any, data_dir: str | None, device: str, **kwargs: Any) -> Any:
        folder = Path(data_dir).expanduser() if data_dir else None
        return command(*args, data_dir=folder, device=devices.pick(device), **kwargs)

    return wrapper


BENCH_OPTIONS = [
    click.option(
        "--model",
        type=click.Choice(["vgg", "googlenet"]),
        default="vgg",
        show_default=True,
        help="The family measured.",
    ),
    click.option(
        "--depths",
        default=None,
        help="Networks to measure: VGG depths (with batch norm) [default: "
        "vgg11,vgg13,vgg16,vgg19], or GoogLeNet stage counts with --model googlenet "
        "(auxiliary heads on) [default: 1,2,3].",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=512,
        show_default=True,
        help="tuner's batch (the reference uses 128, as the usual recipe does).",
    ),
    click.option(
        "--images",
        type=click.IntRange(min=1),
        default=50_000,
        show_default=True,
        help="Training images per epoch.",
    ),
    click.option(
        "--width",
        type=Finite(0, 4, min_open=True),
        default=1.0,
        show_default=True,
        help="Channel multiplier (a tiny model for a CPU check).",
    ),
    click.option(
        "--epochs",
        type=click.IntRange(min=2),
        default=3,
        show_default=True,
        help="Epochs per measurement; the first warms up (and compiles).",
    ),
    click.option(
        "--loader-workers",
        type=click.IntRange(min=0),
        default=None,
        help="DataLoader workers of the reference [default: min(16, CPUs)].",
    ),
    click.option(
        "--packed",
        default="1,2,3",
        show_default=True,
        help="Numbers of worker processes to pack onto the device ('' for none).",
    ),
    click.option(
        "--packed-depth",
        default=None,
        help="The packed workers' network [default: vgg16; googlenet: 3].",
    ),
    click.option(
        "--compile",
        "compile_",
        default="auto",
        show_default=True,
        help="Compiled paths measured beside eager: inductor, graphs (CUDA graphs without "
        "code generation), both as 'inductor,graphs', or off (auto: both on a GPU, none on "
        "the CPU).",
    ),
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="CIFAR-10 folder; synthetic images of the same shape when absent.",
    ),
    click.option("--device", default="auto", show_default=True),
]


def bench_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`tuner bench`'s options, in the order `--help` lists them."""
    return _with(BENCH_OPTIONS, command)


WORKER_OPTIONS = [
    click.option(
        "--timeout",
        type=Finite(min=0, max=WEEK, min_open=True),
        default=None,
        help="Start no trial after this many seconds (limits.trial_timeout cuts one short).",
    ),
    click.option(
        "--jobs",
        type=click.IntRange(1, 1024),
        default=None,
        help="Worker processes on the --device (several trials at once) [default 1].",
    ),
    click.option(
        "--gpus",
        default=None,
        help="GPUs to use, as CUDA indices (0,1) or 'all'; one or more workers on each.",
    ),
    click.option(
        "--jobs-per-gpu",
        type=click.IntRange(1, 64),
        default=1,
        show_default=True,
        help="Worker processes per GPU given in --gpus (small models leave a GPU idle alone).",
    ),
]


def worker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where and how long the workers of `study run` and `refit` run."""
    return _with(WORKER_OPTIONS, command)


def keep_option(what: str) -> Callable[..., Any]:
    """`--keep DIR` of a benchmark: `what` it leaves there instead of in a temporary folder."""
    return click.option(
        "--keep",
        type=click.Path(file_okay=False),
        default=None,
        help=f"Keep {what} in this folder (default: a temporary one).",
    )


def _with(options: list[Any], command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        command = option(command)
    return command


HINT = "'--depths' or '--packed-depth'"
DEFAULT_NETWORKS = {"vgg": ("vgg11,vgg13,vgg16,vgg19", "vgg16"), "googlenet": ("1,2,3", "3")}


def parse_depths(
    depths: str | None, packed_depth: str | None, model: str = "vgg"
) -> tuple[tuple[str, ...], str]:
    """The networks `tuner bench` measures (`vgg11,vgg16`; GoogLeNet stage counts `1,3`, named
    `googlenet-1s`, `googlenet-3s`) and the packed workers' network, each a known one."""
    given, packed = DEFAULT_NETWORKS[model]
    depths = given if depths is None else depths
    packed_depth = packed if packed_depth is None else packed_depth
    names = tuple(d.strip() for d in depths.split(",") if d.strip())
    if model == "googlenet":
        known: tuple[str, ...] = ("1", "2", "3")
        short = [n.removeprefix("googlenet-").removesuffix("s") for n in (*names, packed_depth)]
        unknown = [n for n, s in zip((*names, packed_depth), short, strict=True) if s not in known]
        if unknown or not names:
            raise click.BadParameter(
                f"GoogLeNet's stage counts: 1, 2, 3; got {unknown or depths!r}"
            )
        named = tuple(f"googlenet-{s}s" for s in short)
        return named[:-1], named[-1]
    known = get_args(Depth)
    unknown = [d for d in (*names, packed_depth) if d not in known]
    if unknown or not names:
        raise click.BadParameter(
            f"known depths: {', '.join(known)}; got {unknown or depths!r}", param_hint=HINT
        )
    return names, packed_depth


def parse_counts(packed: str, *, zero: bool = False) -> tuple[int, ...]:
    """`1,2,3` → (1, 2, 3); '' → () (no packed measurement). `zero`: 0 is a count too."""
    try:
        counts = tuple(int(n) for n in packed.split(",") if n.strip())
    except ValueError:
        raise click.BadParameter(f"takes counts such as 1,2,3, got {packed!r}") from None
    least = 0 if zero else 1
    if any(n < least for n in counts):
        raise click.BadParameter(f"takes counts of {least} or more, got {packed!r}")
    return counts
