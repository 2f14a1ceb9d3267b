"""Every model family on every data set layout: a trial of each trains and is recorded, its
network is rebuilt from its own record (an ensemble may mix families), and a user's builder
and loader fail in one line naming them, before anything trains."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch

from tuner.data import FASHION_MNIST_INFO as FASHION
from tuner.data import describe, load_test, load_train_val, load_val
from tuner.ensemble.evaluate import Candidate, EnsembleRequest, _score, load_member
from tuner.errors import ConfigError
from tuner.objective import StudyContext, TrialRun, check_study
from tuner.records import Outcome
from tuner.spec import parse
from tuner.study.setup import create

from .conftest import TINY_STUDY, write_fake_cifar
from .helpers import write_cifar100, write_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TRAINING = {k: TINY_STUDY["space"][k] for k in ("weight_decay", "augment")}
OPTIMIZER = {"optimizer": {"nesterov": {"lr": {"low": 0.01, "high": 0.1, "log": True}}}}
FAMILIES: dict[str, dict[str, Any]] = {
    "vgg": {"model": "vgg", "space": {"depth": ["vgg11"], "batch_norm": [True]}},
    "googlenet": {"model": "googlenet",
                  "space": {"stages": [1, 2], "width": {"low": 0.5, "high": 1.0}}},
    "builder": {"model": {"builder": "examples.resnet:build"},
                "space": {"blocks": [1], "channels": {"low": 4, "high": 8, "step": 4},
                          "dropout": {"low": 0.0, "high": 0.2}}},
}  # fmt: skip
# each data set: its study file's `data`, and the folder its layout is written in
SETS = {
    "cifar10": {"val_size": 40, "train_size": 80, "test_size": 40},
    "cifar100": {"set": "cifar100", "val_size": 100, "train_size": 100, "test_size": 100},
    "fashion-mnist": {"set": "fashion-mnist", "val_size": 40, "train_size": 80},
    "loader": {"loader": "tiny_arrays:load", "val_size": 40, "train_size": 80},
}
LOADER = '''
import numpy as np

def load():
    """A user's own arrays: 7 classes of 3x20x20 images, channels last, as Keras has them."""
    rng = np.random.default_rng(0)
    def split(n):
        labels = np.arange(n) % 7
        images = np.clip(rng.normal(30 * labels[:, None, None, None], 20, (n, 20, 20, 3)), 0, 255)
        return images.astype(np.uint8), labels
    return split(160), split(70)
