from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuner import spec
from tuner.cli import main
from tuner.errors import SpecError

from .conftest import TINY_STUDY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["vgg-cifar", "vgg-cifar-smoke"])
def test_shipped_study_files_validate(name: str) -> None:
    loaded = spec.load(name, ROOT / "studies")
    assert loaded.name == name
    assert set(loaded.space.depth) == {"vgg11", "vgg13", "vgg16", "vgg19"}
    assert set(loaded.space.optimizer) == {"sgd", "nesterov", "adam", "adamw"}
    assert set(loaded.space.augment) == {"none", "flip", "crop_flip", "crop_flip_cutout"}
    assert set(loaded.space.batch_norm) == {True, False}


def test_full_study_defaults() -> None:
    loaded = spec.load("vgg-cifar", ROOT / "studies")
    assert loaded.data.val_size == 5000
    assert loaded.pruner.type == "hyperband"
    assert loaded.sampler.type == "tpe"


def test_spec_is_frozen() -> None:
    loaded = spec.parse(TINY_STUDY)
    with pytest.raises(Exception, match="frozen"):
        loaded.train.epochs = 3  # type: ignore[misc]


# (YAML text replacing one part of the tiny study, the key the message must name, and a phrase)
BAD = {
    "unknown top-level key": ("trails: 3", "trails", "unknown key"),
    "unknown nested key": ("train: {epochs: 2, learning_rate: 0.1}", "train.learning_rate",
                           "unknown key"),
    "wrong type": ("train: {epochs: two}", "train.epochs", "valid integer"),
    "float for an int": ("train: {epochs: 2.5}", "train.epochs", "valid integer"),
    "lr read as a string": (
        "space: {depth: [vgg11], batch_norm: [true], dropout: {low: 0, high: 0.1},"
        " weight_decay: {low: 0, high: 0}, augment: [none],"
        " optimizer: {adam: {lr: {low: 1e-3, high: 1.0e-2}}}}",
        "space.optimizer.adam.lr.low", "write 1.0e-3"),
    "low above high": (
        "space: {depth: [vgg11], batch_norm: [true], dropout: {low: 0, high: 0.1},"
        " weight_decay: {low: 0.1, high: 0.01}, augment: [none],"
        " optimizer: {adam: {lr: {low: 1.0e-3, high: 1.0e-2}}}}",
        "space.weight_decay", "low must not exceed high"),
    "log scale from zero": (
        "space: {depth: [vgg11], batch_norm: [true], dropout: {low: 0, high: 0.1},"
        " weight_decay: {low: 0, high: 0.01, log: true}, augment: [none],"
        " optimizer: {adam: {lr: {low: 1.0e-3, high: 1.0e-2}}}}",
        "space.weight_decay", "log-scale range needs low > 0"),
    "unknown optimizer": (
        "space: {depth: [vgg11], batch_norm: [true], dropout: {low: 0, high: 0.1},"
        " weight_decay: {low: 0, high: 0.01}, augment: [none],"
        " optimizer: {rmsprop: {lr: {low: 1.0e-3, high: 1.0e-2}}}}",
        "space.optimizer.rmsprop", "'sgd', 'nesterov', 'adam' or 'adamw'"),
    "unknown depth": (
        "space: {depth: [vgg12], batch_norm: [true], dropout: {low: 0, high: 0.1},"
        " weight_decay: {low: 0, high: 0.01}, augment: [none],"
        " optimizer: {adam: {lr: {low: 1.0e-3, high: 1.0e-2}}}}",
        "space.depth.0", "'vgg11'"),
    "yes/no read as a boolean": (
        "space: {depth: [vgg11], batch_norm: [true], dropout: {low: 0, high: 0.1},"
        " weight_decay: {low: 0, high: 0.01}, augment: [no],"
        " optimizer: {adam: {lr: {low: 1.0e-3, high: 1.0e-2}}}}",
        "space.augment.0", "quote the word"),
    "octal-looking number": ("train: {epochs: 010}", "010", "octal"),
    "python object tag": ("seed: !!python/object/apply:os.system ['true']", "python/object",
                          "not valid YAML"),
    "unknown pruner": ("pruner: {type: asha}", "pruner", "hyperband"),
    "exponent without a sign": (
        "space: {depth: [vgg11], batch_norm: [true], dropout: {low: 0, high: 0.1},"
        " weight_decay: {low: 0, high: 0.01}, augment: [none],"
        " optimizer: {sgd: {lr: {low: 1.0e-3, high: 1.0e2}}}}",
        "space.optimizer.sgd.lr.high", "write 1.0e+2"),
    "negative seed": ("seed: -1", "seed", "greater than or equal to 0"),
    "seed past 32 bits": ("seed: 1099511627776", "seed", "less than 4294967296"),
    "NaN bound": (
        "space: {depth: [vgg11], batch_norm: [true], dropout: {low: 0, high: 0.1},"
        " weight_decay: {low: .nan, high: 0.01}, augment: [none],"
        " optimizer: {adam: {lr: {low: 1.0e-3, high: 1.0e-2}}}}",
        "space.weight_decay.low", "finite number"),
    "infinite bound": (
        "space: {depth: [vgg11], batch_norm: [true], dropout: {low: 0, high: 0.1},"
        " weight_decay: {low: 0, high: 0.01}, augment: [none],"
        " optimizer: {adam: {lr: {low: 1.0e-3, high: 1.0e+400}}}}",
        "space.optimizer.adam.lr.high", "finite number"),
    "infinite timeout": ("limits: {trial_timeout: .inf}", "limits.trial_timeout", "finite"),
    "timeout of years": ("limits: {trial_timeout: 1.0e+14}", "limits.trial_timeout",
                         "less than or equal to 2592000"),
    "heartbeat of years": ("limits: {heartbeat: 100000000000000, grace: 200000000000000}",
                           "limits.heartbeat", "less than or equal to 86400"),
    "epochs past reason": ("train: {epochs: 10000000000}", "train.epochs",
                           "less than or equal to 100000"),
    "a key given twice": ("train: {epochs: 1, batch_size: 8, epochs: 500}", "'epochs' is given "
                          "twice", "remove one"),
    "dropout of one": (
        "space: {depth: [vgg11], batch_norm: [true], dropout: {low: 0, high: 1.0},"
        " weight_decay: {low: 0, high: 0.01}, augment: [none],"
        " optimizer: {adam: {lr: {low: 1.0e-3, high: 1.0e-2}}}}",
        "space", "dropout must lie in [0, 1)"),
}  # fmt: skip


