from __future__ import annotations

import click
import pytest

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
