"""Trials per hour of 1, 2, 4 … CPU nodes sharing one study through real servers (PostgreSQL
for Optuna, an `mlflow server` on PostgreSQL for runs and artifacts), in one run:

    python -m tests.bench_nodes --nodes 1,2,4 --trials 4

Each node is a `tuner study run` process in a folder of its own, with one CPU thread, on tiny
models and generated data (tests/conftest.py's tiny study: every trial a random start-up one,
no pruning). The clock runs from the nodes' start to the last one's exit: set-up on empty
stores included. Prints the table, with the ratio to one node and the most connections any
node process held to the Optuna database.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .conftest import write_fake_cifar, write_study
from .servers import servers


def run_nodes(n: int, trials: int, root: Path, data: Path, pg, tracking: str) -> tuple:
    storage = pg.create_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNER_", "MLFLOW_"))}
    env |= {"TUNER_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking,
            "TUNER_DATA_DIR": str(data), "OMP_NUM_THREADS": "1"}  # fmt: skip
    name = f"bench{n}"
    folders = []
    for i in range(n):
        cwd = root / f"{name}-node{i}"
        write_study(cwd, {"sampler": {"type": "random"}, "pruner": {"type": "none"}}, name)
        folders.append(cwd)
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.wait(0.2):
            counts = pg.connections(storage.rsplit("/", 1)[1])
            peak = max([peak, *(c for app, c in counts.items() if app.startswith("tuner"))])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "tuner", "study", "run", name, "--trials", str(trials)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for cwd in folders
    ]
    for node in nodes:
        out, _ = node.communicate()
        if node.returncode != 0:
            raise SystemExit(f"a node failed:\n{out}")
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    return n * trials, wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,4")
    parser.add_argument("--trials", type=int, default=4, help="per node")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tuner-bench-nodes-"))
    data = write_fake_cifar(root / "cifar")
    rows = []
    with servers(root) as (pg, mlflow):
        for n in [int(x) for x in args.nodes.split(",")]:
            rows.append((n, *run_nodes(n, args.trials, root, data, pg, mlflow.url)))
    base = rows[0][1] / rows[0][2]
    print(f"\n{os.cpu_count()} CPU cores; tiny VGGs (width 1/16, 120 images, 2 epochs)")
    print(f"{'nodes':>5} {'trials':>6} {'wall s':>8} {'trials/hour':>12} {'× 1 node':>9} "
          f"{'conns/process':>14}")  # fmt: skip
    for n, trials, wall, peak in rows:
        rate = trials / wall
        print(f"{n:>5} {trials:>6} {wall:>8.1f} {rate * 3600:>12,.0f} {rate / base:>9.2f} "
              f"{peak:>14}")  # fmt: skip


if __name__ == "__main__":
    main()
