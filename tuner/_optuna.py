"""What tuner needs from Optuna that its public API does not offer, in one place.

Optuna's public API ends a trial only from the process that asked for it (`study.tell`), shows
a running trial's system attributes only through a full reload of the study, and starts the
heartbeat thread only inside `study.optimize`. tuner's workers drive `ask`/`tell` themselves
(so that one place records a trial in Optuna, MLflow and on the console), and its supervisor
fails the trials of workers that died. Each private name used is here, with why.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import logging
import warnings
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tuner import _tables, background
from tuner.store_errors import patiently, shown

log = logging.getLogger(__name__)


def ask(study: optuna.Study) -> optuna.Trial:
    """`study.ask()`, without the warning that heartbeats are meant for `study.optimize`: the
    worker runs `heartbeat` around each trial itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


def take_as(study: optuna.Study, attrs: dict[str, Any]) -> None:
    """Each trial this process takes from now on (`ask`: a new one, or a queued one popped)
    carries `attrs` from the transaction that makes it RUNNING (`PatientStorage`)."""
    _backend(study).taker_attrs = dict(attrs)


def frozen(trial: optuna.Trial) -> FrozenTrial:
    """The stored record of a running trial, with its system attributes (`Trial` hides them;
    the public way, `study.get_trials()`, loads every trial of the study)."""
    return trial.storage.get_trial(trial._trial_id)


@contextlib.contextmanager
def heartbeat(trial: optuna.Trial, tag: str) -> Iterator[None]:
    """Record the trial's heartbeat every `heartbeat_interval` seconds while the block runs, as
    `study.optimize` does: a worker that dies stops it, and the trial is failed after `grace`.
    Unlike Optuna's thread, a store that fails a beat (locked, unreachable) does not end it:
    one line says so, and it beats again."""
    storage = trial.storage
    interval = storage.get_heartbeat_interval()
    if interval is None:
        yield
        return
    with background.repeating(
        lambda: storage.record_heartbeat(trial._trial_id),
        interval,
        "tuner-heartbeat",
        failed=lambda exc: (
            f"{tag} its heartbeat could not be recorded "
            f"({type(exc).__name__}); trying again every {interval} s"
        ),
        recovered=f"{tag} its heartbeat is recorded again",
        at_once=True,
    ):
        yield


def stored(trial: optuna.Trial) -> FrozenTrial:
    """The trial as the database holds it now (another process may have ended it): read past
    the study's cache (`_backend`), which knows only what this process wrote."""
    return _backend(trial.study).get_trial(trial._trial_id)


def stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The RUNNING trials silent for longer than the storage's grace period: those whose last
    heartbeat is older (the storage's private `_get_stale_trial_ids`, Optuna's own test), and
    those with no heartbeat at all that started longer ago (a worker that died between `ask`
    and its first beat: Optuna never fails these)."""
    storage = _backend(study)
    interval = storage.get_heartbeat_interval()
    if interval is None:
        return []
    grace = datetime.timedelta(seconds=grace_period(study))
    stale = set(storage._get_stale_trial_ids(study._study_id))
    tb = _tables.tables()
    trials, beats = tb["trials"], tb["heartbeats"]
    silent = (
        sqlalchemy.select(trials.c.trial_id)
        .outerjoin(beats, beats.c.trial_id == trials.c.trial_id)
        .where(trials.c.study_id == study._study_id, trials.c.state == "RUNNING")
        .where(beats.c.trial_id.is_(None))
    )

    def read() -> set[int]:
        with storage.engine.connect() as db:
            return set(db.scalars(silent).all())

    never = patiently(read, f"the Optuna storage {shown(storage.url)}")
    found = [storage.get_trial(i) for i in sorted(stale | never)]
    now = datetime.datetime.now()  # Optuna's datetime_start is the asking process's clock
    return [
        t
        for t in found
        if t.state == TrialState.RUNNING
        and (t._trial_id in stale or (t.datetime_start and now - t.datetime_start > grace))
    ]


def fail_from_outside(study: optuna.Study, trial: FrozenTrial, key: str, reason: str) -> bool:
    """Mark a RUNNING trial of another process FAIL, with user attribute `key` = `reason`;
    False when it had already ended. `study.tell` would do the state, but no public call sets
    an attribute on a trial this process did not ask for, and it must be set first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, key, reason)  # while it may still be set
        return storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def claim_user_attr(
    storage: optuna.storages.RDBStorage, study_id: int, key: str, value: str
) -> str:
    """Set a study's user attribute unless some process already has; the value stored.

    The first writer wins, atomically across machines: the row is inserted, and the table's
    own unique (study, key) constraint refuses the others. `set_study_user_attr` would
    overwrite, and ignores the conflict of two inserts at once; the table
    (`models.StudyUserAttributeModel`, private) is written directly."""
    from optuna.storages._rdb import models

    table = models.StudyUserAttributeModel.__table__
    row = {"study_id": study_id, "key": key, "value_json": json.dumps(value)}
    try:
        with storage.engine.begin() as connection:
            connection.execute(table.insert().values(**row))
    except sqlalchemy.exc.IntegrityError:
        pass  # another process got there first
    return storage.get_study_user_attrs(study_id)[key]