def _with(tmp_path: Path, line: str) -> Path:
    """The tiny study with one top-level section replaced by `line` (YAML text)."""
    key = line.split(":", 1)[0]
    base = {k: v for k, v in TINY_STUDY.items() if k != key}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False) + line + "\n")
    return path


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_spec_names_file_and_key(tmp_path: Path, case: str) -> None:
    line, key, phrase = BAD[case]
    path = _with(tmp_path, line)
    with pytest.raises(SpecError) as info:
        spec.load(str(path))
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert phrase in message


@pytest.mark.parametrize(
    "case", ["lr read as a string", "unknown top-level key", "octal-looking number"]
)
def test_cli_bad_spec_exits_2_without_traceback(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _with(tmp_path, BAD[case][0])
    with pytest.raises(SystemExit) as info:
        main(["study", "create", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err
    assert "Traceback" not in err
    assert not (tmp_path / "mlruns").exists(), "a bad spec must not touch the stores"


def test_missing_study_file_lists_known_ones(tmp_path: Path) -> None:
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "vgg-cifar.yaml").write_text("name: x\n")
    with pytest.raises(SpecError, match="Known studies .*vgg-cifar"):
        spec.load("vgg-cifr", tmp_path / "studies")


def test_resolved_spec_has_defaults_filled_in() -> None:
    resolved = spec.parse(TINY_STUDY).to_dict()
    assert resolved["train"]["schedule"] == "onecycle"
    assert resolved["pruner"]["type"] == "median"


STRANGE = {
    "deeply nested": ("seed: " + "[" * 5000 + "]" * 5000, "nested more than 32 levels"),
    "deeply nested mapping": ("seed: " + "{a: " * 400 + "1" + "}" * 400, "nested more than"),
    "alias bomb": (
        "x: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(
            f"x{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 9)}]\n"
            for i in range(30)
        ),  # fmt: skip
        "more than 200 aliases",
    ),
    "very long name": ("name: " + "n" * 5000, "at most 64 characters"),
    "binary file": ("\x00\x01\x02" * 100, "not valid YAML"),
    "a top-level key twice": ("x: 3\nx: 4", "'x' is given twice (first on line"),
}


@pytest.mark.parametrize("case", STRANGE, ids=list(STRANGE))
def test_strange_input_is_refused_with_one_line(tmp_path: Path, case: str) -> None:
    text, phrase = STRANGE[case]
    path = tmp_path / "strange.yaml"
    given = text.split(":", 1)[0]  # the key the text gives: the base leaves it out
    base = {k: v for k, v in {**TINY_STUDY, "name": "s"}.items() if k != given}
    path.write_text(yaml.safe_dump(base) + text + "\n")
    with pytest.raises(SpecError) as info:
        spec.load(str(path))
    message = str(info.value)
    assert str(path) in message and phrase in message
    assert len(message) < 400, "one line, not the input echoed back"


def test_a_huge_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("w") as f:
        f.write("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(SpecError, match=r"huge.yaml: 2,097,155 bytes is not a study file"):
        spec.load(str(path))


GOOD_BASELINE = {"name": "known-good", "depth": "vgg11", "batch_norm": True, "dropout": 0.1,
                 "optimizer": "nesterov", "lr": 0.05, "weight_decay": 5e-4,
                 "augment": "crop_flip"}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"lr": 0.9}, "lr=0.9 is outside [0.001, 0.5]"),
        ({"depth": "vgg13", "batch_norm": "yes"}, "batch_norm"),
        ({"optimizer": "adam"}, "lr=0.05 is outside [1e-05, 0.003]"),
        ({"weight_decay": 0.0}, "weight_decay=0.0 is outside"),
    ],
)
def test_a_baseline_outside_the_space_is_refused_naming_it(change: dict, phrase: str) -> None:
    raw = {**TINY_STUDY, "baselines": [{**GOOD_BASELINE, **change}]}
    with pytest.raises(SpecError, match="baseline") as caught:
        spec.parse(raw, source="studies/tiny.yaml")
    assert phrase in str(caught.value)


