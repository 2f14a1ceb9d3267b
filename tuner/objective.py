"""The only place that knows both an Optuna trial and the training loop: draw a point, train it,
report each epoch to the pruner and to MLflow, and close the trial's run with its true state."""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from tuner import interrupts
from tuner.data import TrainVal
from tuner.interrupts import TrialTimeout
from tuner.models import build_vgg
from tuner.space import TrialParams, suggest
from tuner.spec import StudySpec
from tuner.tracking import Tracker
from tuner.train import Diverged, EpochStats, TrainConfig, is_out_of_memory, train
from tuner.trials import (
    ACCUMULATION_ATTR,
    DIVERGED,
    REASON_ATTR,
    RETRY_OF_ATTR,
    RUN_ID_ATTR,
    WORKER_ATTR,
    fail_from_outside,
    retry_origin,
    worker_id,
)


class TrialFailed(Exception):
    """A trial ended without a result, for a reason recorded on it; the study goes on."""


@dataclass(frozen=True)
class StudyContext:
    """What every trial of one worker shares."""

    spec: StudySpec
    data: TrainVal
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    say: Callable[[str], None] = print
    on_start: Callable[[optuna.Trial], None] = lambda trial: None  # the trial exists now


def train_config(
    spec: StudySpec,
    params: TrialParams,
    seed: int,
    *,
    accumulation: int = 1,
    compile: bool = False,
) -> TrainConfig:
    t = spec.train
    return TrainConfig(
        epochs=t.epochs,
        batch_size=t.batch_size,
        optimizer=params.optimizer,
        lr=params.lr,
        weight_decay=params.weight_decay,
        momentum=t.momentum,
        schedule=t.schedule,
        warmup_fraction=t.warmup_fraction,
        label_smoothing=t.label_smoothing,
        augment=params.augment,
        crop_padding=t.crop_padding,
        cutout_size=t.cutout_size,
        seed=seed,
        accumulation=accumulation,
        compile=compile,
    )


def use_compile(setting: str, device: torch.device) -> bool:
    """`auto` compiles on the GPU only: on the CPU the compile takes longer than it saves."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def architecture(spec: StudySpec, params: TrialParams) -> dict[str, object]:
    """Enough to rebuild the network for loading its weights (`build_vgg(**architecture)`)."""
    return {
        "depth": params.depth,
        "batch_norm": params.batch_norm,
        "dropout": params.dropout,
        "width": spec.train.width,
    }


def build_model(spec: StudySpec, params: TrialParams, seed: int) -> torch.nn.Module:
    """The trial's network, its initial weights drawn from `seed` (not from the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vgg(**architecture(spec, params))


def describe(params: TrialParams) -> str:
    bn = "bn" if params.batch_norm else "no-bn"
    return (
        f"{params.depth}-{bn} {params.optimizer} lr={params.lr:.2e} wd={params.weight_decay:.1e} "
        f"dropout={params.dropout:.2f} aug={params.augment}"
    )


