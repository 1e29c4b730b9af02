"""Bad params.yaml values are rejected before any work, naming the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params

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
        params.method_hparams(m)


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
])
def test_bad_params_name_the_key(tmp_path, mutate, key, fragment):
    data = base()
    mutate(data)
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, data))
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert fragment in msg, msg


def test_method_hparam_value_checked(tmp_path):
    data = base()
    data["finetune"]["hparams"]["dive"]["momentum"] = 1.5
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, data))
    assert str(err.value).startswith("finetune.hparams.dive.momentum"), str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