def test_baselines_need_distinct_names() -> None:
    raw = {**TINY_STUDY, "baselines": [GOOD_BASELINE, {**GOOD_BASELINE, "lr": 0.1}]}
    with pytest.raises(SpecError, match="distinct names"):
        spec.parse(raw)


def test_the_smoke_study_baselines_show_every_path() -> None:
    """A diverging, a stuck and a pruned recipe next to a good one (each inside the space)."""
    loaded = spec.load("vgg-cifar-smoke", ROOT / "studies")
    assert [b.name for b in loaded.baselines] == [
        "known-good", "lr-too-high", "adam-no-bn", "lr-too-low"
    ]  # fmt: skip
    assert loaded.pruner.type == "median" and loaded.pruner.n_startup_trials == 2


@pytest.mark.parametrize(
    ("argument", "phrase"),
    [
        ("é" * 200, "File name too long"),
        ("two words", "neither a study name"),
        ("x" * 65, "neither a study name"),
        ("studies/" + "é" * 200 + ".yaml", "é.yaml"),
    ],
    ids=["200 é", "a space", "65 characters", "a path too long"],
)
def test_a_name_that_cannot_be_a_study_is_one_line(
    tmp_path: Path, argument: str, phrase: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for command in (["study", "create"], ["study", "status"], ["report"]):
        with pytest.raises(SystemExit) as info:
            main([*command, argument])
        err = capsys.readouterr().err
        assert info.value.code == 2, err
        assert err.startswith("error: ") and phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "mlruns").exists()


