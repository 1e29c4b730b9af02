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


# hand-written trials (finetune.trials), beside or instead of the default's searches
HAND = {
    "lp-lr1e-3": {"method": "lp", "lr": 1.0e-3}, "lp-lr1e-2": {"method": "lp", "lr": 1.0e-2},
    "ft-lr3e-5": {"method": "ft", "lr": 3.0e-5}, "ft-lr1e-4": {"method": "ft", "lr": 1.0e-4},
    "flyp-lr3e-5": {"method": "flyp", "lr": 3.0e-5}, "flyp-lr1e-4": {"method": "flyp", "lr": 1.0e-4},
    "dive-lam10": {"method": "dive", "lam": 10.0}, "dive-lam100": {"method": "dive", "lam": 100.0},
    "vision_lp-lr3e-3": {"method": "vision_lp", "lr": 3.0e-3}, "vision_lp-lr1e-2": {"method": "vision_lp", "lr": 1.0e-2},
    "vision_ft-lr1e-4": {"method": "vision_ft", "lr": 1.0e-4}, "vision_ft-lr3e-4": {"method": "vision_ft", "lr": 3.0e-4},
}


def base() -> dict:
    """The default params.yaml with hand-written trials instead of its searches."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"]["search"] = {}
    raw["finetune"]["trials"] = {k: dict(v) for k, v in HAND.items()}
    return raw


def test_default_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.dataset.name == "synthetic"
    assert [lv.name for lv in params.sample.parsed_levels] == ["1", "16"]
    assert params.sample.seeds == (0, 1, 2)
    assert not params.finetune.trials and set(params.finetune.searches) == set(params.finetune.methods)
    for name in params.finetune.all_trials:
        method, overrides = params.finetune.trial(name)
        assert method in params.finetune.methods
        parse_hparams(method, overrides, f"finetune.search.{method}.space")
    for m in params.finetune.methods:
        assert len(params.finetune.trials_of(m)) >= 2, f"{m}: the default search space tries 2+ values"


def _only_trials(d: dict, trials: dict) -> None:
    """Replace the search space (and finetune.methods with the trials' methods, listed order)."""
    d["finetune"]["methods"] = list(dict.fromkeys(t["method"] for t in trials.values()))
    d["finetune"]["trials"] = trials


@pytest.mark.parametrize("mutate, key, fragment", [
    (lambda d: d.update(bogus=1), "bogus", "unknown key"),
    (lambda d: d["dataset"].update(nmae="x"), "dataset.nmae", "unknown key"),
    (lambda d: d["dataset"].update(name="imagenet"), "dataset.name", "allowed"),
    # sample.levels: k shots (positive integers) or shares of the train split ("25%")
    (lambda d: d["sample"].update(levels=[0, 4]), "sample.levels[0]", "positive integer"),
    (lambda d: d["sample"].update(levels=[-2]), "sample.levels[0]", "positive integer"),
    (lambda d: d["sample"].update(levels=[]), "sample.levels", "at least one"),
    (lambda d: d["sample"].update(levels=[4, 4, 8]), "sample.levels", "same level"),
    (lambda d: d["sample"].update(levels=["25%", "25.0%"]), "sample.levels", "same level"),
    (lambda d: d["sample"].update(levels="four"), "sample.levels", "not a list"),
    (lambda d: d["sample"].update(levels=[1.5]), "sample.levels[0]", "is not a"),
    (lambda d: d["sample"].update(levels=[True]), "sample.levels[0]", "is not a"),
    (lambda d: d["sample"].update(levels=["150%"]), "sample.levels[0]", "(0%, 100%]"),
    (lambda d: d["sample"].update(levels=["0%"]), "sample.levels[0]", "(0%, 100%]"),
    (lambda d: d["sample"].update(levels=["many"]), "sample.levels[0]", "percentage"),
    (lambda d: d["sample"].update(shots=[1, 4]), "sample.shots", "unknown key"),  # the old key
    (lambda d: d["sample"].update(seeds=[1, 1]), "sample.seeds", "repeated"),
    (lambda d: d["sample"].update(seeds=[]), "sample.seeds", "at least one"),
    (lambda d: d["sample"].update(seeds=[-1]), "sample.seeds", "non-negative"),
    (lambda d: _only_trials(d, {"ft-a": {"method": "ft"}, "sgd-a": {"method": "sgd"}}),
     "finetune.methods", "allowed"),
    (lambda d: d["finetune"].update(methods=[]), "finetune.methods", "at least one"),
    (lambda d: d["finetune"].update(methods=["ft", "ft", "lp"]), "finetune.methods", "repeated"),
    # the training budget: epochs bounded by [min_steps, max_steps]
    (lambda d: d["finetune"]["train"].update(epochs=0), "finetune.train.epochs", "positive"),
    (lambda d: d["finetune"]["train"].update(epochs=-1.5), "finetune.train.epochs", "positive"),
    (lambda d: d["finetune"]["train"].update(epochs="ten"), "finetune.train.epochs", "not a number"),
    (lambda d: d["finetune"]["train"].update(epochs=True), "finetune.train.epochs", "not a number"),
    (lambda d: d["finetune"]["train"].update(min_steps=0), "finetune.train.min_steps", "positive"),
    (lambda d: d["finetune"]["train"].update(min_steps=1.5), "finetune.train.min_steps", "not an integer"),
    (lambda d: d["finetune"]["train"].update(max_steps=10), "finetune.train.max_steps", "min_steps (30)"),
    (lambda d: d["finetune"]["train"].update(max_steps=True), "finetune.train.max_steps", "not an integer"),
    (lambda d: d["finetune"]["train"].update(steps=60), "finetune.train.steps", "unknown key"),  # the old key
    (lambda d: d["finetune"]["train"].update(precision="fp8"), "finetune.train.precision", "allowed"),
    (lambda d: d["finetune"]["train"].update(grad_accum=5), "finetune.train.grad_accum", "divide"),
    (lambda d: d["finetune"]["train"].update(prompt_memory_mb=0), "finetune.train.prompt_memory_mb", "MiB"),
    (lambda d: d["finetune"]["train"].update(prompt_memory_mb=0.5), "finetune.train.prompt_memory_mb",
     "not an integer"),
    # trials: each a method of finetune.methods and overrides of its Hparams
    (lambda d: d["finetune"]["trials"]["ft-lr1e-4"].update(lrr=1), "finetune.trials.ft-lr1e-4.lrr",
     "unknown key"),
    (lambda d: d["finetune"]["trials"]["ft-lr1e-4"].update(lr="fast"), "finetune.trials.ft-lr1e-4.lr",
     "not a number"),
    (lambda d: d["finetune"]["trials"]["dive-lam10"].update(lam=True), "finetune.trials.dive-lam10.lam",
     "not a number"),
    (lambda d: d["finetune"]["trials"]["dive-lam10"].update(momentum=1.5),
     "finetune.trials.dive-lam10.momentum", "[0, 1)"),
    # a trial of a method that is no method at all, and one of a method not compared
    (lambda d: d["finetune"]["trials"].update({"sgd-a": {"method": "sgd", "lr": 1.0}}),
     "finetune.trials.sgd-a.method", "is not a registered method"),
    (lambda d: d["finetune"]["trials"].update({"lora-r4": {"method": "lora", "rank": 4}}),
     "finetune.trials.lora-r4.method", "must be in finetune.methods"),
    (lambda d: d["finetune"]["trials"].update({"x": {"lr": 1.0e-3}}), "finetune.trials.x.method",
     "names its method"),
    (lambda d: d["finetune"]["trials"].update({"x": 3}), "finetune.trials.x", "mapping"),
    # a compared method without a trial
    (lambda d: d["finetune"]["methods"].append("lora"), "finetune.methods", "at least one trial"),
    (lambda d: d["finetune"]["trials"].update({"a b": {"method": "ft"}}), "finetune.trials", "'a b'"),
    (lambda d: d["finetune"]["trials"].update({"ft/x": {"method": "ft"}}), "finetune.trials", "letters"),
    (lambda d: d["finetune"].update(hparams={"ft": {"lr": 1e-4}}), "finetune.hparams", "unknown key"),
    # the selection protocol: never a test split; fewshot_val needs train rows to hold out
    (lambda d: d["evaluate"].update(selection="test"), "evaluate.selection", "allowed: auto"),
    (lambda d: d["evaluate"].update(selection="bogus"), "evaluate.selection", "allowed: auto"),
    (lambda d: (d["evaluate"].update(selection="fewshot_val"), d["sample"].update(levels=[4, "100%"])),
     "evaluate.selection", "100%"),
    (lambda d: d["evaluate"].update(wise_alphas=[0.5, 1.5]), "evaluate.wise_alphas", "[0, 1]"),
    (lambda d: d["evaluate"].update(wise_alphas=[0.0, 0.5]), "evaluate.wise_alphas", "include 1.0"),
    (lambda d: d["retention"].update(tasks="everything"), "retention.tasks", "auto"),
    (lambda d: d["evaluate"].update(zs_tasks="auto"), "evaluate.zs_tasks", "unknown key"),
    (lambda d: d["prepare"].update(synthetic={"n_trian": 5}), "prepare.synthetic.n_trian", "unknown key"),
    (lambda d: d["pretrained"].update(builtin={"stepz": 5}), "pretrained.builtin.stepz", "unknown key"),
    (lambda d: d.update(seeds=[0, 1]), "seeds", "unknown key"),
    (lambda d: d["prepare"].update(imagenet={}), "prepare.imagenet", "generated datasets"),
    (lambda d: d["retention"].update(tasks=3), "retention.tasks", "is not a"),
])
def test_bad_params_name_the_key(tmp_path, mutate, key, fragment):
    data = base()
    mutate(data)
    with pytest.raises(ParamsError) as err:
        check_params(write(tmp_path, data))
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert fragment in msg, msg


def test_every_trial_is_checked_not_only_the_first(tmp_path):
    """A bad value in the second trial of a method is found too (each trial is parsed)."""
    data = base()
    data["finetune"]["trials"]["ft-lr1e-4"]["weight_decay"] = "lots"
    with pytest.raises(ParamsError) as err:
        check_params(write(tmp_path, data))
    assert str(err.value).startswith("finetune.trials.ft-lr1e-4.weight_decay"), str(err.value)


@pytest.mark.parametrize("selection", ["auto", "id_val", "ood_val", "fewshot_val", "none"])
def test_every_protocol_is_accepted_for_the_default_dataset(tmp_path, selection):
    data = base()
    data["evaluate"]["selection"] = selection
    data["sample"]["levels"] = [1, "25%"]
    params = check_params(write(tmp_path, data))
    assert params.evaluate.selection == selection
    assert [lv.kind for lv in params.sample.parsed_levels] == ["shots", "fraction"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not found"):
        check_params(tmp_path / "nope.yaml")


def test_numeric_strings_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; DVC (YAML 1.2) as a number: accept both."""
    data = base()
    data["finetune"]["trials"]["ft-lr1e-4"]["lr"] = "1e-4"
    params = check_params(write(tmp_path, data))
    method, overrides = params.finetune.trial("ft-lr1e-4")
    assert parse_hparams(method, overrides).lr == 1e-4


def test_params_yaml_equals_the_schema_defaults():
    """One source for every default: a key left out of params.yaml means what params.yaml says,
    the search space (finetune.search = DEFAULT_SEARCH, in the same order) included."""
    from pipeline.config import DEFAULT_SEARCH, Params
    from pipeline.core.validation import to_dict

    defaults, listed = to_dict(Params()), to_dict(load_params(ROOT / "params.yaml"))
    for d in (defaults, listed):
        d["prepare"] = {k: v for k, v in d["prepare"].items() if v}  # `synthetic: {}` = defaults
    assert listed == defaults
    assert list(listed["finetune"]["search"]) == list(DEFAULT_SEARCH)  # the order of the trials
    assert listed["finetune"]["search"] == DEFAULT_SEARCH and listed["finetune"]["trials"] == {}
