from __future__ import annotations

from pathlib import Path

import click
import pytest

from tuner.cli import main
from tuner.cli.options import parse_counts, parse_depths


def test_depths_are_checked_against_the_known_ones() -> None:
    assert parse_depths("vgg11, vgg19", "vgg16") == (("vgg11", "vgg19"), "vgg16")
    with pytest.raises(
        click.BadParameter, match=r"known depths: vgg11, vgg13, vgg16, vgg19; got \['vgg12'\]"
    ):
        parse_depths("vgg11,vgg12", "vgg16")
    with pytest.raises(click.BadParameter, match="got \\['resnet'\\]"):
        parse_depths("vgg11", "resnet")
    with pytest.raises(click.BadParameter, match="got ''"):
        parse_depths("", "vgg16")


@pytest.mark.parametrize(("text", "counts"), [("1,2,3", (1, 2, 3)), ("", ()), (" 2 ", (2,))])
def test_packed_counts(text: str, counts: tuple[int, ...]) -> None:
    assert parse_counts(text) == counts


@pytest.mark.parametrize("text", ["1,two", "0", "-1"])
def test_bad_packed_counts_are_named(text: str) -> None:
    with pytest.raises(click.BadParameter, match=f"got {text!r}"):
        parse_counts(text)


@pytest.mark.parametrize(
    "args",
    [
        ["study", "status", "s", "--watch", "inf"],
        ["study", "status", "s", "--watch", "nan"],
        ["study", "run", "s", "--timeout", "inf"],
        ["study", "run", "s", "--timeout", "nan"],
        ["study", "run", "s", "--max-hours", "1e400"],
        ["study", "run", "s", "--device", "meta"],
        ["study", "run", "s", "--device", "cuda:7"],
        ["refit", "s", "--timeout", "1e12"],
        ["refit", "s", "--epochs", "9999999999999"],
        ["study", "run", "s", "--trials", "2000000"],
        ["study", "run", "s", "--jobs", "5000"],
        ["study", "run", "s", "--device", "cpu:3"],
    ],
    ids=lambda args: " ".join(args[3:]),
)
def test_options_accept_only_what_works(
    tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Refused with one line and exit 2 before any store is touched: an infinite sleep or
    timeout would fail (or hang) later, a device torch has no kernels for would fail a trial."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert args[-2] in err and "Traceback" not in err, err
    assert not (tmp_path / "mlruns").exists()


def test_bench_measures_googlenets_by_their_stage_counts() -> None:
    assert parse_depths(None, None, "googlenet") == (
        ("googlenet-1s", "googlenet-2s", "googlenet-3s"), "googlenet-3s")  # fmt: skip
    assert parse_depths("1, googlenet-3s", "2", "googlenet") == (
        ("googlenet-1s", "googlenet-3s"), "googlenet-2s")  # fmt: skip
    with pytest.raises(click.BadParameter, match="stage counts: 1, 2, 3; got \\['4'\\]"):
        parse_depths("4", None, "googlenet")
    assert parse_depths(None, None) == (("vgg11", "vgg13", "vgg16", "vgg19"), "vgg16")
