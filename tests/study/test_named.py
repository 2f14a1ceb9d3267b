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


@pytest.mark.parametrize("kept", ["hello", {"name": "another"}])
def test_a_damaged_stored_study_file_is_one_error(stores, tmp_path, monkeypatch, kept) -> None:
    from tuner.study.setup import open_study

    monkeypatch.chdir(tmp_path)
    spec = load_dict({**TINY_STUDY, "name": f"damaged-{len(str(kept))}"})
    create(spec, stores)
    open_study(spec, stores).set_user_attr("spec", kept)
    with pytest.raises(SpecError, match="keeps a damaged study file"):
        load(spec.name, stores)


def load_dict(raw: dict):
    from tuner.spec import parse

    return parse(raw)