# the most values a statement binds on any database tuner opens: SQLite's limit before 3.32
# (32,766 since, by default; 65,535 in PostgreSQL's protocol)
BOUND_IDS = 999


def read_trials(
    storage: optuna.storages.RDBStorage,
    study_id: int,
    states: Container[TrialState] | None,
    included_trial_ids: set[int],
    trial_id_greater_than: int,
) -> list[FrozenTrial]:
    """`RDBStorage._get_trials` (private: what the study's cache reads through, the first time
    every trial, then those unfinished and new), the same trials from six plain queries.
    Optuna's ORM builds some sixty objects per trial before each `FrozenTrial` (a second and
    more for 1,000 trials, before a worker's first trial; a tenth of that on every ask after);
    here rows become trials directly, each distribution parsed once. A test compares the
    two on every kind of trial."""
    from optuna.distributions import json_to_distribution
    from optuna.storages._rdb import models

    included = {i for i in included_trial_ids if i <= trial_id_greater_than}
    # more ids than one statement binds are read as the range from the first on, and filtered
    # here (Optuna, refused the list, filters the study's every trial)
    listed = len(included) <= BOUND_IDS
    trials = models.TrialModel.__table__
    where = [trials.c.study_id == study_id]
    if not listed:
        where.append(trials.c.trial_id >= min(included))  # the newer trials follow them
    elif included and trial_id_greater_than > -1:
        where.append(sqlalchemy.or_(trials.c.trial_id.in_(included),
                                    trials.c.trial_id > trial_id_greater_than))  # fmt: skip
    elif trial_id_greater_than > -1:
        where.append(trials.c.trial_id > trial_id_greater_than)
    # the other tables' rows of those trials, whatever their state by then (a trial that
    # ends between two queries keeps its rows; rows of trials not read are left)
    chosen = sqlalchemy.select(trials.c.trial_id).where(*where).scalar_subquery()
    if states is not None:
        where.append(trials.c.state.in_(list(states)))  # type: ignore[call-overload]

    def rows(model: Any, *columns: str) -> list[Any]:
        table = model.__table__
        query = sqlalchemy.select(table.c.trial_id, *(table.c[c] for c in columns))
        return db.execute(query.where(table.c.trial_id.in_(chosen)).order_by(*table.primary_key))

    with storage.engine.connect() as db:
        studies = models.StudyModel.__table__
        study = sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == study_id)
        if db.scalar(study) is None:
            raise KeyError(f"No study with study_id {study_id} exists.")  # as Optuna's
        found = db.execute(
            sqlalchemy.select(trials.c.trial_id, trials.c.number, trials.c.state,
                              trials.c.datetime_start, trials.c.datetime_complete)
            .where(*where).order_by(trials.c.trial_id)
        ).all()  # fmt: skip
        if not listed:
            found = [t for t in found
                     if t.trial_id in included or t.trial_id > trial_id_greater_than]  # fmt: skip
        built = {
            trial_id: FrozenTrial(number=number, state=state, value=None, values=None,
                                  datetime_start=start, datetime_complete=complete, params={},
                                  distributions={}, user_attrs={}, system_attrs={},
                                  intermediate_values={}, trial_id=trial_id)
            for trial_id, number, state, start, complete in found
        }  # fmt: skip
        parsed: dict[str, Any] = {}
        params = rows(models.TrialParamModel, "param_name", "param_value", "distribution_json")
        for trial_id, name, internal, text in params:
            trial = built.get(trial_id)
            if trial is None:
                continue  # a trial begun after the first query: read next time
            distribution = parsed.get(text) or parsed.setdefault(text, json_to_distribution(text))
            trial._params[name] = distribution.to_external_repr(internal)
            trial._distributions[name] = distribution
        stored = models.TrialValueModel.stored_repr_to_value
        values: dict[int, dict[int, float]] = {}
        for trial_id, objective, value, kind in rows(
            models.TrialValueModel, "objective", "value", "value_type"
        ):
            values.setdefault(trial_id, {})[objective] = stored(value, kind)
        for trial_id, by_objective in values.items():
            if trial_id in built:
                built[trial_id]._values = [by_objective[k] for k in sorted(by_objective)]
        stored = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value
        for trial_id, step, value, kind in rows(
            models.TrialIntermediateValueModel,
            "step",
            "intermediate_value",
            "intermediate_value_type",
        ):
            if trial_id in built:
                built[trial_id].intermediate_values[step] = stored(value, kind)
        for model, field in ((models.TrialUserAttributeModel, "_user_attrs"),
                             (models.TrialSystemAttributeModel, "_system_attrs")):  # fmt: skip
            for trial_id, key, value_json in rows(model, "key", "value_json"):
                if trial_id in built:
                    getattr(built[trial_id], field)[key] = json.loads(value_json)
    return list(built.values())


