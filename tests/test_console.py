from __future__ import annotations

import logging

import pytest

from tuner import console


def test_progress_goes_to_stdout_as_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    console.show(prefix="[w1] ")
    console.show(prefix="[w1] ")  # twice: still one line per record
    logging.getLogger("tuner.study.worker").info("[trial 3] epoch 1/2")
    logging.getLogger("tuner").debug("not shown")
    logging.getLogger("optuna").warning("not tuner's")
    assert capsys.readouterr().out == "[w1] [trial 3] epoch 1/2\n"
    console.show()


def test_a_step_bar_shows_on_long_epochs_and_lines_print_whole_beside_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    console.show()
    monkeypatch.setattr(console, "BAR_DELAY", 0.0)  # every epoch is "long"
    bar = console.StepBar(steps=4, label="[trial 0]", enabled=True)
    bar.step()
    logging.getLogger("tuner.objective").info("[trial 1] start: vgg11-bn sgd")
    bar.step()
    bar.end_epoch()
    bar.step()  # the next epoch's bar
    bar.close()
    out = capsys.readouterr().out
    assert "[trial 0] epoch 1" in out and "[trial 0] epoch 2" in out
    assert "[trial 1] start: vgg11-bn sgd\n" in out, "the line is whole, not cut by the bar"
    assert console._bars == []


def test_no_bar_off_a_terminal_or_in_a_worker_of_a_pool(
    capsys: pytest.CaptureFixture[str],
) -> None:
    console.show(prefix="[w0] ")
    assert not console.bars_wanted()
    console.show()
    assert not console.bars_wanted(), "pytest's stdout is no terminal"
    bar = console.StepBar(steps=4, label="[trial 0]")
    for _ in range(4):
        bar.step()
    bar.close()
    assert capsys.readouterr().out == ""
