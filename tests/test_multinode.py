"""Many machines, one study: each "node" is a `tuner study run` process in a folder of its own,
all pointed at one real PostgreSQL database (Optuna) and one real `mlflow server` (with a
PostgreSQL backend and the artifacts behind it). They start together on empty stores, are
killed, and see the database restart under them.

The servers are started here (`tests/servers.py`), on loopback, as an unprivileged user; the
tests are skipped, saying why, only when they cannot be started.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from .conftest import write_study
from .helpers import wait_until
from .servers import MlflowServer, Postgres, start_mlflow, start_postgres

pytestmark = pytest.mark.slow

NODES = 4
TRIALS_PER_NODE = 4
HEARTBEAT, GRACE = 2, 10  # seconds: a dead node's trial must be retried within GRACE + 2 beats;
# a node waits for the database at most GRACE - 2 × HEARTBEAT = 6 s (a restart takes 2)
RANDOM = {"type": "tpe", "n_startup_trials": 100}  # every trial a random start-up trial
FINISHED = ("COMPLETE", "PRUNED")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    try:
        server = start_postgres()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no PostgreSQL server could be started here: {exc}")
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def mlflow_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    try:
        server: MlflowServer = start_mlflow(
            postgres.create_database("mlflow"), folder / "artifacts", folder / "server.log"
        )
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no MLflow tracking server could be started here: {exc}")
    try:
        yield server.url
    finally:
        server.stop()


@dataclass
class Cluster:
    """Nodes sharing one Optuna database and one tracking server."""

    root: Path
    data: Path
    storage: str
    tracking: str
    nodes: list[subprocess.Popen] = field(default_factory=list)

    @functools.cached_property
    def rdb(self) -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(self.storage)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNER_", "MLFLOW_"))}
        return {
            **env,
            "TUNER_STORAGE": self.storage,
            "MLFLOW_TRACKING_URI": self.tracking,
            "TUNER_DATA_DIR": str(self.data),
            "OMP_NUM_THREADS": "1",  # several nodes share this machine's cores
        }

    def folder(self, i: int, name: str, **sections: object) -> Path:
        cwd = self.root / f"node{i}"
        limits = {"heartbeat": HEARTBEAT, "grace": GRACE}
        write_study(cwd, {"sampler": RANDOM, "limits": limits, **sections}, name)
        return cwd

    def start(self, cwd: Path, *args: str) -> subprocess.Popen:
        node = subprocess.Popen(
            [sys.executable, "-m", "tuner", *args], cwd=cwd, env=self.env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.nodes.append(node)
        return node

    def study(self, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=self.storage)

    def trials(self, name: str) -> list[optuna.trial.FrozenTrial]:
        """As stored now (a study's `trials` can be cached)."""
        study_id = self.rdb.get_study_id_from_name(name)
        return self.rdb.get_all_trials(study_id, deepcopy=False)

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking)

    def runs(self, name: str) -> list:
        client = self.client()
        experiment = client.get_experiment_by_name(name)
        return client.search_runs([experiment.experiment_id], max_results=1000)

    def stop(self) -> None:
        for node in self.nodes:
            if node.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
            node.wait()


@pytest.fixture
def cluster(
    postgres: Postgres, mlflow_server: str, fake_cifar: Path, tmp_path: Path
) -> Iterator[Cluster]:
    found = Cluster(tmp_path, fake_cifar, postgres.create_database(), mlflow_server)
    try:
        yield found
    finally:
        found.stop()


