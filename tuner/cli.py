"""`tuner`: parse, call one function, print what it did, return an exit code.

Exit codes: 0 success, 2 bad usage or bad config, 1 failure, 130 interrupted.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tuner import spec as spec_module
from tuner.errors import TunerError

HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 99}


def say(message: str) -> None:
    click.echo(message)


def store_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where the study lives; every command takes the same three."""

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
    @functools.wraps(command)
    def wrapper(
        *args: Any,
        mlruns: str | None,
        storage: str | None,
        tracking_uri: str | None,
        **kwargs: Any,
    ) -> Any:
        from tuner.stores import resolve

        return command(*args, stores=resolve(mlruns, storage, tracking_uri), **kwargs)

    return wrapper  # fmt: skip


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    @click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="CIFAR-10 folder (holding cifar-10-batches-py/) [env TUNER_DATA_DIR; "
        "default ~/.cache/tuner/cifar10].",
    )
    @click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (the GPU when there is one), cpu, cuda or cuda:N.",
    )
    @functools.wraps(command)
    def wrapper(*args: Any, data_dir: str | None, device: str, **kwargs: Any) -> Any:
        from tuner.data import resolve_data_dir
        from tuner.runner import pick_device

        return command(
            *args, data_dir=resolve_data_dir(data_dir), device=pick_device(device), **kwargs
        )

    return wrapper  # fmt: skip


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
    from tuner.runner import create_study

    spec = spec_module.load(name)
    created, _ = create_study(spec, stores)
    verb = "created" if created.created else "already exists:"
    say(f"study {spec.name!r} {verb}")
    say(stores.describe())
    say(f"  MLflow experiment {created.experiment_id}, parent run {created.parent_run_id}")
    say(f"next: tuner study run {name}")


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
def run(name: str, trials: int | None, timeout: float | None, jobs: int | None, gpus: str | None,
        jobs_per_gpu: int, stores: Any, data_dir: Path, device: Any) -> None:  # fmt: skip
    """Run trials of a study (continuing it if it has some), pruning hopeless ones early."""
    from tuner.runner import gpu_devices, run_study

    spec = spec_module.load(name)
    if gpus is not None and jobs is not None:
        raise click.UsageError("--jobs counts workers on --device; with --gpus use --jobs-per-gpu")
    devices = gpu_devices(gpus) if gpus is not None else [str(device)]
    per_device = jobs_per_gpu if gpus is not None else (jobs or 1)
    summary = run_study(spec, stores, n_trials=trials, timeout=timeout, data_dir=data_dir,
                        devices=devices, jobs_per_device=per_device, say=say)  # fmt: skip
    ran = ", ".join(f"{n} {state}" for state, n in sorted(summary.ran.items())) or "no trials"
    say(f"\nran {ran} in {summary.seconds:.1f} s")
    for number, reason in summary.failures.items():
        say(f"  trial {number} {'diverged' if reason == 'diverged' else 'failed: ' + reason}")
    for lost, retry in sorted(summary.retried.items()):
        say(f"  trial {lost} was retried as trial {retry}")
    if summary.workers:
        say("workers: " + "; ".join(summary.workers))
    if summary.best is not None:
        say(f"best so far: trial {summary.best.number}, val_acc {summary.best.value:.4f}")
    say(f"see: tuner study status {name}  |  tuner ui  |  tuner ensemble {name} --top 5")
    if summary.ran and not {"complete", "pruned"} & set(summary.ran):
        raise TunerError("no trial of this run finished: each failed or diverged (reasons above)")


@study.command("status")
@click.argument("name")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
@store_options
def status(name: str, top: int, stores: Any) -> None:
    """Trials by state, the best trial, and the current top trials."""
    from tuner.runner import study_status
    from tuner.space import decode

    spec = spec_module.load(name)
    report = study_status(spec, stores, top)
    say(f"study {spec.name!r}  ({stores.optuna_url})")
    say("  ".join(f"{state}: {n}" for state, n in report.counts.items()))
    if report.best is None:
        say("no completed trials yet")
        return
    best = decode(report.best.params)
    say(f"\nbest: trial {report.best.number}, val_acc {report.best.value:.4f}")
    for key, value in best.as_dict().items():
        say(f"  {key:<13} {value}")
    say(f"\ntop {len(report.top)}:")
    say(f"{'trial':>6}  {'val_acc':>8}  {'depth':<6} {'bn':<3} {'optimizer':<9} {'lr':>9} "
        f"{'wd':>8} {'dropout':>7}  augment")  # fmt: skip
    for trial in report.top:
        p = decode(trial.params)
        bn = "yes" if p.batch_norm else "no"
        say(f"{trial.number:>6}  {trial.value:>8.4f}  {p.depth:<6} {bn:<3} {p.optimizer:<9} "
            f"{p.lr:>9.2e} {p.weight_decay:>8.1e} {p.dropout:>7.2f}  {p.augment}")  # fmt: skip


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
    from tuner.ensemble import evaluate_top, member_table

    spec = spec_module.load(name)
    report = evaluate_top(spec, stores, k=k, data_dir=data_dir, device=device, say=say)
    say(f"\nensemble of the top {len(report.members)} on {report.test_images} test images:")
    say(member_table(report.members))
    say(f"\n{'ensemble test accuracy':<26}{report.accuracy:.4f}")
    say(f"{'ensemble test log-loss':<26}{report.log_loss:.4f}")
    say(f"{'best member test accuracy':<26}{report.best_member_accuracy:.4f}")
    say(f"{'gain over best member':<26}{report.gain * 100:+.2f} points")
    say(f"logged as MLflow run {report.run_id}")


