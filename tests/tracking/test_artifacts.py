from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tuner.errors import DataError
from tuner.tracking import Tracker
from tuner.tracking.artifacts import PARALLEL_BYTES, fetch_verified, sha256, write_artifact


@pytest.fixture(scope="module")
def run(tracker: Tracker) -> tuple[Tracker, str, str]:
    experiment = tracker.experiment_id("artifacts", create=True)
    info = tracker.client.create_run(experiment).info
    return tracker, info.run_id, info.artifact_uri


def _root(artifact_uri: str) -> Path:
    return Path(artifact_uri.removeprefix("file://"))


def test_a_file_lands_whole_under_its_name_with_the_hash_of_its_bytes(run) -> None:
    tracker, run_id, uri = run
    payload = b"w" * (3 * PARALLEL_BYTES + 17)  # large writes are hashed in the other thread
    digest = write_artifact(tracker.client, run_id, uri, "model/w.bin", lambda f: f.write(payload))
    written = _root(uri) / "model" / "w.bin"
    assert written.read_bytes() == payload
    assert digest == hashlib.sha256(payload).hexdigest() == sha256(written)
    assert not list(_root(uri).rglob("*.partial-*")), "the temporary name is gone"


def test_weights_and_predictions_are_hashed_as_written(run) -> None:
    tracker, run_id, uri = run
    state = {"w": torch.randn(600, 1000), "b": torch.arange(10)}  # 2.4 MB: several chunks
    digest = write_artifact(
        tracker.client, run_id, uri, "model/s.pt", lambda f: torch.save(state, f)
    )
    path = _root(uri) / "model" / "s.pt"
    assert digest == sha256(path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    probs = np.random.default_rng(0).random((50, 10), dtype=np.float32)
    digest = write_artifact(tracker.client, run_id, uri, "p/v.npz",
                            lambda f: np.savez_compressed(f, probs=probs))  # fmt: skip
    assert digest == sha256(_root(uri) / "p" / "v.npz")
    assert np.array_equal(np.load(_root(uri) / "p" / "v.npz")["probs"], probs)


def test_a_failed_write_leaves_no_file(run) -> None:
    tracker, run_id, uri = run

    def half(f) -> None:
        f.write(b"x" * 100)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_artifact(tracker.client, run_id, uri, "model/half.pt", half)
    assert not (_root(uri) / "model" / "half.pt").exists()
    assert not list(_root(uri).rglob(".half.pt*")), "no partial file stays behind"


def test_a_changed_file_is_refused_before_it_is_read(run, tmp_path: Path) -> None:
    tracker, run_id, uri = run
    digest = write_artifact(
        tracker.client, run_id, uri, "model/v.pt", lambda f: f.write(b"original")
    )
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
