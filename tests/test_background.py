"""Writes handed to another thread: in order, in batches, nothing lost, errors raised once."""

from __future__ import annotations

import threading

import pytest

from tuner.background import Drain


def test_items_are_written_in_order_in_batches_and_flush_waits_for_all() -> None:
    gate, written, batches = threading.Event(), [], []

    def write(items: list) -> None:
        gate.wait(timeout=60)  # the first batch waits while more items arrive
        batches.append(len(items))
        written.extend(items)

    drain = Drain(write, "test-drain")
    for item in range(50):
        drain.put(item)
    gate.set()
    drain.flush(timeout=60)
    assert written == list(range(50))
    assert len(batches) < 50, "items that arrived together went in one call"


def test_an_error_is_raised_once_by_the_caller_and_later_items_are_still_written() -> None:
    written = []

    def write(items: list) -> None:
        if "bad" in items:
            raise OSError("the store is gone")
        written.extend(items)

    drain = Drain(write, "test-drain")
    drain.put("bad")
    with pytest.raises(OSError, match="the store is gone"):
        drain.flush(timeout=60)
    drain.check()  # raised once
    drain.put("good")
    drain.flush(timeout=60)
    assert written == ["good"]


def test_flush_gives_up_after_its_timeout() -> None:
    release = threading.Event()
    drain = Drain(lambda items: release.wait(timeout=60), "test-drain")
    drain.put(1)
    with pytest.raises(TimeoutError, match="still writing"):
        drain.flush(timeout=0.05)
    release.set()
    drain.flush(timeout=60)
