"""`tuner`: parse, call one function, print its report, return an exit code.

Exit codes: 0 success, 2 bad usage or bad config, 1 failure, 130 interrupted, 143 terminated.
Progress goes through `logging` (see `console`); results through `report`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from tuner import console, devices, report
from tuner import spec as spec_module
from tuner.cli.options import (
    bench_options,
    data_options,
    parse_counts,
    parse_depths,
    store_options,
)
from tuner.errors import TunerError

HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 99}


@click.group(context_settings=HELP_SETTINGS)
@click.version_option(package_name="tuner")
def cli() -> None:
    """Hyperparameter studies for deep learning: Optuna search, MLflow tracking, ensembles."""


@cli.group()
def study() -> None:
    """Create, run and inspect a study defined in studies/NAME.yaml."""


@study.command("create")
@click.argument("name")
@store_options
def create(name: str, stores: Any) -> None:
    """Validate studies/NAME.yaml and create its Optuna study and MLflow parent run."""
    from tuner.study.setup import create as create_study

    spec = spec_module.load(name)
    click.echo(report.created(spec.name, create_study(spec, stores), stores))


@study.command("run")
@click.argument("name")
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=None,
    help="Run until this many more trials have finished [default: the file's trials].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Start no trial after this many seconds (limits.trial_timeout cuts one short).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes on the --device (several trials at once) [default 1].",
)
@click.option(
    "--gpus",
    default=None,
    help="GPUs to use, as CUDA indices (0,1) or 'all'; one or more workers on each.",
)
@click.option(
    "--jobs-per-gpu",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes per GPU given in --gpus (small models leave a GPU idle alone).",
)
@store_options
@data_options
def run(
    name: str,
    trials: int | None,
    timeout: float | None,
    jobs: int | None,
    gpus: str | None,
    jobs_per_gpu: int,
    stores: Any,
    data_dir: Path,
    device: Any,
) -> None:
    """Run trials of a study (continuing it if it has some), pruning hopeless ones early."""
    from tuner.study.session import RunRequest, run_study

    spec = spec_module.load(name)
    if gpus is not None and jobs is not None:
        raise click.UsageError("--jobs counts workers on --device; with --gpus use --jobs-per-gpu")
    request = RunRequest(
        devices=tuple(devices.gpus(gpus)) if gpus is not None else (device,),
        jobs_per_device=jobs_per_gpu if gpus is not None else (jobs or 1),
        trials=trials,
        timeout=timeout,
        data_dir=data_dir,
    )
    summary = run_study(spec, stores, request)
    click.echo(report.run_summary(name, summary))
    if summary.nothing_finished:
        raise TunerError("no trial of this run finished: each failed or diverged (reasons above)")


@study.command("status")
@click.argument("name")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
@store_options
def status(name: str, top: int, stores: Any) -> None:
    """Trials by state, the best trial, and the current top trials."""
    from tuner.study.summary import study_status

    spec = spec_module.load(name)
    click.echo(report.status(spec.name, study_status(spec, stores, top), stores.optuna_url))


@cli.command("ensemble")
@click.argument("name")
@click.option(
    "--top",
    "k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="How many of the best completed trials to average.",
)
@store_options
@data_options
def ensemble(name: str, k: int, stores: Any, data_dir: Path, device: Any) -> None:
    """Score the top-K trials together on the CIFAR-10 test split and log it to MLflow."""
    from tuner.ensemble import evaluate_top

    spec = spec_module.load(name)
    click.echo(report.ensemble(evaluate_top(spec, stores, k=k, data_dir=data_dir, device=device)))


@cli.command("bench")
@bench_options
def bench(
    depths: str,
    batch_size: int,
    images: int,
    width: float,
    epochs: int,
    loader_workers: int | None,
    packed: str,
    packed_depth: str,
    compile_: str,
    data_dir: str | None,
    device: str,
) -> None:
    """Epoch time of tuner's training path against DataLoader + PIL, and packed workers."""
    from tuner.bench import BenchConfig, run_bench

    names, packed_name = parse_depths(depths, packed_depth)
    cfg = BenchConfig(
        depths=names,
        batch_size=batch_size,
        images=images,
        width=width,
        epochs=epochs,
        loader_workers=min(16, os.cpu_count() or 1) if loader_workers is None else loader_workers,
        packed=parse_counts(packed),
        packed_depth=packed_name,
        compile=compile_,
        device=devices.pick(device),
    )
    rows, packed_rows, source = run_bench(cfg, Path(data_dir).expanduser() if data_dir else None)
    click.echo(report.bench(rows, packed_rows, cfg.device, source, cfg.images, width))


@cli.command("ui")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind. Anything but loopback exposes the UI, which has no "
    "authentication, to the network.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@store_options
def ui(host: str, port: int, stores: Any) -> None:
    """Start the MLflow UI on the study's tracking store."""
    from tuner.ui import serve

    sys.exit(serve(stores, host, port))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user-facing errors become one line and an exit code."""
    # progress must show as it happens also when piped to a file or `tee`
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    console.show()
    try:
        cli.main(args=argv, prog_name="tuner", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:  # click makes Ctrl-C an Abort
        from tuner.interrupts import Terminated

        why = exc if isinstance(exc, KeyboardInterrupt) else exc.__cause__
        terminated = isinstance(why, Terminated)
        click.echo(
            f"\n{'terminated (SIGTERM)' if terminated else 'interrupted'}: a trial that was "
            f"running is recorded as failed ({'terminated' if terminated else 'interrupted'}) "
            "and its MLflow run as KILLED; run the same command again to continue the study",
            err=True,
        )
        sys.exit(143 if terminated else 130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except TunerError as exc:  # ConfigError, SpecError, DataError too
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(0)