def test_yaml_merge_keys_are_not_keys_given_twice(tmp_path: Path) -> None:
    """`<<: *anchor` merges a mapping whose keys the mapping may override: YAML's own way of
    sharing settings, not a key given twice."""
    text = yaml.safe_dump(TINY_STUDY, sort_keys=False).replace(
        "    adam:\n      lr:\n", "    adam:\n      lr: &adam\n", 1
    )
    text = text.replace(
        "    adamw:\n      lr:\n        low: 1.0e-05\n",
        "    adamw:\n      lr:\n        <<: *adam\n        low: 2.0e-05\n",
        1,
    )
    assert "<<: *adam" in text
    path = tmp_path / "merged.yaml"
    path.write_text(text)
    loaded = spec.load(str(path))
    assert loaded.space.optimizer["adamw"].lr.low == 2.0e-05
    assert loaded.space.optimizer["adamw"].lr.high == loaded.space.optimizer["adam"].lr.high
    path.write_text(text.replace("        <<: *adam\n", "        <<: *adam\n        <<: *adam\n"))
    spec.load(str(path))  # two merges are no key given twice either


@pytest.mark.parametrize(
    ("typed", "hint"),
    [("1e-3", "write 1.0e-3"), ("1E5", "write 1.0e+5"), (".5e3", "write .5e+3"),
     ("-2e-4", "write -2.0e-4"), ("inf", None), ("nan", None), ("1e400", None),
     ("\u0661\u0662", None)],
)  # fmt: skip
def test_the_float_hint_is_a_fix_yaml_reads_as_a_number(typed: str, hint: str | None) -> None:
    """The hint's fix is a finite float when YAML reads it; no hint where none is."""
    said = spec._hint("float_type", typed)
    if hint is None:
        assert said == "", said
        return
    assert said.endswith(f"{hint})"), said
    fixed = said.rsplit("write ", 1)[1].rstrip(")")
    assert isinstance(yaml.safe_load(f"x: {fixed}")["x"], float)


def test_a_sampler_seed_is_any_int_hashed_into_each_trials_seed() -> None:
    """Only hashed (with the trial's number) into each trial's 32-bit seed: a seed of the
    sampler may be any int, as before; the study's own seed splits the data, and is 32-bit."""
    from tuner.study.setup import trial_seed

    for seed in (-5, 2**40):
        loaded = spec.parse({**TINY_STUDY, "sampler": {"type": "random", "seed": seed}})
        assert 0 <= trial_seed(loaded, 3) < 2**32


# -- model families and data sets ---------------------------------------------------------------

TRAINING_SPACE = {k: TINY_STUDY["space"][k] for k in ("optimizer", "weight_decay", "augment")}


def _family(model: object, space: dict, **more: object) -> dict:
    return {**TINY_STUDY, "model": model, "space": {**TRAINING_SPACE, **space}, **more}


