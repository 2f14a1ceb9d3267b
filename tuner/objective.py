"""The only place that knows both an Optuna trial and the training loop: draw a point, train it,
report each epoch to the pruner and to MLflow, and close the trial's run with its true state."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from tuner.data import TrainVal
from tuner.models import build_vgg
from tuner.space import TrialParams, suggest
from tuner.spec import StudySpec
from tuner.tracking import Tracker
from tuner.train import Diverged, EpochStats, TrainConfig, train

RUN_ID_ATTR = "mlflow_run_id"
REASON_ATTR = "fail_reason"


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


def train_config(spec: StudySpec, params: TrialParams, seed: int) -> TrainConfig:
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
    )


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
        "seed": spec.seed,
    }

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, spec.space)
        tag = f"[trial {trial.number}]"
        ctx.say(f"{tag} start: {describe(params)}")
        run_id = ctx.tracker.start_trial(
            ctx.experiment_id,
            ctx.parent_run_id,
            spec.name,
            trial.number,
            params.as_dict(),
            settings,
        )
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        last = [0]  # the last epoch that finished, for pruned/failed records

        def on_epoch(stats: EpochStats) -> None:
            last[0] = stats.epoch
            ctx.tracker.log_epoch(run_id, stats)
            ctx.say(
                f"{tag} epoch {stats.epoch}/{spec.train.epochs}  train_loss {stats.train_loss:.3f}"
                f"  val_loss {stats.val_loss:.3f}  val_acc {stats.val_acc:.4f}"
                f"  ({stats.seconds:.1f} s)"
            )
            trial.report(stats.val_acc, stats.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}")

        # each trial gets its own seed: same study seed and trial number, same run
        config = train_config(spec, params, seed=spec.seed * 100_003 + trial.number)
        model = build_model(spec, params, config.seed).to(ctx.data.train.images.device)
        try:
            result = train(model, ctx.data, config, on_epoch)
        except optuna.TrialPruned:
            trial.set_user_attr("pruned_at_epoch", last[0])
            ctx.tracker.end_trial(run_id, "pruned", epochs=last[0])
            ctx.say(f"{tag} pruned after epoch {last[0]}")
            raise
        except Diverged as exc:
            _fail(ctx, trial, run_id, "diverged", str(exc), last[0])
            raise TrialFailed(f"{tag} diverged: {exc}") from None
        except KeyboardInterrupt:
            trial.set_user_attr(REASON_ATTR, "interrupted")
            ctx.tracker.end_trial(run_id, "killed", reason="interrupted", epochs=last[0])
            raise
        except Exception as exc:
            reason = f"error: {type(exc).__name__}: {exc}"
            _fail(ctx, trial, run_id, reason, traceback.format_exc(), last[0])
            raise TrialFailed(f"{tag} failed: {reason}") from exc

        value = result.history[-1].val_acc
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


def _fail(
    ctx: StudyContext, trial: optuna.Trial, run_id: str, reason: str, details: str, epochs: int
) -> None:
    trial.set_user_attr(REASON_ATTR, reason[:500])
    ctx.tracker.end_trial(run_id, "failed", reason=reason[:500], epochs=epochs, details=details)
    ctx.say(f"[trial {trial.number}] failed: {reason}")