@cli.command("bench")
@click.option(
    "--depths",
    default="vgg11,vgg13,vgg16,vgg19",
    show_default=True,
    help="VGG depths to measure (with batch norm).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="tuner's batch (the reference uses 128, as the usual recipe does).",
)
@click.option(
    "--images",
    type=click.IntRange(min=1),
    default=50_000,
    show_default=True,
    help="Training images per epoch.",
)
@click.option(
    "--width",
    type=click.FloatRange(0, 4, min_open=True),
    default=1.0,
    show_default=True,
    help="Channel multiplier (a tiny model for a CPU check).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=2),
    default=3,
    show_default=True,
    help="Epochs per measurement; the first warms up (and compiles).",
)
@click.option(
    "--loader-workers",
    type=click.IntRange(min=0),
    default=None,
    help="DataLoader workers of the reference [default: min(16, CPUs)].",
)
@click.option(
    "--packed",
    default="1,2,3",
    show_default=True,
    help="Numbers of worker processes to pack onto the device ('' for none).",
)
@click.option("--packed-depth", default="vgg16", show_default=True)
@click.option(
    "--compile",
    "compile_",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Measure the compiled path too (auto: on the GPU).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="CIFAR-10 folder; synthetic images of the same shape when absent.",
)
@click.option("--device", default="auto", show_default=True)
def bench(depths: str, batch_size: int, images: int, width: float, epochs: int,
          loader_workers: int | None, packed: str, packed_depth: str, compile_: str,
          data_dir: str | None, device: str) -> None:  # fmt: skip
    """Epoch time of tuner's training path against DataLoader + PIL, and packed workers."""
    from tuner.bench import BenchConfig, run_bench, table
    from tuner.data import resolve_data_dir
    from tuner.models import LAYERS
    from tuner.runner import pick_device

    names = tuple(d.strip() for d in depths.split(",") if d.strip())
    unknown = [d for d in (*names, packed_depth) if d not in LAYERS]
    if unknown or not names:
        raise click.BadParameter(f"known depths: {', '.join(LAYERS)}; got {unknown or depths}")
    try:
        counts = tuple(int(n) for n in packed.split(",") if n.strip())
    except ValueError:
        raise click.BadParameter(f"--packed takes counts such as 1,2,3, got {packed!r}") from None
    where = pick_device(device)
    if loader_workers is None:
        loader_workers = min(16, os.cpu_count() or 1)
    cfg = BenchConfig(
        depths=names, batch_size=batch_size, images=images, width=width, epochs=epochs,
        loader_workers=loader_workers,
        packed=counts, packed_depth=packed_depth, compile=compile_, device=str(where),
    )  # fmt: skip
    rows, packed_rows, source = run_bench(cfg, resolve_data_dir(data_dir), say)
    name = torch_device_name(where)
    say(f"\n{name}; {cfg.images:,} images per epoch from {source}; width {width}")
    say(table(rows, packed_rows))
    say("epoch s: median of the timed epochs (tuner's includes validating 256 images); "
        "× ref: the reference's epoch time over this path's; warm-up s: first epoch minus a "
        "timed one (compiling, caches)")  # fmt: skip


def torch_device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


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
    if stores.tracking_uri.split(":", 1)[0] in {"http", "https", "databricks"}:
        say(f"the tracking store is a server already: open {stores.tracking_uri}")
        return
    if host not in {"127.0.0.1", "localhost", "::1"}:
        say(f"warning: binding {host}: the MLflow UI has no authentication; anyone who can reach "
            "this port can read and change your runs")  # fmt: skip
    from tuner.stores import prepare_tracking

    prepare_tracking(stores)
    say(f"MLflow UI for {stores.tracking_uri}\n  open http://{host}:{port}  (Ctrl-C to stop)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", stores.tracking_uri,
               "--host", host, "--port", str(port), "--workers", "1"]  # fmt: skip
    if stores.artifact_root:
        command += ["--default-artifact-root", stores.artifact_root]
    sys.exit(subprocess.call(command, env=os.environ.copy()))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user-facing errors become one line and an exit code."""
    # progress must show as it happens also when piped to a file or `tee`
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
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
    except TunerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(0)
