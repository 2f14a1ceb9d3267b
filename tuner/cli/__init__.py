"""`tuner`: parse, call one function, print its report, return an exit code.

Exit codes: 0 success, 2 bad usage or bad config, 1 failure, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM), 129 hung up (SIGHUP).
Progress goes through `logging` (see `console`); results through `report`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from tuner import console, devices, report
from tuner.cli.options import (
    WEEK,
    Finite,
    bench_options,
    data_options,
    keep_option,
    parse_counts,
    parse_depths,
    store_options,
    worker_options,
)
from tuner.errors import TunerError
from tuner.spec import MAX_COUNT, MAX_EPOCHS, MAX_TOP
from tuner.study.named import load as find

REPORTS = Path("reports")  # `tuner report`'s folder; `ensemble` and `refit` update it there
HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 99}


@click.group(context_settings=HELP_SETTINGS)
@click.version_option(package_name="tuner")
def cli() -> None:
    """Hyperparameter studies for deep learning: Optuna search, MLflow tracking, ensembles."""


@cli.group()
def study() -> None:
    """Create, run and inspect a study defined in studies/NAME.yaml."""


ALLOW_CHANGED = click.option(
    "--allow-changed-settings",
    is_flag=True,
    help="Go on although the file's train, data or seed settings changed since the study "
    "was created (each trial records the settings it used). The search space cannot change.",
)


@study.command("create")
@click.argument("name")
@ALLOW_CHANGED
@store_options
def create(name: str, allow_changed_settings: bool, stores: Any) -> None:
    """Validate studies/NAME.yaml and create its Optuna study and MLflow parent run."""
    from tuner.study.setup import create as create_study

    spec = find(name, stores)
    made = create_study(spec, stores, allow_changed_settings=allow_changed_settings)
    click.echo(report.created(spec.name, made, stores, typed=name))


def run_request(
    trials: int | None,
    timeout: float | None,
    jobs: int | None,
    gpus: str | None,
    jobs_per_gpu: int,
    allow_changed_settings: bool,
    data_dir: Path,
    device: Any,
) -> Any:
    """Where and how long the workers run, as `--gpus`/`--jobs`/`--timeout` said."""
    from tuner.study.session import RunRequest

    if gpus is not None and jobs is not None:
        raise click.UsageError("--jobs counts workers on --device; with --gpus use --jobs-per-gpu")
    return RunRequest(
        devices=tuple(devices.gpus(gpus)) if gpus is not None else (device,),
        jobs_per_device=jobs_per_gpu if gpus is not None else (jobs or 1),
        trials=trials,
        timeout=timeout,
        data_dir=data_dir,
        allow_changed_settings=allow_changed_settings,
    )


@study.command("run")
@click.argument("name")
@click.option(
    "--trials",
    type=click.IntRange(1, MAX_COUNT),
    default=None,
    help="Run this many more trials, whatever the study has [default: until the study has "
    "the file's `trials` finished trials].",
)
@click.option(
    "--max-hours",
    type=Finite(min=0, max=WEEK / 3600, min_open=True),
    default=4.0,
    show_default=True,
    help="First measure a few training steps here and estimate what the trials left will "
    "cost; stop, saying what to run instead, when that is more than this.",
)
@worker_options
@ALLOW_CHANGED
@store_options
@data_options
def run(
    name: str,
    trials: int | None,
    max_hours: float,
    timeout: float | None,
    jobs: int | None,
    gpus: str | None,
    jobs_per_gpu: int,
    allow_changed_settings: bool,
    stores: Any,
    data_dir: Path,
    device: Any,
) -> None:
    """Run a study's trials, pruning hopeless ones early, until the study has the file's
    `trials` finished trials (a trial that is queued again, interrupted or lost, counts once
    it has run again). Stopped, it continues where it stopped when run again."""
    import dataclasses

    from tuner.study.session import run_study

    spec = find(name, stores)
    request = run_request(trials, timeout, jobs, gpus, jobs_per_gpu, allow_changed_settings,
                          data_dir, device)  # fmt: skip
    request = dataclasses.replace(request, max_hours=max_hours)
    summary = run_study(spec, stores, request)
    click.echo(report.run_summary(name, summary))
    if summary.nothing_finished:
        raise TunerError("no trial of this run finished: each failed or diverged (reasons above)")


@cli.command("refit")
@click.argument("name")
@click.option(
    "--top",
    "k",
    type=click.IntRange(1, MAX_TOP),
    default=None,
    help="How many of the best completed trials to train again [default: the file's refit.top].",
)
@click.option(
    "--epochs",
    type=click.IntRange(1, MAX_EPOCHS),
    default=None,
    help="Epochs of each refit [default: the file's refit.epochs, else train.epochs].",
)
@worker_options
@ALLOW_CHANGED
@store_options
@data_options
def refit(
    name: str,
    k: int | None,
    epochs: int | None,
    timeout: float | None,
    jobs: int | None,
    gpus: str | None,
    jobs_per_gpu: int,
    allow_changed_settings: bool,
    stores: Any,
    data_dir: Path,
    device: Any,
) -> None:
    """Train the best configurations again on train + validation, as nested runs tagged
    refit (a refit done already is not repeated); `tuner ensemble NAME --from refit` uses
    them."""
    from tuner.study.session import run_refit

    spec = find(name, stores)
    request = run_request(None, timeout, jobs, gpus, jobs_per_gpu, allow_changed_settings,
                          data_dir, device)  # fmt: skip
    k = k if k is not None else spec.refit.top
    epochs = epochs or spec.refit.epochs or spec.train.epochs
    summary = run_refit(spec, stores, request, k, epochs)
    click.echo(report.refit_summary(name, summary, k))
    if summary.run.nothing_finished:
        raise TunerError("no refit of this run finished: each failed or diverged (reasons above)")
    if summary.run.ran:
        _bring_report_up_to_date(spec, stores)


@study.command("status")
@click.argument("name")
@click.option("--top", type=click.IntRange(1, MAX_COUNT), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON, for scripts.")
@click.option(
    "--watch",
    type=Finite(min=0.5, max=WEEK),
    is_flag=False,
    flag_value=5.0,
    default=None,
    metavar="[SECONDS]",
    help="Print it again every SECONDS (5 if not given) until Ctrl-C.",
)
@store_options
def status(name: str, top: int, as_json: bool, watch: float | None, stores: Any) -> None:
    """Trials by state, the best trial, and the current top trials."""
    from tuner.study.status import study_status

    spec = find(name, stores)

    def show() -> str:
        result = study_status(spec, stores, top)
        render = report.status_json if as_json else report.status
        return render(spec.name, result, stores.optuna_url)

    if watch is None:
        click.echo(show())
        return
    watch_status(show, watch)


def watch_status(show: Any, seconds: float, rounds: int | None = None) -> None:
    """`show()` every `seconds`, on a cleared terminal (where stdout is one), `rounds` times,
    else until a signal stops it: Ctrl-C, SIGTERM and SIGHUP end it as they end every command
    (one line, exit 130, 143, 129)."""
    import time

    clear = sys.stdout.isatty()
    done = 0
    while rounds is None or done < rounds:
        text = show()
        stamp = time.strftime("%H:%M:%S")
        if clear:
            click.echo("\x1b[2J\x1b[H", nl=False)
        click.echo(f"{text}\n\n{stamp}: again every {seconds:g} s; Ctrl-C stops")
        done += 1
        if rounds is None or done < rounds:
            time.sleep(seconds)  # the refresh interval the user asked for


@cli.command("ensemble")
@click.argument("name")
@click.option(
    "--top",
    "k",
    type=click.IntRange(1, MAX_TOP),
    default=5,
    show_default=True,
    help="At most this many distinct members.",
)
@click.option(
    "--method",
    type=click.Choice(["greedy", "average"]),
    default="greedy",
    show_default=True,
    help="greedy: forward selection with replacement on the validation log-loss over every "
    "completed trial (members and weights); average: the top K by validation accuracy.",
)
@click.option(
    "--from",
    "source",
    type=click.Choice(["search", "refit"]),
    default="search",
    show_default=True,
    help="The search trials' weights, or their refits' (`tuner refit`).",
)
@click.option(
    "--tta",
    type=click.Choice(["none", "flip"]),
    default="none",
    show_default=True,
    help="flip: also score each image mirrored, and average; shown beside the plain scores.",
)
@click.option(
    "--temperature",
    is_flag=True,
    help="Fit a temperature per member on the validation images before choosing.",
)
@store_options
@data_options
def ensemble(
    name: str,
    k: int,
    method: str,
    source: str,
    tta: str,
    temperature: bool,
    stores: Any,
    data_dir: Path,
    device: Any,
) -> None:
    """Choose members and weights on the validation images, score them together on the
    data set's test split against the best single trial, and log it to MLflow."""
    from tuner.ensemble import EnsembleRequest, evaluate

    spec = find(name, stores)
    request = EnsembleRequest(k, method, source, tta, temperature)  # type: ignore[arg-type]
    result = evaluate(spec, stores, request, data_dir=data_dir, device=device)
    click.echo(report.ensemble(result))
    _bring_report_up_to_date(spec, stores)


