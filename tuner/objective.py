"""The only place that knows both an Optuna trial and the training loop. A `TrialRun` draws a
point, trains it, reports each epoch to the pruner and to MLflow as it ends, and `record` writes
how the trial ended: its weights, then Optuna's state (final: Optuna decides), then its MLflow
run, closed with that state, then the console. One table maps what training raised to that
ending."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError

from tuner import _optuna, interrupts
from tuner.console import StepBar
from tuner.data import DataInfo, TrainVal, check_augment
from tuner.devices import is_out_of_memory, release_memory
from tuner.errors import StoreError, TunerError
from tuner.interrupts import TrialTimeout
from tuner.models import Architecture, build, check_builder
from tuner.pruning import decision_epochs
from tuner.records import (
    ACCUMULATION_ATTR,
    BASELINE_ATTR,
    DIVERGED,
    FIRST_OF_POINT_ATTR,
    OUT_OF_MEMORY,
    PRUNED_AT_ATTR,
    REASON_ATTR,
    RECORDS,
    REFIT_EPOCHS_ATTR,
    REFIT_OF_ATTR,
    REFIT_OF_RUN_ATTR,
    REFIT_OF_RUN_TAG,
    REFIT_OF_TAG,
    RUN_ID_ATTR,
    STORE_ERROR,
    TIMEOUT,
    Outcome,
    Role,
    retry_origin,
    trial_role,
)
from tuner.retries import queue_again
from tuner.space import TrialParams, log10_twins, suggest
from tuner.spec import FloatRange, IntRange, StudySpec
from tuner.store_errors import store_cause
from tuner.stores import store_error
from tuner.tracking import StudyRuns, Tracker, TrialOutputs, TrialRunRef
from tuner.train import (
    CompileMode,
    Diverged,
    EpochStats,
    TrainConfig,
    TrainResult,
    compile_mode,
    steps_per_epoch,
    train,
)

log = logging.getLogger(__name__)
REASON_CHARS = 500  # a fail reason longer than this is cut (the whole text is in error.txt)
TAKEN = "failed by another process while it ran (its heartbeat was late); this attempt is dropped"


@dataclass(frozen=True)
class StudyContext:
    """What every trial of one worker shares; the ids come down from the study's set-up."""

    spec: StudySpec
    data: TrainVal
    tracker: Tracker
    runs: StudyRuns
    # after a trial's line: how far the run is, and its ETA (`worker.progress_note`)
    progress: Callable[[optuna.Study], str] = lambda study: ""
    trainer: Callable[..., TrainResult] = train  # a benchmark replays epochs instead
    # the worker's writer of epoch metrics (one thread; each trial waits for what it handed
    # over before it is recorded); None: written in line
    writer: concurrent.futures.Executor | None = None

    @property
    def device(self) -> torch.device:
        return self.data.train.images.device

    @functools.cached_property
    def refit(self) -> bool:
        """Its trials are refits (trained on train + validation, nothing held out)."""
        return trial_role(self.spec.name) is Role.REFIT

    @functools.cached_property
    def decisions(self) -> frozenset[int]:
        """The epochs after which the pruner is asked (it answers no at the others)."""
        return decision_epochs(self.spec)


@dataclass(frozen=True)
class Ending:
    """How a trial ended, and what `finish` writes about it."""

    outcome: Outcome
    reason: str | None = None  # why it did not complete (Optuna attribute, MLflow tag)
    details: str | None = None  # the longer story (a traceback), kept as the run's error.txt
    summary: str | None = None  # one line that says more than `reason` (MLflow tag, console)
    result: TrainResult | None = None  # COMPLETE: the trained network and its predictions
    retry: bool = False  # queue the same point again at half the batch (out of memory)
    requeue: bool = False  # queue the same point again as it was (lost to a store error)
    taken: bool = False  # another process failed the trial meanwhile: nothing to tell Optuna
    stop: BaseException | None = None  # Ctrl-C, SIGTERM, a store error: raised once recorded


def _pruned(run: TrialRun, exc: BaseException) -> Ending:
    return Ending(Outcome.PRUNED)


def _diverged(run: TrialRun, exc: BaseException) -> Ending:
    return Ending(Outcome.DIVERGED, DIVERGED, summary=f"{DIVERGED}: {exc}")


