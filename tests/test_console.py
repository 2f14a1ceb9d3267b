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