def _bring_report_up_to_date(spec: Any, stores: Any) -> None:
    """After an ensemble or refits, the study's report in REPORTS is made again: a report is
    never older than what it reports on. It is a view: failing to write it is one line."""
    from tuner.study.page import make_report

    try:
        written = make_report(spec, stores, REPORTS)
    except Exception as exc:
        click.echo(f"the report could not be brought up to date ({type(exc).__name__}: "
                   f"{str(exc)[:200]}); `tuner report {spec.name}` tries again")  # fmt: skip
        return
    click.echo(f"report brought up to date: {written.html}")


@cli.command("quickstart")
@store_options
@data_options
def quickstart_(stores: Any, data_dir: Path, device: Any) -> None:
    """The main job, sized for this machine: vgg-cifar on a GPU; on a CPU, where it would take
    days (measured first), vgg-cifar-smoke. Then create, run, refit the best, score their
    greedy ensemble with flip TTA, and write the report: `study create`, `study run`,
    `refit`, `ensemble` and `report` in turn."""
    from tuner.quickstart import quickstart

    quickstart(stores, device, data_dir)


@cli.command("report")
@click.argument("name")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPORTS,
    show_default=True,
    help="Folder for NAME.html (self-contained), NAME.md and its pictures.",
)
@click.option("--top", type=click.IntRange(1, MAX_COUNT), default=10, show_default=True)
@store_options
def report_(name: str, out: Path, top: int, stores: Any) -> None:
    """The study on one page (best trials, pictures, what mattered, failure modes, ensembles,
    provenance), written to --out and logged to the study's parent run."""
    from tuner.study.page import make_report

    spec = find(name, stores)
    click.echo(report.report_written(make_report(spec, stores, out, top)))