def _timed_out(run: TrialRun, exc: BaseException) -> Ending:
    limit = run.ctx.spec.limits.trial_timeout
    return Ending(Outcome.FAILED, TIMEOUT, f"ran past limits.trial_timeout={limit} s")


def _stopped(run: TrialRun, exc: BaseException) -> Ending:
    """Ctrl-C or SIGTERM: the trial is killed and its point queued again, so that the next
    `study run` trains it before drawing any new point (an interrupted baseline too)."""
    return Ending(Outcome.KILLED, interrupts.reason(exc), requeue=True, stop=exc)


def _out_of_memory(run: TrialRun, exc: BaseException) -> Ending:
    return Ending(
        Outcome.FAILED, OUT_OF_MEMORY, f"{type(exc).__name__}: {str(exc)[:300]}", retry=True
    )


def _taken(run: TrialRun, exc: BaseException) -> Ending:
    return Ending(Outcome.KILLED, TAKEN, taken=True)


def _is_store_error(exc: BaseException) -> bool:
    return store_cause(exc) is not None


def _store_failed(run: TrialRun, exc: BaseException) -> Ending:
    """A store could not be used: the trial is failed with the cause and queued again (not its
    fault: it does not count against the budget), and the worker stops with one line."""
    error = store_error(exc, run.ctx.tracker.stores)
    assert error is not None
    log.info(f"{run.tag} lost to a store error: {error}")
    details = "".join(traceback.format_exception(exc))
    return Ending(Outcome.FAILED, f"{STORE_ERROR}: {error}", details, requeue=True, stop=error)


def _error(run: TrialRun, exc: BaseException) -> Ending:
    reason = f"error: {type(exc).__name__}: {exc}"
    return Ending(Outcome.FAILED, reason, "".join(traceback.format_exception(exc)))


# What training raised → how the trial ended. The first row that matches wins.
ENDINGS: tuple[
    tuple[type[BaseException] | Callable[[BaseException], bool], Callable[..., Ending]], ...
] = (
    (optuna.TrialPruned, _pruned),
    (Diverged, _diverged),
    (TrialTimeout, _timed_out),
    (KeyboardInterrupt, _stopped),  # SIGTERM's Terminated too
    (is_out_of_memory, _out_of_memory),  # CUDA's OutOfMemoryError; the CPU's RuntimeError
    (UpdateFinishedTrialError, _taken),  # `report` on a trial another process failed
    (_is_store_error, _store_failed),  # locked, full, read-only, unreachable
    (Exception, _error),
)


def ending_for(run: TrialRun, exc: BaseException) -> Ending | None:
    """The row of `ENDINGS` for `exc`; None for what is no trial's business (SystemExit)."""
    for match, make in ENDINGS:
        if isinstance(exc, match) if isinstance(match, type) else match(exc):
            return make(run, exc)
    return None


