"""Sum a study up: trials by outcome, the best and the top trials, what one `study run` did,
and the parent run's counts and pictures."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.records import (
    COUNTED,
    REASON_ATTR,
    RUN_ID_ATTR,
    SESSION_ATTR,
    WORKER_DIED,
    Outcome,
    retry_origin,
)

if TYPE_CHECKING:
    from tuner.tracking import Tracker

log = logging.getLogger(__name__)


def counts(trials: Iterable[FrozenTrial]) -> dict[Outcome, int]:
    """Trials by outcome, every counted outcome present (0 when none)."""
    tally = Counter(Outcome.of(t) for t in trials)
    return {outcome: tally.get(outcome, 0) for outcome in COUNTED}


def ranked(
    trials: Iterable[FrozenTrial], k: int | None = None, *, with_run: bool = False
) -> list[FrozenTrial]:
    """Completed trials, best first; a tie goes to the earlier trial. `with_run`: only those
    whose MLflow run is known (a trial whose worker died before it had one is skipped)."""
    complete = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and (not with_run or RUN_ID_ATTR in t.user_attrs)
    ]
    return sorted(complete, key=lambda t: (-t.value, t.number))[:k]


@dataclass(frozen=True)
class Failure:
    number: int
    outcome: Outcome  # diverged or failed
    reason: str


@dataclass(frozen=True)
class RunSummary:
    """What one `tuner study run` did."""

    ran: dict[Outcome, int]  # this run's trials by outcome (only outcomes it had)
    seconds: float
    best: FrozenTrial | None  # of the whole study
    failures: tuple[Failure, ...]
    workers: tuple[str, ...] = ()  # how each worker process ended (several workers)
    retried: dict[int, int] = field(default_factory=dict)  # lost trial → the trial retrying it
    completed: int = 0  # completed trials in the whole study (what an ensemble can take)

    @property
    def nothing_finished(self) -> bool:
        """It ran trials, and every one failed or diverged."""
        return bool(self.ran) and not {Outcome.COMPLETE, Outcome.PRUNED} & set(self.ran)


def summarize(
    study: optuna.Study, session: str, seconds: float, workers: Iterable[str] = ()
) -> RunSummary:
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if t.user_attrs.get(SESSION_ATTR) == session]
    mine = [t for t in mine if t.state != TrialState.WAITING]
    retried = {}
    for t in mine:
        origin = retry_origin(t.user_attrs, t.system_attrs)
        if origin is not None:
            retried[origin] = t.number
    outcomes = {t.number: Outcome.of(t) for t in mine}
    failures = tuple(
        Failure(t.number, outcomes[t.number], t.user_attrs.get(REASON_ATTR, WORKER_DIED))
        for t in mine
        if outcomes[t.number] in (Outcome.FAILED, Outcome.DIVERGED)
    )
    best = ranked(trials, 1)
    return RunSummary(
        ran=dict(Counter(outcomes.values())),
        seconds=seconds,
        best=best[0] if best else None,
        failures=failures,
        workers=tuple(workers),
        retried=retried,
        completed=sum(t.state == TrialState.COMPLETE for t in trials),
    )


def update_parent(study: optuna.Study, tracker: Tracker, parent_run_id: str) -> None:
    """Trial counts and the best value so far (the pictures: `pictures.paint`)."""
    trials = study.get_trials(deepcopy=False)
    best = ranked(trials, 1)
    tracker.summarize_parent(parent_run_id, counts(trials), best[0] if best else None)
