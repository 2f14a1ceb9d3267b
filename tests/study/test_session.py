from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
import torch

from tuner.spec import parse
from tuner.stores import resolve
from tuner.study.session import RunRequest, run_study, worker_plans
from tuner.tracking import StudyRuns

from ..conftest import TINY_STUDY

SPEC = parse(TINY_STUDY)
RUNS = StudyRuns("1", "parent")


def _plans(request: RunRequest):
    return worker_plans(SPEC, resolve(mlruns="/tmp/unused"), RUNS, request)


def test_one_job_runs_in_this_process_with_the_files_budget(tmp_path) -> None:
    [plan] = _plans(RunRequest(devices=(torch.device("cpu"),), data_dir=tmp_path))
    assert (plan.name, plan.claim, plan.threads) == ("main", None, None)
    assert plan.budget.trials == TINY_STUDY["trials"] and plan.budget.deadline is None
    assert not plan.budget.more, "the file's trials: what the study aims at"
    assert plan.runs == RUNS and plan.data_dir == tmp_path


def test_jobs_share_one_budget_and_split_the_cores(tmp_path) -> None:
    plans = _plans(RunRequest(devices=(torch.device("cpu"),), jobs_per_device=2, trials=7,
                              timeout=30, data_dir=tmp_path))  # fmt: skip
    assert [p.name for p in plans] == ["w0", "w1"]
    assert len({p.budget for p in plans}) == 1 and plans[0].budget.trials == 7
    assert plans[0].budget.more, "--trials 7: seven more"
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


# -- whole runs in this process, on generated images ---------------------------------------------

BASELINES = [
    {"name": "first", "depth": "vgg11", "batch_norm": True, "dropout": 0.1, "optimizer": "sgd",
     "lr": 0.05, "weight_decay": 5.0e-4, "augment": "none"},
    {"name": "second", "depth": "vgg13", "batch_norm": False, "dropout": 0.0, "optimizer": "adam",
     "lr": 1.0e-3, "weight_decay": 1.0e-4, "augment": "flip"},
]  # fmt: skip


def _interrupted_at(number: int):
    """The training loop, but Ctrl-C comes while trial `number` trains."""
    from tuner.train import train

    def trainer(model, data, config, on_epoch, between_steps):
        if config.seed % 100_003 == number:  # a trial's seed ends in its number
            raise KeyboardInterrupt
        return train(model, data, config, on_epoch, between_steps)

    return trainer


@pytest.mark.slow  # four whole runs, pictures included: half a minute
def test_run_again_after_ctrl_c_it_runs_what_is_left_and_the_interrupted_baseline_first(
    stores, fake_cifar
) -> None:
    """Seen: Ctrl-C at 3 of 8, run again: 8 more (11 in all), the interrupted baseline never."""
    from tuner.study.setup import open_study

    spec = parse({**TINY_STUDY, "name": "resumed", "baselines": BASELINES})
    request = RunRequest(devices=(torch.device("cpu"),), data_dir=fake_cifar)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, stores, replace(request, trainer=_interrupted_at(1)))
    summary = run_study(spec, stores, request)
    trials = open_study(spec, stores).trials
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) == TINY_STUDY["trials"] + 1, "the file's 4, and the one stopped"
    assert sum(summary.ran.values()) == TINY_STUDY["trials"] - 1
    second = [t for t in trials if t.user_attrs.get("baseline") == "second"]
    assert [t.user_attrs.get("fail_reason") for t in second] == ["interrupted", None]
    assert second[1].params == second[0].params and second[1].number == 2, "it ran first"
    again = run_study(spec, stores, request)
    assert again.ran == {}, "the study has its trials: nothing more runs"
    more = run_study(spec, stores, replace(request, trials=1))
    assert sum(more.ran.values()) == 1, "--trials 1: one more"


@pytest.mark.slow
def test_a_study_in_one_process_draws_the_same_points_every_time(stores, fake_cifar) -> None:
    from tuner.study.setup import open_study

    request = RunRequest(devices=(torch.device("cpu"),), data_dir=fake_cifar)
    points = []
    for name in ("same-a", "same-b"):  # two fresh studies of one file and seed
        spec = parse({**TINY_STUDY, "name": name, "trials": 5})
        run_study(spec, stores, request)
        points.append([t.params for t in open_study(spec, stores).trials])
    assert points[0] == points[1]
    assert len({tuple(sorted(p.items())) for p in points[0]}) == 5
