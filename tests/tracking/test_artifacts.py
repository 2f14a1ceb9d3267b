from __future__ import annotations

from pathlib import Path

import pytest

from tuner.errors import DataError
from tuner.tracking import Tracker
from tuner.tracking.artifacts import fetch_verified, log_file, sha256


@pytest.fixture(scope="module")
def run(tracker: Tracker) -> tuple[Tracker, str]:
    experiment = tracker.experiment_id("artifacts", create=True)
    return tracker, tracker.client.create_run(experiment).info.run_id


def test_a_file_lands_whole_under_its_name(run: tuple[Tracker, str], tmp_path: Path) -> None:
    tracker, run_id = run
    local = tmp_path / "w.pt"
    local.write_bytes(b"weights" * 1000)
    log_file(tracker.client, run_id, local, "model/w.pt")
    root = Path(tracker.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    assert (root / "model" / "w.pt").read_bytes() == local.read_bytes()
    assert not list(root.rglob("*.partial-*")), "the temporary name is gone"


def test_a_changed_file_is_refused_before_it_is_read(
    run: tuple[Tracker, str], tmp_path: Path
) -> None:
    tracker, run_id = run
    local = tmp_path / "v.pt"
    local.write_bytes(b"original")
    log_file(tracker.client, run_id, local, "model/v.pt")
    digest = sha256(local)
    fetched = fetch_verified(
        tracker.client, run_id, "model/v.pt", digest, "the weights of trial 0", tmp_path / "ok"
    )
    assert fetched.read_bytes() == b"original"
    with pytest.raises(DataError, match="model/v.pt: the weights of trial 0 .* do not match"):
        fetch_verified(
            tracker.client,
            run_id,
            "model/v.pt",
            "0" * 64,
            "the weights of trial 0",
            tmp_path / "bad",
        )
    with pytest.raises(DataError, match="the weights of trial 0 cannot be read"):
        fetch_verified(
            tracker.client,
            run_id,
            "model/none.pt",
            None,
            "the weights of trial 0",
            tmp_path / "none",
        )
