"""`tuner study status`: counts, the best trials and the parent run, read with a few queries
on Optuna's tables (`_tables`), importing neither Optuna nor the tracking side: a status at
1,000 trials takes about as long as starting Python with SQLAlchemy and pydantic."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuner._tables import Ranked, completed_attrs, overview, study_attr
from tuner.errors import TunerError
from tuner.records import (
    COUNTED,
    DIVERGED,
    ENSEMBLE_PREFIX,
    LEGACY_REFIT_SUFFIX,
    PARENT_ATTR,
    REASON_ATTR,
    REFIT_EPOCHS_ATTR,
    REFIT_OF_ATTR,
    REFIT_SUFFIX,
    REFITS_OF_ATTR,
    Outcome,
)
from tuner.spec import StudySpec
from tuner.store_errors import patiently, shown
from tuner.stores import Stores, engine_options, sqlite_file, store_error, unusable_storage


@dataclass(frozen=True)
class RefitDone:
    of: int  # the search trial it retrains
    epochs: int
    train_loss: float


@dataclass(frozen=True)
class Status:
    counts: dict[Outcome, int]
    top: tuple[Ranked, ...]  # best first
    parent_run_id: str | None
    refits: tuple[RefitDone, ...] = ()  # completed, by search trial
    ensembles: tuple[dict, ...] = ()  # what `tuner ensemble` recorded of each, oldest first
    family: str = "vgg"  # the study's model family, to read its points by
    builder: str | None = None  # a builder's `package.module:function`
    data: str = "cifar10"  # the data set, or a loader's `package.module:function`

    @property
    def best(self) -> Ranked | None:
        return self.top[0] if self.top else None


def study_status(spec: StudySpec, stores: Stores, top: int = 5) -> Status:
    """Counts, the top trials and the parent run, read in a few queries (not the study's every
    trial: a second at 1,000 trials)."""
    import sqlalchemy

    url = stores.optuna_url
    path = sqlite_file(url)
    found, refits = None, []
    if path is None or path.exists():  # reading a SQLite file that is not there would make it
        engine = sqlalchemy.create_engine(url, **engine_options(url))
        try:
            found = patiently(
                lambda: overview(engine, spec.name, top, REASON_ATTR, DIVERGED),
                f"the Optuna storage {shown(url)}",
            )
            refits = patiently(
                lambda: _refits(engine, spec.name), f"the Optuna storage {shown(url)}"
            )
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) as exc:
            # SQLite's words and PostgreSQL's for a database with no Optuna tables yet (not
            # for a database that does not exist: `database "x" does not exist`)
            text = str(exc)
            if "no such table" not in text and not re.search(r"relation .* does not exist", text):
                if store_error(exc, stores) is not None:
                    raise  # locked, full, read-only: the command's one line says which
                raise unusable_storage(url, exc, "read") from None
        finally:
            engine.dispose()
    if found is None:
        raise TunerError(f"no study {spec.name!r} in {shown(url)}; run `tuner study create` first")
    tally = dict.fromkeys(COUNTED, 0)
    for state, n in found.states.items():
        diverged = found.tagged.get(state, 0)
        tally[Outcome.of_state(state)] += n - diverged
        tally[Outcome.DIVERGED] += diverged
    done = tuple(
        RefitDone(int(attrs[REFIT_OF_ATTR]), int(attrs.get(REFIT_EPOCHS_ATTR, 0)), value)
        for _, value, attrs in refits
        if REFIT_OF_ATTR in attrs
    )
    ensembles = tuple(
        v for k, v in sorted(found.user_attrs.items()) if k.startswith(ENSEMBLE_PREFIX)
    )
    return Status(tally, found.top, found.user_attrs.get(PARENT_ATTR),
                  tuple(sorted(done, key=lambda r: r.of)), ensembles, spec.family,
                  spec.builder, spec.data.name)  # fmt: skip


REFIT_KEYS = (REFIT_OF_ATTR, REFIT_EPOCHS_ATTR)


def _refits(engine: object, name: str) -> list:
    """The completed refits of study `name`: of `NAME:refit`, else of the refit study an
    earlier tuner named `NAME.refit` (`refit.adopt_legacy` renames it at the next refit)."""
    found = completed_attrs(engine, name + REFIT_SUFFIX, REFIT_KEYS)
    legacy = name + LEGACY_REFIT_SUFFIX
    if not found and study_attr(engine, legacy, REFITS_OF_ATTR) == name:
        found = completed_attrs(engine, legacy, REFIT_KEYS)
    return found