class TrialRun:
    """One trial, from its first parameter to its last record."""

    def __init__(self, ctx: StudyContext, trial: optuna.Trial) -> None:
        self.ctx, self.trial = ctx, trial
        self.refit_of: int | None = trial.user_attrs.get(REFIT_OF_ATTR)  # a refit: its source
        self.tag = (
            f"[trial {trial.number}]"
            if self.refit_of is None
            else f"[refit of trial {self.refit_of}]"
        )
        self.params: TrialParams | None = None
        self.accumulation = int(trial.user_attrs.get(ACCUMULATION_ATTR, 1))
        self.run: TrialRunRef | None = None
        self.epochs = 0  # the last epoch that finished
        self.val_accs: list[float] = []  # each epoch's, as reported to the pruner
        self.weights_sha256: str | None = None
        self.began: float | None = None  # perf_counter at `start`
        self.handed: list[concurrent.futures.Future] = []  # epochs' records, until stored
        self.epoch_seconds = 0.0  # the epochs' own time, summed (`overhead_seconds`: the rest)

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None

    @functools.cached_property
    def spec(self) -> StudySpec:
        """The study file as this trial trains it: a refit trains for the epochs it was queued
        with."""
        spec = self.ctx.spec
        epochs = self.trial.user_attrs.get(REFIT_EPOCHS_ATTR)
        if not self.ctx.refit or epochs is None:
            return spec
        return spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": epochs})})

    def attempt(self) -> Ending:
        """Draw, start and train; whatever happens is an `Ending` (see `ENDINGS`)."""
        try:
            self.start()
            with interrupts.live():  # until here, a signal waited for the trial to be set up
                result = self._train()
        except BaseException as exc:
            ending = ending_for(self, exc)
            if ending is None:
                raise
            return ending
        return Ending(Outcome.COMPLETE, result=result)

    def start(self) -> None:
        """Draw the point; the MLflow run; the first line on the console."""
        spec, trial = self.spec, self.trial
        self.began = time.perf_counter()
        if self.ctx.refit and self.refit_of is None:
            raise TunerError("no refit was queued for it (another worker took the last)")
        self.params = params = suggest(trial, self.spec.space, self.spec.builder)
        retry = retry_origin(trial.user_attrs, _optuna.frozen(trial).system_attrs)
        note = f" (retry of trial {retry})" if retry is not None else ""
        baseline = trial.user_attrs.get(BASELINE_ATTR)
        label = params.label() + (f" [{baseline}]" if baseline else "")  # one name, everywhere
        if self.accumulation > 1:
            micro = spec.train.batch_size // self.accumulation
            note += f" at batch {micro} × {self.accumulation} steps"
        drawn = {**params.as_dict(), **log10_twins(params, spec.space),
                 ACCUMULATION_ATTR: self.accumulation}  # fmt: skip
        if self.refit_of is not None:
            self.run = self._start_refit(drawn, label, note)
        else:
            log.info(f"{self.tag} start: {label} {params.details()}{note}")
            self.run = self.ctx.tracker.start_trial(
                self.ctx.runs, spec.name, trial.number, drawn, spec.trial_settings(), label
            )
        trial.set_user_attr(RUN_ID_ATTR, self.run.run_id)  # it started: lost now, it counts

    def _start_refit(self, drawn: dict, label: str, note: str) -> TrialRunRef:
        """A refit's run: role `refit`, named and tagged with the search trial it retrains."""
        spec, source = self.spec, self.refit_of
        epochs = spec.train.epochs
        log.info(f"{self.tag} start ({epochs} epochs on train + validation): "
                 f"{label} {self.params.details()}{note}")  # fmt: skip
        tags = {REFIT_OF_TAG: str(source)}
        origin = self.trial.user_attrs.get(REFIT_OF_RUN_ATTR)
        if origin:
            tags[REFIT_OF_RUN_TAG] = origin
        drawn = {**drawn, REFIT_OF_ATTR: source}
        return self.ctx.tracker.start_trial(
            self.ctx.runs, spec.name, self.trial.number, drawn, spec.trial_settings(), label,
            role=Role.REFIT, tags=tags, name=f"refit {source:04d} {label} ({epochs} ep)",
        )  # fmt: skip

    def _train(self) -> TrainResult:
        spec, device = self.spec, self.ctx.device
        # each trial gets its own seed: same study seed and trial number, same run (a refit
        # starts from the weights its search trial started from)
        number = self.refit_of
        if number is None:  # a retry: the number of its point's first trial
            number = int(self.trial.user_attrs.get(FIRST_OF_POINT_ATTR, self.trial.number))
        seed = spec.seed * 100_003 + number
        model = build(self.architecture, seed=seed).to(device)
        config = train_config(
            spec,
            self.params,
            seed,
            accumulation=self.accumulation,
            compile=compile_mode(spec.train.compile, device),
        )
        bar = StepBar(steps_per_epoch(len(self.ctx.data.train), spec.train.batch_size), self.tag)

        def on_epoch(stats: EpochStats) -> None:
            bar.end_epoch()
            self.on_epoch(stats)

        try:
            with interrupts.time_limit(spec.limits.trial_timeout, self.record_hang):
                return self.ctx.trainer(model, self.ctx.data, config, on_epoch, bar.step)
        finally:
            bar.close()

    @property
    def architecture(self) -> Architecture:
        assert self.params is not None
        return architecture(self.spec, self.params, self.ctx.data.info)

    def on_epoch(self, stats: EpochStats) -> None:
        """An epoch ended: its metrics to MLflow and its value to Optuna, through the worker's
        writer while the next epoch trains (all stored before the trial is recorded); at a
        decision epoch before the last, once they are in, the pruner is asked (a trial that
        trained every epoch is complete, whatever the pruner would say). Waiting for them, a
        signal waits, and the time limit does not count a store's wait."""
        self.epochs = stats.epoch
        self.epoch_seconds += stats.seconds
        last = stats.epoch == self.spec.train.epochs
        decide = stats.epoch in self.ctx.decisions and not self.ctx.refit and not last
        assert self.run is not None
        self._hand_over(self.ctx.tracker.log_epochs, self.run.run_id,
                        [(stats.epoch, stats.metrics())])  # fmt: skip
        if stats.val_acc is not None:
            self.val_accs.append(stats.val_acc)
            self._hand_over(self.trial.report, stats.val_acc, stats.epoch)
        prune = False
        if decide:
            with interrupts.writing():
                self._wait_handed()  # what the pruner reads
                prune = self.trial.should_prune()
        log.info(f"{self.tag} {describe_epoch(stats, self.spec.train.epochs)}")
        if prune:
            raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}")

    def record(self, ending: Ending) -> Ending:
        """Write how the trial ended, in this order: its weights (a completed trial whose
        weights cannot be saved is a store error); Optuna's state, which is final (a trial
        another process failed meanwhile keeps what that process wrote); the MLflow run,
        closed with the state Optuna holds; the console; and a retry, where the ending asks
        for one and the ending is this process's. The ending written."""
        ending = self._epochs_stored(ending)
        value = None
        if ending.result is not None:
            try:
                self.weights_sha256 = self._save(ending.result)
                last = ending.result.history[-1]
                # a refit has no validation images: its value is its last training loss
                value = last.train_loss if self.ctx.refit else last.val_acc
            except Exception as exc:
                if not _is_store_error(exc):
                    raise
                ending = _store_failed(self, exc)
        if not ending.taken:
            ending = self._tell(ending, value)
        self._end_run(ending, value)
        if ending.taken:
            log.info(f"{self.tag} {TAKEN}")
            return ending
        retried = self._retry_smaller() if ending.retry else ""
        retried += self._requeue() if ending.requeue else ""
        progress = self.ctx.progress(self.trial.study)
        said = _console(ending, value, self.epochs, self.ctx.refit)
        log.info(f"{self.tag} {said}{retried}{progress}")
        return ending

    def _hand_over(self, write: Callable[..., object], *args: object) -> None:
        """A write for the worker's writer (in line without one); its result is this trial's."""
        if self.ctx.writer is None:
            with interrupts.writing():
                write(*args)
            return
        self.handed.append(self.ctx.writer.submit(write, *args))

    def _wait_handed(self) -> None:
        """Wait until all this trial handed to the writer is written; raise the first error."""
        handed, self.handed = self.handed, []
        errors = [future.exception() for future in handed]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def _epochs_stored(self, ending: Ending) -> Ending:
        """Every epoch's records are stored before the trial is recorded. A completed trial
        whose records could not be stored is not complete (`ENDINGS`); another ending stays
        what it was, with one line."""
        try:
            self._wait_handed()
        except Exception as exc:
            if ending.outcome is Outcome.COMPLETE:
                return ending_for(self, exc) or ending
            log.info(f"{self.tag} its last epochs' records could not be stored ({exc})")
        return ending

    def _tell(self, ending: Ending, value: float | None) -> Ending:
        """Tell Optuna how the trial ended. Another process may have failed it meanwhile (its
        heartbeat was late): the state that process wrote stays, and the ending becomes
        `taken`. A `tell` whose commit went through before the connection dropped is retried
        by the store wait and refused: the state read back is this ending's, so it stands."""
        trial, outcome = self.trial, ending.outcome
        state = RECORDS[outcome].optuna
        try:
            if ending.reason:
                trial.set_user_attr(REASON_ATTR, ending.reason[:REASON_CHARS])
            if outcome is Outcome.PRUNED:
                trial.set_user_attr(PRUNED_AT_ATTR, self.epochs)
            if outcome is Outcome.DIVERGED:
                trial.set_constraint(DIVERGED, 1.0)  # violated: the sampler avoids this region
            trial.study.tell(trial, value, state=state)
            return ending
        except (UpdateFinishedTrialError, ValueError) as exc:
            if isinstance(exc, ValueError) and "Cannot tell" not in str(exc):
                raise
        except Exception as exc:
            error = store_error(exc, self.ctx.tracker.stores)
            if error is None:
                raise
            raise StoreError(
                f"{error} (trial {trial.number} could not be recorded: the next `tuner study "
                "run` fails it and queues it again once its heartbeat is stale)"
            ) from None
        held = _optuna.stored(trial)
        ours = held.state == state and held.value == value
        if ours and ending.reason:
            ours = held.user_attrs.get(REASON_ATTR) == ending.reason[:REASON_CHARS]
        return ending if ours else replace(ending, outcome=Outcome.KILLED, reason=TAKEN,
                                           taken=True)  # fmt: skip

    def _end_run(self, ending: Ending, value: float | None) -> None:
        if self.run is None:
            return
        tag = ending.summary or ending.reason
        self.ctx.tracker.end_trial(
            self.run.run_id,
            ending.outcome,
            value=None if self.ctx.refit or ending.taken else value,  # `final_val_acc`
            epochs=self.epochs,
            reason=tag and tag[:REASON_CHARS],
            details=ending.details,
            weights_sha256=self.weights_sha256,
            summary=self.summary(ending.outcome, value),
            name=self.run.name,
        )

    def summary(self, outcome: Outcome, value: float | None) -> dict[str, float]:
        """The metrics every trial run logs alike, to compare trials on one axis: `objective`
        (what Optuna holds: the value of a completed trial, the last value a pruned or
        diverged one reported; none for a failed one), `best_val_acc` and `epochs_trained`.
        A pruned trial has no `final_val_acc`: on that axis alone it would be drawn best.
        `overhead_seconds`: the trial's time outside its epochs (building the model, the run,
        saving the weights and predictions); only where training ended between epochs
        (complete, pruned): an epoch cut short is neither training counted nor overhead."""
        overhead = {}
        if self.began is not None and outcome in (Outcome.COMPLETE, Outcome.PRUNED):
            overhead["overhead_seconds"] = time.perf_counter() - self.began - self.epoch_seconds
        if self.ctx.refit:
            refit = {"epochs_trained": float(self.epochs), **overhead}
            return refit | ({"final_train_loss": value} if value is not None else {})
        metrics = {"epochs_trained": float(len(self.val_accs)), **overhead}
        finite = [v for v in self.val_accs if math.isfinite(v)]
        if finite:
            metrics["best_val_acc"] = max(finite)
        if outcome is Outcome.COMPLETE and value is not None:
            metrics["objective"] = value
        elif outcome in (Outcome.PRUNED, Outcome.DIVERGED) and finite:
            metrics["objective"] = finite[-1]
        return metrics

    def _requeue(self) -> str:
        """Queue the same point once more, as it was (the trial was lost to a store, or
        stopped by Ctrl-C or SIGTERM): what was fixed when it was queued (a baseline), and
        what it drew, were it stopped while drawing."""
        fixed = _optuna.frozen(self.trial).system_attrs.get("fixed_params", {})
        point = {**fixed, **self.trial.params}
        queue_again(self.trial.study, self.trial, point, self.accumulation)
        return "; queued again: it runs before any new point is drawn (not counted)"

    def _save(self, result: TrainResult) -> str:
        """The trial's weights, architecture and predictions; the weights' SHA-256."""
        assert self.run is not None
        labels = self.ctx.data.val.labels.cpu().numpy() if not self.ctx.refit else None
        probs = result.val_probs if not self.ctx.refit else None
        outputs = TrialOutputs(result.state_dict, self.architecture, probs, labels)
        return self.ctx.tracker.save_trial_outputs(self.run, outputs)

    def _retry_smaller(self) -> str:
        """Queue the same parameters once more at half the batch, two micro-batches per step."""
        release_memory(self.ctx.device)  # the failed step's tensors died with its traceback
        limits, batch = self.spec.limits, self.spec.train.batch_size
        micro = batch // (2 * self.accumulation)
        if not limits.retry_out_of_memory or self.accumulation > 1 or micro < 1:
            return "; not retried"
        queue_again(self.trial.study, self.trial, self.trial.params, 2 * self.accumulation)
        log.info(
            f"{self.tag} out of memory: queued a retry at batch {micro} "
            f"× {2 * self.accumulation} accumulation steps (same effective batch)"
        )
        return "; retry queued at half the batch"

    def record_hang(self) -> None:
        """From the watchdog thread: the trial ignored its time limit (stuck in native code);
        record it before the process ends: Optuna first, then its run with what Optuna holds."""
        log.info(f"{self.tag} hung past its time limit; ending this worker")
        study = self.trial.study
        failed = _optuna.fail_from_outside(study, _optuna.frozen(self.trial), REASON_ATTR,
                                           TIMEOUT)  # fmt: skip
        why = "hung past limits.trial_timeout; the worker process was ended"
        ending = Ending(Outcome.FAILED, TIMEOUT, why) if failed else Ending(
            Outcome.KILLED, TAKEN, taken=True)  # fmt: skip
        self._end_run(ending, None)


