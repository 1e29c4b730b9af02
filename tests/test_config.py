"""Bad params.yaml values are rejected before any work, naming the key: by the `check` stage,
which DVC runs before every stage that owns outputs (its `check_params` = the shape checks of
`pipeline.config.load_params` plus every registry)."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params
from pipeline.methods import parse_hparams
from pipeline.stages.check import check_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.dataset.name == "synthetic"
    assert params.sample.shots == (1, 4, 16)
    for m in params.finetune.methods:
        parse_hparams(m, params.finetune.hparams.get(m))


@pytest.mark.parametrize("mutate, key, fragment", [
    (lambda d: d.update(bogus=1), "bogus", "unknown key"),
    (lambda d: d["dataset"].update(nmae="x"), "dataset.nmae", "unknown key"),
    (lambda d: d["dataset"].update(name="imagenet"), "dataset.name", "allowed"),
    (lambda d: d["sample"].update(shots=[0, 4]), "sample.shots", "positive"),
    (lambda d: d["sample"].update(shots=[-2]), "sample.shots", "positive"),
    (lambda d: d["sample"].update(shots=[]), "sample.shots", "at least one"),
    (lambda d: d["sample"].update(shots=[4, 4, 8]), "sample.shots", "repeated"),
    (lambda d: d["sample"].update(shots="four"), "sample.shots", "not a list"),
    (lambda d: d["sample"].update(shots=[1.5]), "sample.shots[0]", "not an integer"),
    (lambda d: d["sample"].update(seeds=[1, 1]), "sample.seeds", "repeated"),
    (lambda d: d["finetune"].update(methods=["ft", "sgd"]), "finetune.methods", "allowed"),
    (lambda d: d["finetune"].update(methods=[]), "finetune.methods", "at least one"),
    (lambda d: d["finetune"]["train"].update(steps=0), "finetune.train.steps", "positive"),
    (lambda d: d["finetune"]["train"].update(steps="ten"), "finetune.train.steps", "not an integer"),
    (lambda d: d["finetune"]["train"].update(precision="fp8"), "finetune.train.precision", "allowed"),
    (lambda d: d["finetune"]["train"].update(grad_accum=5), "finetune.train.grad_accum", "divide"),
    (lambda d: d["finetune"]["train"].update(prompt_memory_mb=0), "finetune.train.prompt_memory_mb", "MiB"),
    (lambda d: d["finetune"]["train"].update(prompt_memory_mb=0.5), "finetune.train.prompt_memory_mb",
     "not an integer"),
    (lambda d: d["finetune"]["hparams"]["ft"].update(lrr=1), "finetune.hparams.ft.lrr", "unknown key"),
    (lambda d: d["finetune"]["hparams"]["ft"].update(lr="fast"), "finetune.hparams.ft.lr", "not a number"),
    (lambda d: d["finetune"]["hparams"].update(sgd={}), "finetune.hparams.sgd", "named after methods"),
    (lambda d: d["evaluate"].update(wise_alphas=[0.5, 1.5]), "evaluate.wise_alphas", "[0, 1]"),
    (lambda d: d["evaluate"].update(zs_tasks="everything"), "evaluate.zs_tasks", "auto"),
    (lambda d: d["prepare"].update(synthetic={"n_trian": 5}), "prepare.synthetic.n_trian", "unknown key"),
    (lambda d: d["pretrained"].update(builtin={"stepz": 5}), "pretrained.builtin.stepz", "unknown key"),
    # a typo inside the hparams of a method that is not in finetune.methods
    (lambda d: d["finetune"]["hparams"]["lora"].update(rnak=4), "finetune.hparams.lora.rnak", "unknown key"),
    (lambda d: d["finetune"]["train"].update(steps=True), "finetune.train.steps", "not an integer"),
    (lambda d: d["finetune"]["hparams"]["dive"].update(lam=True), "finetune.hparams.dive.lam", "not a number"),
    (lambda d: d.update(seeds=[0, 1]), "seeds", "unknown key"),
    (lambda d: d["prepare"].update(imagenet={}), "prepare.imagenet", "generated datasets"),
    (lambda d: d["evaluate"].update(zs_tasks=3), "evaluate.zs_tasks", "is not a"),
])
def test_bad_params_name_the_key(tmp_path, mutate, key, fragment):
    data = base()
    mutate(data)
    with pytest.raises(ParamsError) as err:
        check_params(write(tmp_path, data))
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert fragment in msg, msg


def test_method_hparam_value_checked(tmp_path):
    data = base()
    data["finetune"]["hparams"]["dive"]["momentum"] = 1.5
    with pytest.raises(ParamsError) as err:
        check_params(write(tmp_path, data))
    assert str(err.value).startswith("finetune.hparams.dive.momentum"), str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not found"):
        check_params(tmp_path / "nope.yaml")


def test_numeric_strings_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; DVC (YAML 1.2) as a number: accept both."""
    data = base()
    data["finetune"]["hparams"]["ft"]["lr"] = "1e-4"
    params = check_params(write(tmp_path, data))
    assert parse_hparams("ft", params.finetune.hparams["ft"]).lr == 1e-4


def test_params_yaml_equals_the_schema_defaults():
    """One source for every default: a key left out of params.yaml means what params.yaml says.
    (Per-method sections mirror the methods' Hparams: tests/test_methods.py.)"""
    from pipeline.config import Params
    from pipeline.core.validation import to_dict

    defaults, listed = to_dict(Params()), to_dict(load_params(ROOT / "params.yaml"))
    for d in (defaults, listed):
        d["finetune"].pop("hparams")
        d["prepare"] = {k: v for k, v in d["prepare"].items() if v}  # `synthetic: {}` = defaults
    assert listed == defaults