def _backend(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The RDB storage under the study's cache (`_CachedStorage._backend`, private): it reads
    what it is asked in SQL, where the cache first loads every trial."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def trials_in(study: optuna.Study, states: tuple[TrialState, ...]) -> list[FrozenTrial]:
    """The study's trials in `states`, selected by the database. `study.get_trials(states=…)`
    first loads every trial into the study's cache (a second at 1,000 trials), which the
    supervisor of a `study run`, looking for running trials every heartbeat, never needs;
    the RDB storage under the cache filters in SQL."""
    return _backend(study).get_all_trials(study._study_id, deepcopy=False, states=states)


def best_trials(study: optuna.Study, k: int, having: str) -> list[FrozenTrial]:
    """A study's `k` best completed trials that have the user attribute `having`, best first
    as Optuna ranks them (a tie: the earlier), read alone: the ids by one query on Optuna's
    tables, then each trial (`get_trial`), instead of every trial of the study."""
    tb = _tables.tables()
    trials, values, attrs = tb["trials"], tb["values"], tb["trial_attrs"]
    query = (
        sqlalchemy.select(trials.c.trial_id)
        .join(values, values.c.trial_id == trials.c.trial_id)
        .join(attrs, attrs.c.trial_id == trials.c.trial_id)
        .where(trials.c.study_id == study._study_id)
        .where(trials.c.state == "COMPLETE")
        .where(values.c.objective == 0, attrs.c.key == having)
        .order_by(*_tables.best_first(values, trials, study.direction == StudyDirection.MAXIMIZE))
        .limit(k)
    )
    with _backend(study).engine.connect() as db:
        ids = db.scalars(query).all()
    return [study._storage.get_trial(trial_id) for trial_id in ids]


def trial_numbered(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial `number` as the database holds it now."""
    storage = _backend(study)
    return storage.get_trial(
        storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    )


def grace_period(study: optuna.Study) -> float:
    """Seconds of silence after which the storage takes a trial's worker for dead."""
    storage = _backend(study)
    interval = storage.get_heartbeat_interval() or 0
    return storage.grace_period or 2 * interval


def trial_states(study: optuna.Study) -> dict[int, TrialState]:
    """Every trial's number and state, in one query on the trials table (no trial is built):
    a snapshot to check MLflow runs against."""
    trials = _tables.tables()["trials"]
    query = sqlalchemy.select(trials.c.number, trials.c.state).where(
        trials.c.study_id == study._study_id
    )
    with _backend(study).engine.connect() as db:
        return {number: TrialState[state] for number, state in db.execute(query).all()}


# -- the storage every tuner process uses -------------------------------------------------------


class PatientStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, whose calls wait out a locked SQLite file (`patiently`) instead
    of failing the trial after the driver's timeout.

    `taker_attrs`: user attributes written on each trial this process takes, a new one `ask`
    makes or a queued one it pops, in the transaction that makes it RUNNING: a worker's mark
    (`records.WORKER_ATTR`) is on every trial it runs from the first moment, so that its
    supervisor finds the trial by it, whenever the worker dies. Optuna writes them in a
    second transaction after `ask`, and a worker killed between the two left a RUNNING trial
    nobody could name until its heartbeat went stale."""

    taker_attrs: dict[str, Any] = {}  # noqa: RUF012 (replaced whole, never changed in place)

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        """What the study's cache (`_CachedStorage`) reads through: the same trials as
        Optuna's, read without its ORM (`read_trials`), patiently."""
        return patiently(
            lambda: read_trials(self, study_id, states, included_trial_ids, trial_id_greater_than),
            f"the Optuna storage {shown(self.url)}",
        )

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        """What `ask`, `enqueue_trial` and `add_trial` write through: Optuna's, one try at a
        time, patiently. Optuna's own tries five times, each try waiting out the driver's
        timeout on a locked file: a minute in all, silent, whatever the store wait."""
        return patiently(
            lambda: _new_trial(self, study_id, template_trial),
            f"the Optuna storage {shown(self.url)}",
        )

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        """Optuna's, patiently; popping a queued trial (WAITING → RUNNING) also writes
        `taker_attrs` in the same transaction."""

        def once() -> bool:
            if state == TrialState.RUNNING and self.taker_attrs:
                return _take(self, trial_id)
            return optuna.storages.RDBStorage.set_trial_state_values(self, trial_id, state, values)

        return patiently(once, f"the Optuna storage {shown(self.url)}")


def _new_trial(
    storage: PatientStorage, study_id: int, template: FrozenTrial | None
) -> FrozenTrial:
    """One try of `RDBStorage._create_new_trial`: its statements (the private
    `_get_prepared_new_trial`, in Optuna's private session), and the trial it gives back."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        # the study's row locked: one process at a time numbers a new trial
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        made = storage._get_prepared_new_trial(study_id, template, session)
        if template is None:  # `ask`'s new RUNNING trial: the taker's mark with it
            attrs = dict(storage.taker_attrs)
            _mark(storage, session, made.trial_id, attrs)
            return FrozenTrial(number=made.number, state=made.state, value=None, values=None,
                               datetime_start=made.datetime_start, datetime_complete=None,
                               params={}, distributions={}, user_attrs=attrs, system_attrs={},
                               intermediate_values={}, trial_id=made.trial_id)  # fmt: skip
        frozen = copy.deepcopy(template)
        frozen.number, frozen.datetime_start = made.number, made.datetime_start
        frozen._trial_id = made.trial_id
        return frozen


def _take(storage: PatientStorage, trial_id: int) -> bool:
    """One try of popping queued trial `trial_id`: Optuna's `set_trial_state_values(RUNNING)`
    (False where another process took it first), with `taker_attrs` in its transaction."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    try:
        with _create_scoped_session(storage.scoped_session) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            storage.check_trial_is_updatable(trial_id, trial.state)
            if trial.state != TrialState.WAITING:
                return False
            trial.state = TrialState.RUNNING
            trial.datetime_start = datetime.datetime.now()
            _mark(storage, session, trial_id, storage.taker_attrs)
    except sqlalchemy.exc.IntegrityError:
        return False
    return True


def _mark(storage: optuna.storages.RDBStorage, session: Any, trial_id: int, attrs: dict) -> None:
    """Trial `trial_id`'s user attributes `attrs`, written in `session` (Optuna's private
    statement for one, `_set_trial_attr_without_commit`)."""
    from optuna.storages._rdb import models

    for key, value in attrs.items():
        storage._set_trial_attr_without_commit(
            session, models.TrialUserAttributeModel, trial_id, key, value
        )


def _patient(name: str) -> Callable[..., object]:
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def wrapper(self: PatientStorage, *args: object, **kwargs: object) -> object:
        return patiently(
            lambda: method(self, *args, **kwargs), f"the Optuna storage {shown(self.url)}"
        )

    return wrapper


# the study's cache calls the storage's private `_set_trial_param` (every `suggest_*`) and
# `_get_best_trial_id`: they wait out a lock as the public calls do (`_create_new_trial`, what
# `ask` calls, is PatientStorage's own)
for _name in (*optuna.storages.BaseStorage.__abstractmethods__, "record_heartbeat",
              "_get_stale_trial_ids", "get_trial_user_attrs", "get_trial_system_attrs",
              "get_best_trial", "get_n_trials", "_set_trial_param", "_get_best_trial_id",
              "get_trial_id_from_study_id_trial_number"):  # fmt: skip
    if hasattr(optuna.storages.RDBStorage, _name) and _name not in vars(PatientStorage):
        setattr(PatientStorage, _name, _patient(_name))
