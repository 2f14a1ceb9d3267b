"""The study file's pruner, and the epochs at which it can stop a trial. Asking it at any other
epoch is a round of queries (and a commit) whose answer is known: no."""

from __future__ import annotations

import optuna

from tuner.spec import StudySpec


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.type == "hyperband":  # resources are epochs
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_epochs,
            max_resource=spec.train.epochs,
            reduction_factor=p.reduction_factor,
        )
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.warmup_epochs
        )
    return optuna.pruners.NopPruner()


def decision_epochs(spec: StudySpec) -> frozenset[int]:
    """The epochs after which `make_pruner(spec)` may prune; it answers no at every other.

    Hyperband: each bracket is a successive-halving pruner whose rungs end at epochs
    `min_epochs × reduction_factor**k`, from its own k on (bracket b: k ≥ b); below its next
    rung it answers no without writing. Every bracket's rungs are among those epochs, so
    asking at all of them asks each trial at its own. Median: every epoch from
    `warmup_epochs` on (Optuna's steps are tuner's 1-based epochs). None: never."""
    p, epochs = spec.pruner, spec.train.epochs
    if p.type == "hyperband":
        rungs, epoch = set(), p.min_epochs
        while epoch <= epochs:
            rungs.add(epoch)
            epoch *= p.reduction_factor
        return frozenset(rungs)
    if p.type == "median":
        return frozenset(range(max(1, p.warmup_epochs), epochs + 1))
    return frozenset()


def expected_epochs(spec: StudySpec) -> float:
    """The epochs a trial trains on average under `make_pruner(spec)`, were the pruner to keep
    what it means to keep. Hyperband: Optuna's brackets b = 0, 1, … in turn, each a
    successive-halving pruner keeping 1 in `reduction_factor` at each of its rungs (from
    `min_epochs × reduction_factor**b` on). Median: half the trials stop at the first epoch
    it decides at. None: every epoch."""
    p, epochs = spec.pruner, spec.train.epochs
    if p.type == "hyperband":
        rungs = sorted(decision_epochs(spec))
        brackets = [rungs[b:] for b in range(len(rungs))] or [[]]
        kept = [_kept(bracket, p.reduction_factor, epochs) for bracket in brackets]
        return sum(kept) / len(kept)
    if p.type == "median":
        return (min(decision_epochs(spec), default=epochs) + epochs) / 2
    return float(epochs)


def _kept(rungs: list[int], factor: int, epochs: int) -> float:
    """Epochs a trial trains on average where 1 in `factor` goes on past each rung."""
    total, since, alive = 0.0, 0, 1.0
    for rung in [*rungs, epochs]:
        total += alive * (rung - since)
        since, alive = rung, alive / factor
    return total