'''


def spec_of(family: str, data: str) -> Any:
    chosen = FAMILIES[family]
    return parse({
        **TINY_STUDY, "name": f"fam-{family}-{data}", "model": chosen["model"],
        "space": {**TRAINING, **OPTIMIZER, **chosen["space"]},
        "train": {"epochs": 1, "batch_size": 32, "width": 0.0625 if family != "builder" else 1.0,
                  "crop_padding": 2},
        "data": SETS[data],
    })  # fmt: skip


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each layout written once, and the loader's module importable from the current folder
    (as a user's is: `tuner` looks in the folder it runs in)."""
    made = tmp_path_factory.mktemp("sets")
    (made / "tiny_arrays.py").write_text(LOADER)
    return {
        "cifar10": write_fake_cifar(made / "c10"),
        "cifar100": write_cifar100(made / "c100", n_train=300, n_test=100),
        "fashion-mnist": write_fashion_mnist(made / "fm" / "fashion-mnist", 160, 60).parent,
        "loader": made,
    }


@pytest.fixture
def at_home(monkeypatch: pytest.MonkeyPatch, roots: dict[str, Path]) -> None:
    """Run where the loader's module and `examples/` are found, as a user runs tuner."""
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(roots["loader"]))
    yield
    sys.modules.pop("tiny_arrays", None)


def run_trial(spec: Any, root: Path, stores: Any) -> tuple[TrialRun, Any]:
    created = create(spec, stores)
    data = load_train_val(root, spec.data, spec.seed, CPU)
    check_study(spec, data.info)
    ctx = StudyContext(spec, data, created.tracker, created.runs)
    study = optuna.create_study(direction="maximize")
    run = TrialRun(ctx, study.ask())
    ending = run.record(run.attempt())
    assert ending.outcome is Outcome.COMPLETE, ending.reason
    return run, data


@pytest.mark.parametrize(("family", "data"), [(f, d) for f in FAMILIES for d in SETS])
def test_a_trial_of_each_family_on_each_data_set(
    family: str, data: str, roots: dict[str, Path], stores: Any, at_home: None, tmp_path: Path
) -> None:
    spec = spec_of(family, data)
    run, loaded = run_trial(spec, roots[data], stores)
    info = loaded.info
    record = json.loads(Path(run.ctx.tracker.client.download_artifacts(
        run.run_id, "model/architecture.json", str(tmp_path))).read_text())  # fmt: skip
    assert record["family"] == family and record["num_classes"] == info.classes
    assert tuple(record["input_shape"]) == info.shape
    # rebuilt from its own record alone, the network predicts as the trial's did
    model = load_member(run.ctx.tracker, run.trial.number, run.run_id, tmp_path)
    from tuner.train import predict

    probs = predict(model, loaded.val.images, 64, info).numpy()
    saved = np.load(run.ctx.tracker.client.download_artifacts(
        run.run_id, "predictions/val_predictions.npz", str(tmp_path)))["probs"]  # fmt: skip
    assert saved.shape == (len(loaded.val), info.classes)
    np.testing.assert_allclose(probs, saved, atol=1e-5)


def test_an_ensemble_mixes_families(roots: dict[str, Path], stores: Any, at_home: None,
                                    tmp_path: Path) -> None:  # fmt: skip
    """Members of two families on one data set: each rebuilt from its own record, scored
    together."""
    runs = [run_trial(spec_of(f, "fashion-mnist"), roots["fashion-mnist"], stores)
            for f in ("vgg", "googlenet")]  # fmt: skip
    spec = runs[0][0].spec
    val = load_val(roots["fashion-mnist"], spec.data, spec.seed, CPU)
    test = load_test(roots["fashion-mnist"], spec.data, spec.seed, CPU)
    pool = [
        Candidate(i, run.run_id, run.val_accs[-1],
                  run.ctx.tracker.fetch_val_predictions(run.run_id, tmp_path)[0])
        for i, (run, _) in enumerate(runs)
    ]  # fmt: skip
    tracker = runs[0][0].ctx.tracker
    report = _score(tracker, pool, EnsembleRequest(k=2, method="average"), val, test,
                    tmp_path, 64)  # fmt: skip
    assert len(report.members) == 2 and report.test_images == len(test)
    assert report.class_names[0] == "T-shirt/top"
    assert 0 <= report.test.accuracy <= 1


def test_auxiliary_heads_add_their_weighted_loss() -> None:
    """GoogLeNet's training forward returns its auxiliary logits too; the step adds each
    head's cross-entropy times `aux_weight` (none of it at weight 0)."""
    from tuner.data import normalize
    from tuner.models import Architecture, build
    from tuner.train import _forward_loss

    params = {"stages": 2, "width": 1.0, "aux": True, "dropout": 0.0}
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    cross = torch.nn.functional.cross_entropy
    for weight in (0.0, 0.5):
        model = build(Architecture("googlenet", {**params, "aux_weight": weight}, 0.125, 10,
                                   (1, 28, 28)), seed=0).train()  # fmt: skip
        torch.manual_seed(0)  # the auxiliary heads' dropout draws alike in both
        logits, aux = model(normalize(images, FASHION))
        assert len(aux) == 2, "after 4a and 4d"
        expected = cross(logits, labels) + sum(weight * cross(a, labels) for a in aux)
        torch.manual_seed(0)
        loss = _forward_loss(model, images, labels, 0.0, FASHION)
        torch.testing.assert_close(loss, expected)


BROKEN_BUILDERS = {
    "import": ("nosuch_module:build", "cannot import nosuch_module"),
    "missing": ("broken_builders:nothing", "has no 'nothing'"),
    "raises": ("broken_builders:raises", "raised KeyError"),
    "returns": ("broken_builders:returns_dict", "returned a dict, expected a torch.nn.Module"),
    "shape": ("broken_builders:wrong_classes", "to (3, 3), expected a tensor of (3, 10)"),
    "fails": ("broken_builders:wrong_channels", "fails on a batch of shape (3, 1, 28, 28)"),
}
BUILDERS = """
import torch

def raises(params, shape, classes):
    return params["no such parameter"]

def returns_dict(params, shape, classes):
    return {}

def wrong_classes(params, shape, classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))

def wrong_channels(params, shape, classes):
    return torch.nn.Conv2d(3, classes, 28)
"""


@pytest.mark.parametrize("case", sorted(BROKEN_BUILDERS))
def test_a_broken_builder_is_one_line_naming_it(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, said = BROKEN_BUILDERS[case]
    (tmp_path / "broken_builders.py").write_text(BUILDERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "broken_builders", raising=False)
    spec = parse({**TINY_STUDY, "model": {"builder": target},
                  "space": {**TRAINING, **OPTIMIZER, "blocks": [1]},
                  "data": {"set": "fashion-mnist"}})  # fmt: skip
    info = describe(spec.data, tmp_path)
    with pytest.raises(ConfigError) as error:
        check_study(spec, info)
    message = str(error.value)
    assert message.startswith(f"model.builder {target!r}") and said in message
    assert "\n" not in message


def test_an_augmentation_larger_than_the_images_is_refused(tmp_path: Path) -> None:
    spec = parse({**TINY_STUDY, "space": {**TINY_STUDY["space"], "augment": ["crop_flip"]},
                  "train": {**TINY_STUDY["train"], "crop_padding": 16},
                  "data": {"loader": "tiny:load"}})  # fmt: skip
    from dataclasses import replace

    from tuner.data import FASHION_MNIST_INFO

    with pytest.raises(ConfigError, match="crop_padding=16 does not fit"):
        check_study(spec, replace(FASHION_MNIST_INFO, shape=(1, 12, 12)))


def test_study_run_refuses_a_broken_builder_before_it_makes_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from .conftest import write_study
    from .helpers import quick

    (tmp_path / "broken_builders.py").write_text(BUILDERS)
    monkeypatch.delitem(sys.modules, "broken_builders", raising=False)
    write_study(tmp_path, {"model": {"builder": "broken_builders:wrong_channels"},
                           "space": {**TRAINING, **OPTIMIZER, "blocks": [1]},
                           "data": {"set": "fashion-mnist", "val_size": 40}})  # fmt: skip
    fashion = write_fashion_mnist(tmp_path / "data" / "fashion-mnist", 100, 40).parent
    done = quick(tmp_path, fashion, monkeypatch, capsys, "study", "run", "tiny")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("error: model.builder 'broken_builders:wrong_channels'")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlruns").exists(), "no store was made"


def test_a_study_keeps_its_family() -> None:
    """Another `model:` for a study made is a new search space: refused, with the change."""
    from tuner.errors import SpecError
    from tuner.records import SPEC_JSON_ATTR
    from tuner.study.setup import check_contract

    vgg = parse({**TINY_STUDY, "name": "kept"})
    study = optuna.create_study()
    study.set_user_attr(SPEC_JSON_ATTR, vgg.to_dict())
    check_contract(study, vgg, allow_changed_settings=False)
    googlenet = parse({**TINY_STUDY, "name": "kept", "model": "googlenet",
                       "space": {**TRAINING, **OPTIMIZER}})  # fmt: skip
    with pytest.raises(SpecError, match="model: 'vgg' → 'googlenet'"):
        check_contract(study, googlenet, allow_changed_settings=False)


def test_a_builders_network_that_cannot_train_a_batch_is_one_line_in_the_estimate() -> None:
    """Right for the check's batch, wrong for a training batch: the cost estimate names it."""
    from tuner.study.cost import measure

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(28 * 28, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(x.flatten(1))
            return out if len(x) <= 3 else out[:1]

    spec = parse({**TINY_STUDY, "model": {"builder": "odd_nets:build"},
                  "space": {**TRAINING, **OPTIMIZER, "blocks": [1]}})  # fmt: skip
    module = type(sys)("odd_nets")
    module.build = lambda params, shape, classes: Odd()  # type: ignore[attr-defined]
    sys.modules["odd_nets"] = module
    try:
        from tuner.data import FASHION_MNIST_INFO
        from tuner.objective import check_study

        check_study(spec, FASHION_MNIST_INFO)  # the check's batch of three passes
        with pytest.raises(ConfigError, match="model.builder 'odd_nets:build': its network "
                           "fails to train a batch of 32 images"):  # fmt: skip
            measure(spec, CPU, 4, info=FASHION_MNIST_INFO)
    finally:
        del sys.modules["odd_nets"]
