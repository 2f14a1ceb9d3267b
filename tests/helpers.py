"""What the tests do as a user would: run `tuner` (as a process, or in this one), wait for what
it prints, and read the stores it wrote. Waits are on conditions, with generous bounds."""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest

from tuner.cli import main

HIDDEN = ("MLFLOW_TRACKING_URI", "TUNER_STORAGE", "TUNER_MLRUNS")  # the defaults under test


def environment(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HIDDEN}
    env["TUNER_DATA_DIR"] = str(data)
    return env


def start(
    cwd: Path,
    data: Path,
    *args: str,
    python: list[str] | None = None,
    group: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`tuner ARGS` as a process in `cwd`, its output piped; `group`: in a process group of
    its own (as a terminal starts it), for signals to the whole group; `env`: more variables."""
    command = [*(python or [sys.executable, "-m", "tuner"]), *args]
    return subprocess.Popen(
        command, cwd=cwd, env={**environment(data), **(env or {})}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=group,
    )  # fmt: skip


def workers_of(pid: int) -> list[int]:
    """The worker processes (multiprocessing spawn children) of process `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Process `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def tuner(cwd: Path, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tuner ARGS` as a process, to its end (at most 5 minutes)."""
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args], cwd=cwd, env=environment(data),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@contextlib.contextmanager
def pristine_signals() -> Iterator[None]:
    """pytest's own signal handlers and a clean `interrupts` state after the block (`tuner`
    installs its handlers for every command)."""
    from tuner import interrupts

    kinds = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGHUP)
    saved = {s: signal.getsignal(s) for s in kinds}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        interrupts._pending.clear()
        interrupts._deferring = interrupts._shielded = 0
        interrupts._stopping = False


def in_process(cwd: Path, data: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """`tuner ARGS` in this process (no interpreter start-up): its exit code."""
    monkeypatch.chdir(cwd)
    for key in HIDDEN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TUNER_DATA_DIR", str(data))
    with pristine_signals(), pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def quick(
    cwd: Path,
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
) -> subprocess.CompletedProcess[str]:
    """`tuner ARGS` in this process, reported as `tuner` would have: for the commands that
    end at once (a refusal, a `create`), without an interpreter's start-up for each."""
    capsys.readouterr()
    code = in_process(cwd, data, monkeypatch, *args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def wait_for_line(process: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    """Read the process's output until a line matches; the lines read so far."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    process.kill()
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(lines)}{process.stderr.read()}")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


def ui_answers(port: int) -> bool:
    """The MLflow UI on loopback `port` answers its /health."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
            return True
    except OSError:
        return False


def stored(cwd: Path, name: str) -> optuna.Study:
    """The study as Optuna stored it under `cwd/mlruns`."""
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/mlruns/optuna.db")


def mlflow_runs(cwd: Path, experiment: str) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def role(run: mlflow.entities.Run) -> str:
    return run.data.tags.get("tuner.role", "")


def trial_runs(cwd: Path, name: str) -> dict[int, mlflow.entities.Run]:
    """MLflow trial runs by Optuna trial number (each number must appear once)."""
    found = [r for r in mlflow_runs(cwd, name) if role(r) == "trial"]
    numbers = [int(r.data.tags["optuna.trial_number"]) for r in found]
    assert len(numbers) == len(set(numbers)), f"a trial has two runs: {sorted(numbers)}"
    return dict(zip(numbers, found, strict=True))


def no_leftovers(cwd: Path, name: str) -> None:
    """After a fault: no trial and no MLflow run left RUNNING, no half-written file."""
    assert not [t.number for t in stored(cwd, name).trials if t.state.name == "RUNNING"]
    left = [(role(r), r.info.status) for r in mlflow_runs(cwd, name) if r.info.status == "RUNNING"]
    assert not left, f"runs left RUNNING: {left}"
    assert not list((cwd / "mlruns").rglob("*.partial-*")), "a half-written file"


class Payload:
    """A pickle that runs `touch MARKER` when loaded: what a tampered weights file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def worker_pid(trial: optuna.trial.FrozenTrial) -> int:
    """The pid of the worker a trial names (`host:pid:start`)."""
    return int(trial.user_attrs["worker"].split(":")[1])


def idx_bytes(
    values: np.ndarray, magic: int | None = None, dims: tuple[int, ...] | None = None
) -> bytes:
    """An IDX file of uint8 `values`: its magic number (0x0803 for N×28×28) and dimensions
    from the array unless given (a test's lie), then the values."""
    dims = values.shape if dims is None else dims
    magic = 0x0800 | values.ndim if magic is None else magic
    return struct.pack(f">I{len(dims)}I", magic, *dims) + values.astype(np.uint8).tobytes()


def write_idx(path: Path, raw: bytes, gz: bool) -> Path:
    """`raw` at `path`, or gzipped at `path.gz`: the path written."""
    if gz:
        path = path.with_name(f"{path.name}.gz")
        raw = gzip.compress(raw, compresslevel=1)
    path.write_bytes(raw)
    return path


def write_fashion_mnist(
    folder: Path, n_train: int = 200, n_test: int = 60, gz: bool = True, classes: int = 10
) -> Path:
    """Fashion-MNIST's four IDX files in `folder`, `classes` classes all present in each split,
    images whose brightness depends on the class: the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % classes
        noise = rng.normal(0, 30, size=(n, 28, 28))
        images = np.clip(20 + labels[:, None, None] * 20 + noise, 0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return folder


CIFAR100_FOLDER = "cifar-100-python"


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 200, meta: bool = True) -> Path:
    """The `cifar-100-python` layout (`train`, `test`, `meta`) under `root`, every one of the
    100 fine classes in each file: `root`."""
    folder = root / CIFAR100_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        batch = {
            b"filenames": [f"{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    if meta:
        names = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                 b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}  # fmt: skip
        with (folder / "meta").open("wb") as f:
            pickle.dump(names, f, protocol=2)
    return root


def offline(*args: object, **kwargs: object) -> None:
    """A downloader on a machine without a network (as torchvision's raise there)."""
    raise OSError("Temporary failure in name resolution")
