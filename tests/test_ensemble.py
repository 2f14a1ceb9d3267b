"""Ensembles of trials trained here (one epoch, tiny models) on real stores."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from tuner import _optuna
from tuner.data import load_train_val
from tuner.ensemble import evaluate_top, load_weights
from tuner.errors import DataError, TunerError
from tuner.models import build_vgg
from tuner.objective import StudyContext, TrialRun
from tuner.spec import parse
from tuner.study.setup import create, open_study

from .conftest import TINY_STUDY
from .helpers import Payload

SPEC = parse({**TINY_STUDY, "name": "ens", "train": {**TINY_STUDY["train"], "epochs": 1},
              "pruner": {"type": "none"}})  # fmt: skip


@pytest.fixture(scope="module")
def trained(stores, fake_cifar: Path) -> optuna.Study:
    """Three trials trained and recorded as a worker does, and one whose run was never made."""
    created = create(SPEC, stores)
    data = load_train_val(fake_cifar, SPEC.data, SPEC.seed, torch.device("cpu"))
    ctx = StudyContext(SPEC, data, created.tracker, created.runs)
    study = open_study(SPEC, stores)
    for _ in range(3):
        run = TrialRun(ctx, _optuna.ask(study))
        run.finish(run.attempt())
    study.tell(_optuna.ask(study), 1.0)  # the best value, but no run and no weights
    return study


def test_the_top_trials_with_weights_are_scored_together(trained, stores, fake_cifar) -> None:
    report = evaluate_top(SPEC, stores, k=2, data_dir=fake_cifar, device=torch.device("cpu"))
    ranked = sorted((t for t in trained.trials[:3]), key=lambda t: (-t.value, t.number))
    assert [m.trial_number for m in report.members] == [t.number for t in ranked[:2]]
    assert report.test_images == TINY_STUDY["data"]["test_size"]
    assert 0 <= report.accuracy <= 1 and report.log_loss > 0
    assert report.gain == pytest.approx(report.accuracy - max(m.test_acc for m in report.members))
    run = create(SPEC, stores).tracker.client.get_run(report.run_id)
    assert run.data.tags["tuner.members"].split(",") == [m.run_id for m in report.members]
    assert run.data.metrics["test_acc"] == pytest.approx(report.accuracy)
    assert run.data.params["top_k"] == "2"


def test_fewer_completed_trials_than_asked_are_ensembled(trained, stores, fake_cifar) -> None:
    report = evaluate_top(SPEC, stores, k=10, data_dir=fake_cifar, device=torch.device("cpu"))
    assert len(report.members) == 3 and report.top_k == 10


def test_a_signal_as_the_ensemble_run_is_made_closes_it(
    trained, stores, fake_cifar, signal_handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM right as the run is made (the moment `scoring …` is printed, when a user or a
    scheduler stops it): the run is closed as KILLED with the reason, never left RUNNING."""
    import signal

    from tuner import interrupts
    from tuner.tracking import Tracker

    made: list[str] = []
    real = Tracker.start_ensemble

    def start_then_sigterm(self, runs, k):
        made.append(real(self, runs, k))
        signal.raise_signal(signal.SIGTERM)
        return made[-1]

    monkeypatch.setattr(Tracker, "start_ensemble", start_then_sigterm)
    with pytest.raises(interrupts.Terminated):
        evaluate_top(SPEC, stores, k=2, data_dir=fake_cifar, device=torch.device("cpu"))
    run = create(SPEC, stores).tracker.client.get_run(made[0])
    assert run.info.status == "KILLED" and run.data.tags["tuner.fail_reason"] == "terminated"


def test_a_study_without_completed_trials_says_what_to_do(stores, fake_cifar) -> None:
    empty = parse({**TINY_STUDY, "name": "ens-empty"})
    create(empty, stores)
    with pytest.raises(TunerError, match="no completed trials to ensemble; run `tuner study run"):
        evaluate_top(empty, stores, k=3, data_dir=fake_cifar, device=torch.device("cpu"))


def test_weights_load_only_as_tensors(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"x": Payload(tmp_path / "owned")}, bad)
    with pytest.raises(DataError, match="evil.pt: cannot load these weights"):
        load_weights(bad, build_vgg("vgg11", batch_norm=True, width=0.0625))
    assert not (tmp_path / "owned").exists()


def test_weights_saved_before_the_parts_had_names_still_load(tmp_path: Path) -> None:
    trained = build_vgg("vgg11", batch_norm=True, width=0.0625)
    old = torch.nn.Sequential(*trained.features, *trained.classifier).state_dict()
    torch.save(old, tmp_path / "old.pt")
    model = build_vgg("vgg11", batch_norm=True, width=0.0625)
    load_weights(tmp_path / "old.pt", model)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), trained.state_dict().values(), strict=True)
    )
