"""A user's own code, named in a study file as `package.module:function` (a model builder, a data
loader): imported the way `python -m` would find it (the current folder first), and every
failure to find it is one line naming it."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from tuner.errors import ConfigError


def load(target: str, what: str) -> Callable[..., Any]:
    """The function `target` names (`package.module:function`); `what` names it in messages
    (`model.builder`)."""
    module_name, _, attr = target.partition(":")
    here = os.getcwd()
    if here not in sys.path:  # a console script's path lacks it; `python -m` puts it first
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or what the module raised while it ran
        raise ConfigError(
            f"{what} {target!r}: cannot import {module_name} "
            f"({type(exc).__name__}: {exc}); it is looked for in {here} and on sys.path"
        ) from None
    found = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ConfigError(f"{what} {target!r}: {module_name} has no {attr!r}")
    if not callable(found):
        raise ConfigError(f"{what} {target!r}: {attr} is a {type(found).__name__}, not a function")
    return found
