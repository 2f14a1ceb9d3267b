from __future__ import annotations

import os
import time

import pytest
import torch

from tuner.spec import parse
from tuner.stores import resolve
from tuner.study.session import RunRequest, worker_plans
from tuner.tracking import StudyRuns

from ..conftest import TINY_STUDY

SPEC = parse(TINY_STUDY)
RUNS = StudyRuns("1", "parent")


def _plans(request: RunRequest):
    return worker_plans(SPEC, resolve(mlruns="/tmp/unused"), RUNS, request)


def test_one_job_runs_in_this_process_with_the_files_budget(tmp_path) -> None:
    [plan] = _plans(RunRequest(devices=(torch.device("cpu"),), data_dir=tmp_path))
    assert (plan.name, plan.claim, plan.threads, plan.index) == ("main", None, None, 0)
    assert plan.budget.trials == TINY_STUDY["trials"] and plan.budget.deadline is None
    assert plan.runs == RUNS and plan.data_dir == tmp_path


def test_jobs_share_one_budget_and_split_the_cores(tmp_path) -> None:
    plans = _plans(RunRequest(devices=(torch.device("cpu"),), jobs_per_device=2, trials=7,
                              timeout=30, data_dir=tmp_path))  # fmt: skip
    assert [p.name for p in plans] == ["w0", "w1"] and [p.index for p in plans] == [0, 1]
    assert len({p.budget for p in plans}) == 1 and plans[0].budget.trials == 7
    assert plans[0].budget.deadline == pytest.approx(time.time() + 30, abs=5)
    assert plans[0].claim is plans[1].claim is not None, "one lock for the budget"
    assert all(p.threads == max(1, (os.cpu_count() or 1) // 2) for p in plans)


def test_gpus_get_their_jobs_each(tmp_path) -> None:
    gpus = (torch.device("cuda", 0), torch.device("cuda", 1))
    plans = _plans(RunRequest(devices=gpus, jobs_per_device=2, data_dir=tmp_path))
    assert [p.name for p in plans] == ["cuda:0#0", "cuda:0#1", "cuda:1#0", "cuda:1#1"]
    assert [p.device for p in plans] == [gpus[0], gpus[0], gpus[1], gpus[1]]


@pytest.mark.parametrize(
    ("devices", "jobs", "expected"),
    [(("cpu",), 1, "cpu"), (("cpu",), 2, "cpu (2 workers)"),
     (("cuda:0", "cuda:1"), 3, "cuda:0, cuda:1 (3 workers each)")],
)  # fmt: skip
def test_the_start_line_says_where_the_workers_run(devices, jobs: int, expected: str) -> None:
    from tuner.study.session import _where

    request = RunRequest(devices=tuple(torch.device(d) for d in devices), jobs_per_device=jobs)
    assert _where(request) == expected