@cli.group("bench", invoke_without_command=True)
@bench_options
@click.pass_context
def bench(
    ctx: click.Context,
    model: str,
    depths: str | None,
    batch_size: int,
    images: int,
    width: float,
    epochs: int,
    loader_workers: int | None,
    packed: str,
    packed_depth: str | None,
    compile_: str,
    data_dir: str | None,
    device: str,
) -> None:
    """Epoch time of tuner's training path against DataLoader + PIL, and packed workers.
    `tuner bench overhead`: what tuner's bookkeeping costs, as the study grows."""
    if ctx.invoked_subcommand is not None:
        return
    from tuner.bench.epochs import BenchConfig, measured_modes, run_bench

    names, packed_name = parse_depths(depths, packed_depth, model)
    picked = devices.pick(device)
    try:
        modes = measured_modes(compile_, picked)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--compile") from None
    cfg = BenchConfig(
        depths=names,
        batch_size=batch_size,
        images=images,
        width=width,
        epochs=epochs,
        loader_workers=min(16, os.cpu_count() or 1) if loader_workers is None else loader_workers,
        packed=parse_counts(packed),
        packed_depth=packed_name,
        modes=modes,
        device=picked,
    )
    rows, packed_rows, source = run_bench(cfg, Path(data_dir).expanduser() if data_dir else None)
    click.echo(report.bench(rows, packed_rows, cfg.device, source, cfg.images, width))


@bench.command("overhead")
@click.option(
    "--sizes",
    default="0,100,1000",
    show_default=True,
    help="Completed trials in the study before timing, one row each.",
)
@click.option(
    "--trials",
    type=click.IntRange(min=2),
    default=5,
    show_default=True,
    help="Trials timed per size (their median is shown).",
)
@click.option("--asks", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--epoch-seconds",
    type=Finite(min=0, max=WEEK),
    default=0.25,
    show_default=True,
    help="The replayed epochs' pace: a GPU epoch on tuner's path.",
)
@keep_option("the filled stores")
def overhead(sizes: str, trials: int, asks: int, epoch_seconds: float, keep: str | None) -> None:
    """tuner's bookkeeping per epoch, per trial, for `ask`, `study status` and the start of
    `study run`, on studies of 0, 100 and 1,000 trials (SQLite stores, as the defaults)."""
    from tuner.bench.overhead import OverheadConfig, run_overhead

    cfg = OverheadConfig(
        sizes=parse_counts(sizes, zero=True),
        trials=trials,
        asks=asks,
        epoch_seconds=epoch_seconds,
        folder=Path(keep).expanduser() if keep else None,
    )
    rows, reference = run_overhead(cfg)
    click.echo(report.overhead(rows, reference, cfg))