FAMILY_BAD = {
    "not a family": (_family("resnet", {}), "model: not a model family", ""),
    "googlenet stages": (_family("googlenet", {"stages": [4]}), "space.stages.0", "less than or"),
    "vgg key in googlenet": (_family("googlenet", {"depth": ["vgg11"]}), "space.depth",
                             "it is vgg's: write `model: vgg`"),
    "googlenet key in vgg": (_family("vgg", {"stages": [1]}), "space.stages",
                             "it is googlenet's: write `model: googlenet`"),
    "a typo": (_family("vgg", {"dept": [1]}), "space.dept", "unknown key (a typo"),
    "not a name": (_family(["vgg"], {}), "model", "not a model family"),
    "builder path": (_family({"builder": "no colon"}, {}), "model.builder", "should match"),
    "builder parameter": (_family({"builder": "m:f"}, {"blocks": {"low": 1}}),
                          "space.blocks.high", "required key"),
    "builder reserved": (_family({"builder": "m:f"}, {"lr_x": [1]}), "space", "'lr_x' cannot"),
    "builder kind": (_family({"builder": "m:f"}, {"blocks": 3}), "space.blocks",
                     "a list of choices"),
    "baseline misses": (
        _family("googlenet", {}, baselines=[{"name": "b", "stages": 1, "width": 0.5,
                 "aux": False, "optimizer": "sgd", "lr": 0.01, "weight_decay": 1e-4,
                 "augment": "none"}]),
        "(top level): baseline 'b'", "dropout is missing"),
    "baseline type": (
        _family("vgg", {}, baselines=[{"name": "b", "depth": "vgg11", "batch_norm": 1,
                 "dropout": 0.0, "optimizer": "sgd", "lr": 0.01, "weight_decay": 1e-4,
                 "augment": "none"}]),
        "(top level): baseline 'b'", "batch_norm=1 is not among [True, False]"),
    "baseline foreign": (
        _family("vgg", {}, baselines=[{"name": "b", "depth": "vgg11", "batch_norm": True,
                 "dropout": 0.0, "stages": 2, "optimizer": "sgd", "lr": 0.01,
                 "weight_decay": 1e-4, "augment": "none"}]),
        "(top level): baseline 'b'", "stages is not a parameter of model 'vgg'"),
    "set and loader": ({**TINY_STUDY, "data": {"set": "cifar100", "loader": "m:f"}}, "data",
                       "give data.set or data.loader, not both"),
    "unknown set": ({**TINY_STUDY, "data": {"set": "mnist"}}, "data.set", "'fashion-mnist'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FAMILY_BAD))
def test_a_family_space_is_validated_against_the_family_chosen(case: str) -> None:
    raw, key, phrase = FAMILY_BAD[case]
    with pytest.raises(SpecError) as info:
        spec.parse(raw, source="s.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"s.yaml: {key}") and phrase in lines[0]


def test_a_family_left_unsaid_searches_its_defaults() -> None:
    loaded = spec.parse(_family("googlenet", {}))
    assert loaded.family == "googlenet" and loaded.builder is None
    assert set(loaded.space.model_params()) == {"stages", "width", "aux", "aux_weight",
                                                "dropout"}  # fmt: skip
    channels = {"low": 8, "high": 32, "step": 8}
    builder = spec.parse(_family({"builder": "examples.resnet:build"},
                                 {"blocks": [1, 2], "channels": channels}))  # fmt: skip
    assert builder.family == "builder" and builder.builder == "examples.resnet:build"
    assert set(builder.space.model_params()) == {"blocks", "channels"}


def test_studies_made_before_families_read_the_same() -> None:
    """A study file, and a study created, before `model` and `data.set` existed: the same spec
    today (no search-space change is seen)."""
    from tuner.study.setup import diff

    today = spec.load("vgg-cifar", Path("studies")).to_dict()
    before = {k: v for k, v in today.items() if k != "model"}
    before["data"] = {k: v for k, v in today["data"].items() if k not in ("set", "loader")}
    assert diff(spec.parse(before).to_dict(), today) == []
    assert today["model"] == "vgg" and today["data"]["set"] == "cifar10"


@pytest.mark.parametrize("name", ["googlenet-fashion", "googlenet-fashion-smoke",
                                  "vgg-cifar100", "vgg-cifar", "vgg-cifar-smoke"])  # fmt: skip
def test_shipped_study_files_load(name: str) -> None:
    loaded = spec.load(name, Path(__file__).resolve().parents[1] / "studies")
    assert loaded.name == name
