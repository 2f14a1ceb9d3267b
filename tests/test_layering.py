"""Imports point one way, from the top of the package down (see docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tuner

PACKAGE = Path(tuner.__file__).parent

# Each module's layer: a module imports only modules of lower layers.
LAYERS: list[set[str]] = [
    {"tuner", "errors", "records", "console", "interrupts", "background", "_tables"},
    {"spec", "store_errors", "devices", "_arrays", "_fashion"},
    {"_optuna", "retries"},
    {"stores"},
    {"plugins"},
    {"space", "models.vgg", "data", "pruning", "ensemble.selection"},
    {"models.googlenet"},  # takes VGG's Dropout, width rounding and initialisation
    {"models"},
    {"train"},
    {"tracking.client"},
    {"tracking.artifacts", "tracking.provenance"},
    {"tracking.runs"},
    {"tracking"},
    {"objective"},
    {"study", "study.setup", "study.pictures", "study.named", "study.cost"},
    {"study.summary", "study.recovery", "study.status"},
    {"study.refit"},
    {"study.page"},
    {"study.worker"},
    {"study.pool"},
    {"study.session"},
    {"ensemble.evaluate", "ui", "bench.overhead"},
    {"ensemble"},
    {"bench", "bench.epochs", "bench.ensembles"},
    {"report"},
    {"quickstart"},
    {"cli.options"},
    {"cli"},
    {"__main__"},
]
FORBIDDEN = {  # lower, but still not theirs to use
    "tracking": {"train", "objective"},  # the tracker knows runs, not training
    "cli": {"models", "space", "data", "train", "tracking", "objective"},  # cli only parses
    "ensemble": {"study.session", "study.worker", "study.pool", "objective"},
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "tuner"


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The tuner modules `name` imports anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuner"):
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            short = target.removeprefix("tuner.") if target != "tuner" else "tuner"
            if short in MODULES and short != name:
                found.add(short)
                break
    return found


def layer(name: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if name in names)


def test_every_module_has_a_layer() -> None:
    assert set(MODULES) == set().union(*LAYERS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name: str) -> None:
    upward = {dep for dep in imports(name) if layer(dep) >= layer(name)}
    assert not upward, f"{name} imports {sorted(upward)}, at its layer or above"
    banned = {dep for dep in imports(name)
              if any(dep == b or dep.startswith(f"{b}.") for b in FORBIDDEN.get(
                  name.split(".")[0], ()))}  # fmt: skip
    assert not banned, f"{name} imports {sorted(banned)}"


@pytest.mark.slow
def test_study_status_loads_neither_torch_nor_mlflow() -> None:
    """`tuner study status` answers within a second: the path it imports stays light (not
    even Optuna: its tables are read as plain tables)."""
    code = (
        "import sys, tuner.cli, tuner.study.status, tuner.report, tuner.space; "
        "print(sorted(m for m in ('torch', 'mlflow', 'sklearn', 'optuna', 'numpy') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.slow
def test_study_create_ui_and_report_load_no_torch() -> None:
    """Commands that only touch the stores start in half the time without torch's 2 s."""
    code = (
        "import sys, tuner.cli, tuner.study.setup, tuner.tracking, tuner.ui, tuner.study.page; "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