@bench.command("ensembles")
@click.option(
    "--study",
    "study_file",
    default="vgg-cifar",
    show_default=True,
    help="The study file whose space, baselines, sampler and pruner are searched.",
)
@click.option("--seeds", default="0,1,2", show_default=True, help="One whole study per seed.")
@click.option("--trials", type=click.IntRange(min=2), default=24, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
@click.option(
    "--width",
    type=Finite(0, 4, min_open=True),
    default=0.25,
    show_default=True,
    help="Channel multiplier of every network.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--val-size", type=click.IntRange(min=10), default=1000, show_default=True)
@click.option(
    "--train-size",
    type=click.IntRange(min=10),
    default=None,
    help="[default: every training image the validation split leaves]",
)
@click.option(
    "--test-size",
    type=click.IntRange(min=10),
    default=None,
    help="[default: the whole test split]",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker processes of each study.",
)
@keep_option("the studies' stores and logs")
@data_options
def ensembles(
    study_file: str,
    seeds: str,
    trials: int,
    epochs: int,
    width: float,
    batch_size: int,
    top: int,
    val_size: int,
    train_size: int | None,
    test_size: int | None,
    jobs: int,
    keep: str | None,
    data_dir: Path,
    device: Any,
) -> None:
    """Greedy ensemble selection against the top-K average against the best single trial,
    with and without flip TTA, over whole studies of several seeds (mean and spread)."""
    from tuner.bench.ensembles import EnsembleBenchConfig, run_ensemble_bench

    cfg = EnsembleBenchConfig(
        study=study_file,
        seeds=parse_counts(seeds, zero=True),
        trials=trials,
        epochs=epochs,
        width=width,
        batch_size=batch_size,
        top=top,
        val_size=val_size,
        train_size=train_size,
        test_size=test_size,
        device=device,
        jobs=jobs,
        folder=Path(keep).expanduser() if keep else None,
    )
    rows = run_ensemble_bench(cfg, data_dir)
    click.echo(report.ensemble_bench(rows, cfg))


@cli.command("ui")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind. Anything but loopback exposes the UI, which has no "
    "authentication, to the network.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--open", "open_browser", is_flag=True, help="Open it in a browser.")
@click.option("--verbose", is_flag=True, help="Show the server's log (every request).")
@click.argument("name", required=False)
@store_options
def ui(
    host: str, port: int, open_browser: bool, verbose: bool, name: str | None, stores: Any
) -> None:
    """Start the MLflow UI on the study's tracking store; with NAME, at that study's runs."""
    from tuner.ui import serve

    sys.exit(serve(stores, host, port, name, open_browser=open_browser, verbose=verbose))


# What a Ctrl-C, SIGTERM or SIGHUP left behind, by command; each "again" is true (the set-up
# of a study is made whole by the next command that needs it).
STOPPED = {
    "study run": "any trial that was running is recorded as killed ({reason}) and its point "
    "queued again, its MLflow run as KILLED; run the same command again to continue the study",
    "refit": "a refit that was running is recorded as failed ({reason}) and its MLflow run as "
    "KILLED; run the same command again to finish the refits",
    "quickstart": "what each step finished is kept (a trial that was running is queued "
    "again); run the same command again to go on from there",
    "ensemble": "no ensemble was recorded (a run it had started is closed as KILLED); run the "
    "same command again",
    "ui": "stopped the MLflow UI and every process it started",
    "study status": "nothing was changed; the study goes on as it was",
}
STOPPED_DEFAULT = "nothing was left half-made; run the same command again"


def _stopped(argv: list[str], why: BaseException | None) -> tuple[str, int]:
    """The line printed when a command is stopped by a signal, and its exit code."""
    from tuner.interrupts import HungUp, Terminated, exit_code, reason

    words = " ".join(a for a in argv[:2] if not a.startswith("-"))
    after = next((v for k, v in STOPPED.items() if words.startswith(k)), STOPPED_DEFAULT)
    why = why if isinstance(why, KeyboardInterrupt) else KeyboardInterrupt()
    if isinstance(why, HungUp):
        what = "terminated (SIGHUP)"
    elif isinstance(why, Terminated):
        what = "terminated (SIGTERM)"
    else:
        what = "interrupted"
    return f"\n{what}: {after.format(reason=reason(why))}", exit_code(why)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user-facing errors become one line and an exit code."""
    from tuner import interrupts

    argv = sys.argv[1:] if argv is None else argv
    # progress must show as it happens also when piped to a file or `tee`
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    console.show()
    interrupts.install()  # SIGTERM and SIGHUP end a command as Ctrl-C does: cleaned up
    try:
        cli.main(args=argv, prog_name="tuner", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:  # click makes Ctrl-C an Abort
        why = exc if isinstance(exc, KeyboardInterrupt) else exc.__cause__
        line, code = _stopped(argv, why)
        click.echo(line, err=True)
        sys.exit(code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except TunerError as exc:  # ConfigError, SpecError, DataError too
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(0)