def finish(node: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = node.communicate(timeout=timeout)
    assert node.returncode == 0, out
    return out


def by_role(runs: list, role: str) -> list:
    return [r for r in runs if r.data.tags.get("tuner.role") == role]


# -- four nodes on empty stores -------------------------------------------------------------------


@dataclass
class FourNodes:
    cluster: Cluster
    name: str
    outputs: list[str]
    pids: list[int]
    connections: dict[str, int]  # the most connections each node process held at once


@pytest.fixture(scope="module")
def four_nodes(
    postgres: Postgres,
    mlflow_server: str,
    fake_cifar: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FourNodes]:
    """Four nodes started together on an empty database, each running four trials."""
    storage = postgres.create_database()
    cluster = Cluster(tmp_path_factory.mktemp("nodes"), fake_cifar, storage, mlflow_server)
    name = "together"
    # no pruner: the ensemble below takes four completed trials, whichever points are drawn
    folders = [cluster.folder(i, name, pruner={"type": "none"}) for i in range(NODES)]
    peak: dict[str, int] = {}
    done = threading.Event()

    def watch() -> None:  # the connections each node holds, as PostgreSQL counts them
        while not done.wait(0.2):
            with contextlib.suppress(Exception):
                for app, count in postgres.connections(storage.rsplit("/", 1)[1]).items():
                    peak[app] = max(peak.get(app, 0), count)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        nodes = [
            cluster.start(cwd, "study", "run", name, "--trials", str(TRIALS_PER_NODE))
            for cwd in folders
        ]
        try:
            outputs = [finish(node) for node in nodes]
        finally:
            done.set()
            watcher.join()
        yield FourNodes(cluster, name, outputs, [n.pid for n in nodes], peak)
    finally:
        cluster.stop()


def test_four_nodes_on_empty_stores_make_one_study_one_experiment_one_parent(
    four_nodes: FourNodes,
) -> None:
    cluster, name = four_nodes.cluster, four_nodes.name
    assert optuna.get_all_study_names(cluster.storage) == [name]
    client = cluster.client()
    assert [e.name for e in client.search_experiments() if e.name == name] == [name]
    runs = cluster.runs(name)
    [parent] = by_role(runs, "study")
    assert parent.info.status == "FINISHED"
    # each said "created" only if its parent won: exactly one did
    assert sum("created study" in out for out in four_nodes.outputs) == 1

    trials = cluster.study(name).trials
    assert len(trials) == NODES * TRIALS_PER_NODE
    assert {t.state.name for t in trials} <= set(FINISHED)
    trial_runs = by_role(runs, "trial")
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs)
    assert numbers == list(range(NODES * TRIALS_PER_NODE)), "a trial lost or counted twice"
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent.info.run_id}
    assert {r.info.status for r in trial_runs} == {"FINISHED"}

    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == NODES, "every node ran trials"
    print(f"\nconnections per node process (peak, Optuna database): {four_nodes.connections}")
    from tuner.stores import POOL_OVERFLOW, POOL_SIZE

    tuner_apps = {app: n for app, n in four_nodes.connections.items() if app.startswith("tuner")}
    assert len(tuner_apps) == NODES
    assert max(tuner_apps.values()) <= POOL_SIZE + POOL_OVERFLOW


def test_nodes_draw_distinct_points_with_seeds_of_their_own(four_nodes: FourNodes) -> None:
    trials = four_nodes.cluster.study(four_nodes.name).trials
    seeds = [t.user_attrs["sampler_seed"] for t in trials if "sampler_seed" in t.user_attrs]
    assert len(set(seeds)) == len(seeds), "a seed of its own for each trial"
    points = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(points)) == len(points), "two trials drew the same point"