def architecture(spec: StudySpec, params: TrialParams, info: DataInfo) -> Architecture:
    """The network a point of the study trains, on its data set's images and classes."""
    return Architecture(spec.family, dict(params.model), spec.train.width, info.classes,
                        info.shape, spec.builder)  # fmt: skip


def first_point(spec: StudySpec) -> TrialParams:
    """A point of the space without drawing: each parameter's first choice or its range's
    middle (a builder is checked on it before any trial trains)."""

    def pick(how: object) -> object:
        if isinstance(how, IntRange):
            return how.low + (how.high - how.low) // (2 * how.step) * how.step
        if isinstance(how, FloatRange):
            return (how.low * how.high) ** 0.5 if how.log else (how.low + how.high) / 2
        return how[0]  # type: ignore[index]

    space = spec.space
    model = {k: pick(v) for k, v in space.model_params().items()}
    for name, (on, value) in space.CONDITIONS.items():
        if model.get(on) != value:
            model.pop(name, None)
    optimizer = next(iter(space.optimizer))
    lr, decay = pick(space.optimizer[optimizer].lr), pick(space.weight_decay)
    return TrialParams(optimizer, float(lr), float(decay), space.augment[0], model,  # type: ignore[arg-type]
                       spec.family, spec.builder)  # fmt: skip


