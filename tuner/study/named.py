"""A study is found however it was created: by its name (`studies/NAME.yaml`), by the path of
its file, or, where the name has no file under `studies/` (it was created from a file
elsewhere), by the study file it was created with, which its Optuna study keeps."""

from __future__ import annotations

import logging

from tuner import spec as spec_module
from tuner._tables import study_attr
from tuner.errors import SpecError
from tuner.records import SPEC_JSON_ATTR
from tuner.spec import StudySpec
from tuner.store_errors import patiently, shown
from tuner.stores import Stores, engine_options, sqlite_file

log = logging.getLogger(__name__)


def load(name_or_path: str, stores: Stores) -> StudySpec:
    """The study file `name_or_path`, else the one the stored study of that name was created
    with; the file's own error where neither is there."""
    try:
        return spec_module.load(name_or_path)
    except SpecError as exc:
        if "no such study file" not in str(exc) or "/" in name_or_path:
            raise
        raw = stored_file(name_or_path, stores)
        if raw is None:
            raise
    where = shown(stores.optuna_url)
    if not isinstance(raw, dict) or raw.get("name") != name_or_path:
        raise SpecError(
            f"study {name_or_path!r} in {where} keeps a damaged study file; name the study "
            "by the path of its file"
        )
    log.debug(f"study {name_or_path!r}: the study file it was created with, from {where}")
    return spec_module.parse(raw, source=f"study {name_or_path!r} in {where}")


def stored_file(name: str, stores: Stores, patient: bool = True) -> object | None:
    """The study file the stored study `name` was created with; None where there is none.
    `patient`: a locked or restarting store is waited for (`store_errors.patiently`)."""
    import sqlalchemy

    url = stores.optuna_url
    path = sqlite_file(url)
    if path is not None and not path.exists():  # reading it would make it
        return None
    engine = sqlalchemy.create_engine(url, **engine_options(url))
    try:
        read = lambda: study_attr(engine, name, SPEC_JSON_ATTR)  # noqa: E731
        raw = patiently(read, f"the Optuna storage {shown(url)}") if patient else read()
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) as exc:
        if "no such table" not in str(exc) and "does not exist" not in str(exc):
            raise  # SQLite's words and PostgreSQL's for a database with no Optuna tables yet
        return None
    finally:
        engine.dispose()
    return raw