def test_the_ensemble_on_one_node_loads_weights_trained_by_the_others(
    four_nodes: FourNodes,
) -> None:
    cluster, name = four_nodes.cluster, four_nodes.name
    cwd = cluster.root / "node0"
    out = subprocess.run(
        [sys.executable, "-m", "tuner", "ensemble", name, "--top", "4", "--method", "average"],
        cwd=cwd,
        env=cluster.env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    runs = cluster.runs(name)
    [ensemble] = by_role(runs, "ensemble")
    assert ensemble.info.status == "FINISHED"
    trained_by = {
        r.info.run_id: cluster.study(name)
        .trials[int(r.data.tags["optuna.trial_number"])]
        .user_attrs["worker"]
        for r in by_role(runs, "trial")
    }
    members = ensemble.data.tags["tuner.members"].split(",")
    node0 = four_nodes.pids[0]
    assert len(members) == 4
    assert [m for m in members if int(trained_by[m].split(":")[1]) != node0], "all on node0"


# -- a node killed, the database restarted -------------------------------------------------------


def _running_on(cluster: Cluster, name: str, pid: int) -> optuna.trial.FrozenTrial | None:
    for trial in cluster.trials(name):
        if (
            trial.state.name == "RUNNING"
            and trial.user_attrs.get("worker", "").split(":")[1:2] == [str(pid)]
            and trial.intermediate_values
        ):
            return trial
    return None


def test_a_node_killed_mid_trial_has_its_trial_retried_and_its_run_killed_in_time(
    cluster: Cluster,
) -> None:
    name = "killed"
    long = {"train": {"epochs": 40, "batch_size": 32, "width": 0.0625}, "pruner": {"type": "none"}}
    victim = cluster.start(cluster.folder(0, name, **long), "study", "run", name, "--trials", "1")
    # the other node works on for 45 s: its trials take seconds each, and a budget it
    # spent before the lost trial's grace period ran out would leave none to fail it
    other = cluster.start(cluster.folder(1, name, **long), "study", "run", name,
                          "--trials", "1000", "--timeout", "45")  # fmt: skip
    wait_until(lambda: name in optuna.get_all_study_names(cluster.storage), "the study", 300)
    wait_until(lambda: _running_on(cluster, name, victim.pid), "the victim's trial", 300)
    lost = _running_on(cluster, name, victim.pid)
    os.killpg(victim.pid, signal.SIGKILL)  # the whole machine, as far as the study can tell
    killed_at = time.monotonic()
    victim.wait()

    def retried() -> bool:
        trials = cluster.trials(name)
        return trials[lost.number].state.name == "FAIL" and any(
            t.user_attrs.get("retry_of") == lost.number for t in trials
        )

    def run_killed() -> bool:
        [run] = [r for r in by_role(cluster.runs(name), "trial")
                 if r.data.tags["optuna.trial_number"] == str(lost.number)]  # fmt: skip
        return run.info.status == "KILLED"

    bound = GRACE + 2 * HEARTBEAT
    wait_until(retried, "the lost trial to be failed and queued again", 120)
    to_retry = time.monotonic() - killed_at
    wait_until(run_killed, "the lost trial's run to be KILLED", 120)
    to_killed = time.monotonic() - killed_at
    print(f"\nkill -9 → trial failed and queued again: {to_retry:.1f} s; run KILLED: "
          f"{to_killed:.1f} s (grace {GRACE} s, heartbeat {HEARTBEAT} s)")  # fmt: skip
    assert to_retry <= bound and to_killed <= bound

    finish(other)
    retry = [t for t in cluster.trials(name) if t.user_attrs.get("retry_of") == lost.number]
    if [t.state.name for t in retry] == ["WAITING"]:  # the other node's budget was spent first
        finish(
            cluster.start(cluster.folder(1, name, **long), "study", "run", name, "--trials", "1")
        )
    trials = cluster.trials(name)
    retry = [t for t in trials if t.user_attrs.get("retry_of") == lost.number]
    assert [t.state.name for t in retry] in (["COMPLETE"], ["PRUNED"]), "the retry ran"
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert not [r for r in cluster.runs(name) if r.info.status == "RUNNING"]


def test_the_database_restarted_mid_trial_costs_no_trial(
    cluster: Cluster, postgres: Postgres
) -> None:
    name = "blip"
    cwd = cluster.folder(0, name, train={"epochs": 12, "batch_size": 32, "width": 0.0625},
                         pruner={"type": "none"})  # fmt: skip
    node = cluster.start(cwd, "study", "run", name, "--trials", "2")
    wait_until(lambda: name in optuna.get_all_study_names(cluster.storage), "the study", 300)
    wait_until(lambda: _running_on(cluster, name, node.pid), "a trial under way", 300)
    postgres.restart(down_seconds=2)
    out = finish(node)
    assert "answers again" in out, out
    trials = cluster.study(name).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], out
    runs = by_role(cluster.runs(name), "trial")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    [parent] = by_role(cluster.runs(name), "study")
    assert parent.info.status == "FINISHED"