def check_study(spec: StudySpec, info: DataInfo) -> None:
    """What can be known wrong before any trial trains, each one line: an augmentation that
    does not fit the images, a builder that cannot be imported or called, or whose network
    does not map a batch of these images to one logit per class."""
    check_augment(spec.train, spec.space.augment, info)
    if spec.builder is not None:
        check_builder(architecture(spec, first_point(spec), info))


def _console(ending: Ending, value: float | None, epochs: int, refit: bool = False) -> str:
    word = RECORDS[ending.outcome].word
    if ending.outcome is Outcome.COMPLETE and refit:
        return f"{word}: train_loss {value:.4f}"  # nothing held out to score it on
    if ending.outcome is Outcome.COMPLETE:
        return f"{word}: val_acc {value:.4f}"
    if ending.outcome is Outcome.PRUNED:
        return f"{word} after epoch {epochs}"
    if ending.outcome is Outcome.DIVERGED:
        return f"{ending.summary}; the sampler is told to avoid this region"
    return f"{word}: {ending.reason}"


def train_config(
    spec: StudySpec,
    params: TrialParams,
    seed: int,
    *,
    accumulation: int = 1,
    compile: CompileMode = "off",
) -> TrainConfig:
    """The study file's fixed training settings with the trial's drawn ones."""
    fixed = spec.train.model_dump(exclude={"width", "compile"})
    drawn = {k: getattr(params, k) for k in ("optimizer", "lr", "weight_decay", "augment")}
    return TrainConfig(**fixed, **drawn, seed=seed, accumulation=accumulation, compile=compile)


def describe_epoch(stats: EpochStats, epochs: int) -> str:
    warmup = (
        f", first step {stats.first_step_seconds:.1f} s"
        if stats.first_step_seconds is not None and stats.first_step_seconds >= 1
        else ""
    )
    val = (
        f"  val_loss {stats.val_loss:.3f}  val_acc {stats.val_acc:.4f}"
        if stats.val_loss is not None and stats.val_acc is not None
        else ""
    )
    return (
        f"epoch {stats.epoch}/{epochs}  train_loss {stats.train_loss:.3f}{val}"
        f"  ({stats.seconds:.1f} s{warmup})"
    )
