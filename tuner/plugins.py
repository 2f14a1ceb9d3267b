"""A user's own code, named in a study file as `package.module:function` (a model builder, a data
loader): imported from sys.path and, where a console script's path lacks it, the current
folder (searched last), and every failure to find it is one line naming it."""

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
    if here not in sys.path and "" not in sys.path:
        # a console script's path lacks it (`python -m` puts it first): last, so that a
        # stray file in it (`grp.py`) never shadows a module of Python's or a package's
        sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # ImportError, or what the module raised as it ran
        why = " ".join(str(exc).split())
        raise ConfigError(
            f"{what} {target!r}: cannot import {module_name} "
            f"({type(exc).__name__}: {why}); it is looked for on sys.path, then in {here}"
        ) from None
    found = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ConfigError(f"{what} {target!r}: {module_name} has no {attr!r}")
    if not callable(found):
        kind = type(found).__name__
        raise ConfigError(f"{what} {target!r}: {attr} is not a function (it is of type {kind})")
    return found
