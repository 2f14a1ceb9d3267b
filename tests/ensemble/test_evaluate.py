"""Ensembles of trials trained here (one epoch, tiny models) on real stores."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from tuner import _optuna
from tuner.data import load_train_val
from tuner.ensemble import EnsembleRequest, evaluate, evaluate_top, load_weights, member_table
from tuner.errors import DataError, TunerError
from tuner.models import build_vgg
from tuner.objective import StudyContext, TrialRun
from tuner.spec import parse
from tuner.study.setup import create, open_study

from ..conftest import TINY_STUDY
from ..helpers import Payload

SPEC = parse({**TINY_STUDY, "name": "ens", "train": {**TINY_STUDY["train"], "epochs": 1},
              "pruner": {"type": "none"}})  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(stores, fake_cifar: Path) -> optuna.Study:
    """Three trials trained and recorded as a worker does, and one whose run was never made."""
    created = create(SPEC, stores)
    data = load_train_val(fake_cifar, SPEC.data, SPEC.seed, torch.device("cpu"))
    ctx = StudyContext(SPEC, data, created.tracker, created.runs)
    study = open_study(SPEC, stores)
    for _ in range(3):
        run = TrialRun(ctx, _optuna.ask(study))
        run.record(run.attempt())
    study.tell(_optuna.ask(study), 1.0)  # the best value, but no run and no weights
    return study


def test_the_top_trials_by_validation_accuracy_are_averaged(trained, stores, fake_cifar) -> None:
    report = evaluate_top(SPEC, stores, k=2, data_dir=fake_cifar, device=CPU)
    ranked = sorted((t for t in trained.trials[:3]), key=lambda t: (-t.value, t.number))
    assert [m.trial_number for m in report.members] == [t.number for t in ranked[:2]]
    assert [m.weight for m in report.members] == [0.5, 0.5]
    assert report.single.trial_number == ranked[0].number  # best on validation, not on test
    assert report.test_images == TINY_STUDY["data"]["test_size"]
    assert report.val_images == TINY_STUDY["data"]["val_size"]
    assert 0 <= report.accuracy <= 1 and report.test.log_loss > 0
    assert report.gain == pytest.approx(report.accuracy - report.single_test.accuracy)
    run = create(SPEC, stores).tracker.client.get_run(report.run_id)
    assert run.info.run_name == "ensemble-average-top2"
    assert run.data.tags["tuner.members"].split(",") == [m.run_id for m in report.members]
    assert run.data.metrics["test_acc"] == pytest.approx(report.accuracy)
    assert run.data.metrics["val_log_loss"] == pytest.approx(report.val.log_loss)
    assert run.data.params["top_k"] == "2" and run.data.params["method"] == "average"
    assert run.data.params["weights"] == "0.500,0.500"
    from tuner.study.status import study_status

    [noted] = [e for e in study_status(SPEC, stores).ensembles if e["run_id"] == report.run_id]
    assert noted["name"] == "ensemble-average-top2" and noted["test_acc"] == report.accuracy
    assert noted["members"] == [m.trial_number for m in report.members], "study status shows it"


def test_greedy_chooses_members_and_weights_on_the_validation_predictions(
    trained, stores, fake_cifar
) -> None:
    """Greedy reads every completed trial's saved predictions: its members and weights are
    those `selection.greedy` gives on them, and its validation log-loss is never worse than
    the best single trial's."""
    from tuner.ensemble.selection import greedy
    from tuner.tracking import Tracker

    report = evaluate(SPEC, stores, EnsembleRequest(k=2), data_dir=fake_cifar, device=CPU)
    tracker, completed = Tracker(stores), sorted(trained.trials[:3], key=lambda t: t.number)
    with tempfile.TemporaryDirectory() as tmp:
        saved = [tracker.fetch_val_predictions(t.user_attrs["mlflow_run_id"], Path(tmp))
                 for t in completed]  # fmt: skip
    expected = greedy([p for p, _ in saved], saved[0][1], 2)
    assert [m.trial_number for m in report.members] == [
        completed[i].number for i in expected.members
    ]
    assert [m.weight for m in report.members] == pytest.approx(expected.weights)
    assert sum(m.weight for m in report.members) == pytest.approx(1.0)
    assert report.val.log_loss <= report.single_val.log_loss + 1e-9
    run = tracker.client.get_run(report.run_id)
    assert run.info.run_name == "ensemble-greedy-top2" and run.data.params["candidates"] == "3"
    assert run.data.tags["tuner.members"].split(",") == [m.run_id for m in report.members]


def test_flip_tta_is_reported_beside_the_plain_scores(trained, stores, fake_cifar) -> None:
    request = EnsembleRequest(k=2, method="average", tta="flip")
    report = evaluate(SPEC, stores, request, data_dir=fake_cifar, device=CPU)
    plain = evaluate_top(SPEC, stores, k=2, data_dir=fake_cifar, device=CPU)
    assert report.test == plain.test and report.single_test == plain.single_test
    assert report.test_tta is not None and report.val_tta is not None
    assert all(m.test_acc_tta is not None for m in report.members)
    metrics = create(SPEC, stores).tracker.client.get_run(report.run_id).data.metrics
    assert metrics["test_acc_flip"] == pytest.approx(report.test_tta.accuracy)
    assert "+flip" in member_table(report)


