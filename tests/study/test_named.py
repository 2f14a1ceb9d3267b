"""A study is found however it was created: by name, or by the path of its file."""

from __future__ import annotations

import pytest
import yaml

from tuner.errors import SpecError
from tuner.study.named import load
from tuner.study.setup import create

from ..conftest import TINY_STUDY


def test_a_study_created_from_a_path_is_found_by_its_name(stores, tmp_path, monkeypatch) -> None:
    """Seen: `study create path/to/my.yaml` said `next: tuner study run my-study`, which then
    looked for studies/my-study.yaml and failed."""
    monkeypatch.chdir(tmp_path)  # no studies/ folder here
    path = tmp_path / "elsewhere" / "mine.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({**TINY_STUDY, "name": "my-study"}))
    from_path = load(str(path), stores)
    create(from_path, stores)
    by_name = load("my-study", stores)
    assert by_name.to_dict() == from_path.to_dict()


def test_a_name_neither_filed_nor_stored_is_the_files_error(stores, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"studies/nowhere\.yaml: no such study file"):
        load("nowhere", stores)