def make_objective(ctx: StudyContext) -> Callable[[optuna.Trial], float]:
    spec = ctx.spec
    settings = {
        "train": spec.train.model_dump(),
        "data": spec.data.model_dump(),
        "limits": spec.limits.model_dump(),
        "seed": spec.seed,
    }
    device = ctx.data.train.images.device

    def objective(trial: optuna.Trial) -> float:
        ctx.on_start(trial)
        params = suggest(trial, spec.space)
        accumulation = int(trial.user_attrs.get(ACCUMULATION_ATTR, 1))
        tag = f"[trial {trial.number}]"
        system = trial.storage.get_trial_system_attrs(trial._trial_id)  # Trial hides them
        retry = retry_origin(trial.user_attrs, system)
        note = f" (retry of trial {retry})" if retry is not None else ""
        if accumulation > 1:
            note += f" at batch {spec.train.batch_size // accumulation} × {accumulation} steps"
        ctx.say(f"{tag} start: {describe(params)}{note}")
        trial.set_user_attr(WORKER_ATTR, worker_id())
        run_id = ctx.tracker.start_trial(
            ctx.experiment_id,
            ctx.parent_run_id,
            spec.name,
            trial.number,
            {**params.as_dict(), ACCUMULATION_ATTR: accumulation},
            settings,
        )
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        last = [0]  # the last epoch that finished, for pruned/failed records

        def on_epoch(stats: EpochStats) -> None:
            with interrupts.shielded():  # MLflow and Optuna writes are not cut in half
                record_epoch(stats)

        def record_epoch(stats: EpochStats) -> None:
            last[0] = stats.epoch
            ctx.tracker.log_epoch(run_id, stats)
            warmup = (
                f", first step {stats.first_step_seconds:.1f} s"
                if stats.first_step_seconds is not None and stats.first_step_seconds >= 1
                else ""
            )
            ctx.say(
                f"{tag} epoch {stats.epoch}/{spec.train.epochs}  train_loss {stats.train_loss:.3f}"
                f"  val_loss {stats.val_loss:.3f}  val_acc {stats.val_acc:.4f}"
                f"  ({stats.seconds:.1f} s{warmup})"
            )
            trial.report(stats.val_acc, stats.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}")

        def on_hang() -> None:  # from the watchdog thread: the main thread is stuck
            _record_hang(ctx, trial, run_id, last[0])

        # each trial gets its own seed: same study seed and trial number, same run
        seed = spec.seed * 100_003 + trial.number
        config = train_config(spec, params, seed, accumulation=accumulation,
                              compile=use_compile(spec.train.compile, device))  # fmt: skip
        out_of_memory = None
        try:
            model = build_model(spec, params, config.seed).to(device)
            with interrupts.time_limit(spec.limits.trial_timeout, on_hang):
                result = train(model, ctx.data, config, on_epoch)
        except optuna.TrialPruned:
            trial.set_user_attr("pruned_at_epoch", last[0])
            ctx.tracker.end_trial(run_id, "pruned", epochs=last[0])
            ctx.say(f"{tag} pruned after epoch {last[0]}")
            raise
        except Diverged as exc:
            # PRUNED with a violated constraint, not FAIL: TPE learns only from finished
            # trials, and ranks infeasible ones below every feasible one
            trial.set_user_attr(REASON_ATTR, DIVERGED)
            trial.set_constraint(DIVERGED, 1.0)
            ctx.tracker.end_trial(run_id, DIVERGED, reason=f"{DIVERGED}: {exc}", epochs=last[0])
            ctx.say(f"{tag} diverged: {exc}; the sampler is told to avoid this region")
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        except TrialTimeout:
            limit = spec.limits.trial_timeout
            _fail(ctx, trial, run_id, "timeout", f"ran past limits.trial_timeout={limit} s",
                  last[0])  # fmt: skip
            raise TrialFailed(f"{tag} timed out after {limit} s") from None
        except KeyboardInterrupt as exc:
            why = interrupts.reason(exc)
            trial.set_user_attr(REASON_ATTR, why)
            ctx.tracker.end_trial(run_id, "killed", reason=why, epochs=last[0])
            raise
        except Exception as exc:
            if not is_out_of_memory(exc):
                reason = f"error: {type(exc).__name__}: {exc}"
                _fail(ctx, trial, run_id, reason, traceback.format_exc(), last[0])
                raise TrialFailed(f"{tag} failed: {reason}") from exc
            out_of_memory = f"{type(exc).__name__}: {str(exc)[:300]}"
        if out_of_memory is not None:
            # out of the `except` block: the traceback and its tensors are gone; free the rest
            model = None  # noqa: F841
            release_memory(device)
            _fail(ctx, trial, run_id, "out_of_memory", out_of_memory, last[0])
            retried = _retry_smaller(ctx, trial, accumulation)
            raise TrialFailed(f"{tag} out of memory{retried}")

        value = result.history[-1].val_acc
        interrupts.defer()  # Ctrl-C or SIGTERM now waits until the trial is recorded whole
        ctx.tracker.save_trial_outputs(
            run_id,
            result.state_dict,
            architecture(spec, params),
            result.val_probs,
            ctx.data.val.labels.cpu().numpy(),
        )
        ctx.tracker.end_trial(run_id, "complete", value=value, epochs=len(result.history))
        ctx.say(f"{tag} complete: val_acc {value:.4f}")
        return value

    return objective


def release_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back, so the next trial starts from empty."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _retry_smaller(ctx: StudyContext, trial: optuna.Trial, accumulation: int) -> str:
    """Queue the same parameters once more at half the batch, two micro-batches per step."""
    micro = ctx.spec.train.batch_size // (2 * accumulation)
    if not ctx.spec.limits.retry_out_of_memory or accumulation > 1 or micro < 1:
        return "; not retried"
    trial.study.enqueue_trial(
        trial.params,
        user_attrs={ACCUMULATION_ATTR: 2 * accumulation, RETRY_OF_ATTR: trial.number},
        skip_if_exists=False,
    )
    ctx.say(f"[trial {trial.number}] out of memory: queued a retry at batch {micro} "
            f"× {2 * accumulation} accumulation steps (same effective batch)")  # fmt: skip
    return "; retry queued at half the batch"


def _record_hang(ctx: StudyContext, trial: optuna.Trial, run_id: str, epochs: int) -> None:
    """The trial ignored its time limit (stuck in native code): record it before the exit."""
    reason = "timeout"
    details = "hung past limits.trial_timeout; the worker process was ended"
    ctx.say(f"[trial {trial.number}] hung past its time limit; ending this worker")
    try:
        fail_from_outside(trial.study, trial._trial_id, reason)
    finally:
        ctx.tracker.end_trial(run_id, "failed", reason=reason, epochs=epochs, details=details)


def _fail(
    ctx: StudyContext, trial: optuna.Trial, run_id: str, reason: str, details: str, epochs: int
) -> None:
    trial.set_user_attr(REASON_ATTR, reason[:500])
    ctx.tracker.end_trial(run_id, "failed", reason=reason[:500], epochs=epochs, details=details)
    ctx.say(f"[trial {trial.number}] failed: {reason}")