def test_flip_tta_scores_an_image_and_its_mirror_alike(fake_cifar) -> None:
    """What flip TTA means: the same answer for an image and its mirror image (an ordinary
    network gives two); it averages the network's two answers."""
    from tuner.data import Split, load_test
    from tuner.ensemble.evaluate import _predict

    torch.manual_seed(0)
    model = build_vgg("vgg11", batch_norm=True, width=0.0625).eval()
    test = load_test(fake_cifar, SPEC.data, 0, CPU)
    mirrored = Split(test.images.flip(3), test.labels)
    one = _predict(model, test, None, True, 1.0, 64)
    other = _predict(model, mirrored, None, True, 1.0, 64)
    assert np.allclose(one.test_flip, other.test_flip, atol=1e-6)
    assert not np.allclose(one.test, other.test, atol=1e-6)
    assert np.allclose(one.test_flip, (one.test + other.test) / 2, atol=1e-6)


def test_temperatures_are_fitted_per_member_and_not_for_refits(
    trained, stores, fake_cifar
) -> None:
    request = EnsembleRequest(k=3, method="average", temperature=True)
    report = evaluate(SPEC, stores, request, data_dir=fake_cifar, device=CPU)
    assert all(0.05 <= m.temperature <= 20 for m in report.members)
    assert report.request.run_name == "ensemble-average-top3-temp"
    refits = EnsembleRequest(source="refit", temperature=True)
    with pytest.raises(TunerError, match="trained on the validation images"):
        evaluate(SPEC, stores, refits, data_dir=fake_cifar, device=CPU)


def test_fewer_completed_trials_than_asked_are_ensembled(trained, stores, fake_cifar) -> None:
    report = evaluate_top(SPEC, stores, k=10, data_dir=fake_cifar, device=CPU)
    assert len(report.members) == 3 and report.top_k == 10


def test_fewer_members_than_asked_are_explained_on_the_console(
    trained, stores, fake_cifar, caplog: pytest.LogCaptureFixture
) -> None:
    """`--top 10` of a study with 3 completed trials says so, and what makes more; one network
    scored is `1 network`."""
    from tuner import report as console

    text = console.ensemble(evaluate(SPEC, stores, EnsembleRequest(k=10), data_dir=fake_cifar,
                                     device=CPU))  # fmt: skip
    assert ("fewer than the 10 asked: the study has 3 completed trials with saved validation "
            "predictions (`tuner study run ens` runs more)") in text  # fmt: skip
    assert "validation figures are in-sample" in text
    with caplog.at_level("INFO", logger="tuner"):
        evaluate_top(SPEC, stores, k=1, data_dir=fake_cifar, device=CPU)
    assert "average selection from 3 trials; scoring 1 network on" in caplog.text


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

    def start_then_sigterm(self, runs, name):
        made.append(real(self, runs, name))
        signal.raise_signal(signal.SIGTERM)
        return made[-1]

    monkeypatch.setattr(Tracker, "start_ensemble", start_then_sigterm)
    with pytest.raises(interrupts.Terminated):
        evaluate_top(SPEC, stores, k=2, data_dir=fake_cifar, device=CPU)
    run = create(SPEC, stores).tracker.client.get_run(made[0])
    assert run.info.status == "KILLED" and run.data.tags["tuner.fail_reason"] == "terminated"


def test_a_study_without_completed_trials_says_what_to_do(stores, fake_cifar) -> None:
    empty = parse({**TINY_STUDY, "name": "ens-empty"})
    create(empty, stores)
    with pytest.raises(TunerError, match="no completed trials to ensemble; run `tuner study run"):
        evaluate_top(empty, stores, k=3, data_dir=fake_cifar, device=CPU)


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


UNSOUND = {  # saved predictions, damaged → the few words that name what is wrong
    "wrong width": (lambda p: p[:, :5], "probabilities of shape (60, 5), expected N×10"),
    "all NaN": (lambda p: np.full_like(p, np.nan), "600 probabilities are not finite"),
    "integers": (lambda p: p.astype(np.int64), "probabilities are int64, expected floats"),
    "negative": (lambda p: p - 0.1, "probabilities from -0.05 to 0.45, expected 0..1"),
    "halved": (lambda p: p / 2, "the probabilities of image 0 sum to 0.5, expected 1"),
}


@pytest.mark.parametrize("damage", UNSOUND, ids=list(UNSOUND))
def test_unsound_predictions_are_named(damage: str) -> None:
    from tuner.ensemble.evaluate import _unsound

    probs = np.full((60, 10), 0.05, np.float32)
    probs[:, 0] = 0.55
    labels = np.arange(60) % 10
    assert _unsound(probs, labels) is None
    edit, said = UNSOUND[damage]
    assert _unsound(edit(probs), labels) == said
    assert "labels of shape (59,)" in _unsound(probs, labels[:-1])
