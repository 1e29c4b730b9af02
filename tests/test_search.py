"""Search spaces (`finetune.search`, `pipeline.core.search`): seeded, prefix-stable draws, the
grid × distribution crossing, trial names DVC accepts, validation, the edge of a space, and the
generated trials file the check stage compares with params.yaml."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from pathlib import Path

import pytest
import yaml

from pipeline.config import FinetuneParams, ParamsError, TRIAL_NAME, draw_trials, load_params
from pipeline.core.search import edge, expand, parse_search, value_label
from pipeline.core.validation import parse

ROOT = Path(__file__).resolve().parents[1]


def _search(space: dict, n=None, sampler="random", seed=0, name="ft", method=None) -> dict:
    raw = {"space": space, "sampler": sampler, "seed": seed}
    if n is not None:
        raw["n"] = n
    if method is not None:
        raw["method"] = method
    return raw


def _trials(name: str, raw: dict) -> dict:
    return expand(parse_search(name, raw))


# ---------------------------------------------------------------------------------------------
# draws: seeded and prefix-stable


@pytest.mark.parametrize("sampler", ["random", "sobol"])
def test_raising_n_keeps_the_first_draws_names_and_values(sampler):
    space = {"lr": {"loguniform": [1.0e-5, 1.0e-3]}, "weight_decay": {"uniform": [0.0, 0.3]},
             "warmup_steps": {"int": [0, 20]}}
    eight = _trials("ft", _search(space, 8, sampler))
    sixteen = _trials("ft", _search(space, 16, sampler))
    assert len(eight) == 8 and len(sixteen) == 16
    assert list(sixteen.items())[:8] == list(eight.items())  # names and values, in order
    assert len({tuple(v.items()) for v in sixteen.values()}) == 16  # 16 distinct draws
    # seeded: the same again, another seed or search name draws other values
    assert _trials("ft", _search(space, 8, sampler)) == eight
    assert list(_trials("ft", _search(space, 8, sampler, seed=1)).values()) != list(eight.values())
    assert list(_trials("ft2", _search(space, 8, sampler, method="ft")).values()) != list(eight.values())


def test_random_draws_follow_the_documented_per_index_seed():
    """Draw i of `key` is random.Random(SHA-256(seed, search, i, key)).random() mapped to the
    distribution, kept to 3 significant digits: an independent re-implementation agrees."""
    lo, hi = 1.0e-5, 1.0e-3
    got = _trials("ft", _search({"lr": {"loguniform": [lo, hi]}, "warmup_steps": {"int": [0, 9]}}, 5, seed=3))
    for i, spec in enumerate(got.values()):
        def u(key):
            h = hashlib.sha256("\0".join(map(str, (3, "ft", i, key))).encode()).digest()
            return random.Random(int.from_bytes(h[:8], "big")).random()
        lr = math.exp(math.log(lo) + u("lr") * (math.log(hi) - math.log(lo)))
        assert spec["lr"] == pytest.approx(float(f"{lr:.3g}"))
        assert spec["warmup_steps"] == min(int(u("warmup_steps") * 10), 9)


def test_sobol_draws_are_the_first_points_of_one_scrambled_sequence():
    """Sobol: the first n points of `scipy.stats.qmc.Sobol(d, scramble=True, seed=...)`; with
    n = 4 each quarter of the (log) range holds exactly one draw: the balance random lacks."""
    lo, hi = 1.0e-4, 1.0e0
    got = _trials("lp", _search({"lr": {"loguniform": [lo, hi]}}, 4, "sobol"))
    quarters = sorted(int(4 * (math.log10(v["lr"]) - math.log10(lo)) / 4) for v in got.values())
    assert quarters == [0, 1, 2, 3]


def test_a_dimension_added_to_a_random_search_keeps_the_other_dimensions_draws():
    one = _trials("ft", _search({"lr": {"loguniform": [1.0e-5, 1.0e-3]}}, 4))
    two = _trials("ft", _search({"lr": {"loguniform": [1.0e-5, 1.0e-3]}, "weight_decay": {"uniform": [0.0, 0.2]}}, 4))
    assert [v["lr"] for v in one.values()] == [v["lr"] for v in two.values()]


def test_draws_stay_inside_their_bounds_with_the_documented_mapping():
    got = _trials("dive", _search({"lam": {"loguniform": [1.0, 1000.0]}, "momentum": {"uniform": [0.9, 0.999]},
                                   "ref_batch_size": {"int": [2, 4]}, "use_avl": {"choice": [True, False]}}, 64),
                  )
    for v in got.values():
        assert 1.0 <= v["lam"] <= 1000.0 and 0.9 <= v["momentum"] <= 0.999
        assert v["ref_batch_size"] in (2, 3, 4) and isinstance(v["ref_batch_size"], int)
        assert v["use_avl"] in (True, False)
    assert {v["ref_batch_size"] for v in got.values()} == {2, 3, 4}  # both ends of an int range are drawn
    assert {v["use_avl"] for v in got.values()} == {True, False}


# ---------------------------------------------------------------------------------------------
# grid × distributions


def test_a_grid_crossed_with_draws_expands_as_documented():
    """Every grid point (the product of the lists, the first list varying slowest) is crossed
    with the same n draws: |grid| · n trials, named <search>-<i>-<summary>."""
    space = {"weight_decay": [0.0, 0.1], "lr": {"loguniform": [1.0e-5, 1.0e-3]}, "warmup_steps": [0, 6, 12]}
    got = _trials("ft", _search(space, 3))
    draws = [v["lr"] for v in _trials("ft", _search({"lr": {"loguniform": [1.0e-5, 1.0e-3]}}, 3)).values()]
    want = [(wd, lr, ws) for wd, ws in itertools.product([0.0, 0.1], [0, 6, 12]) for lr in draws]
    assert [(v["weight_decay"], v["lr"], v["warmup_steps"]) for v in got.values()] == want
    assert len(got) == 2 * 3 * 3
    first = next(iter(got))
    assert first == f"ft-0-weight_decay0-lr{value_label(draws[0])}-warmup_steps0"
    assert all(v["method"] == "ft" for v in got.values())


def test_a_grid_alone_takes_no_n_and_names_by_value():
    got = _trials("lp", {"space": {"lr": [1.0e-3, 1.0e-2, 3.0e-2]}})
    assert list(got) == ["lp-lr1e-3", "lp-lr1e-2", "lp-lr3e-2"]
    assert [v["lr"] for v in got.values()] == [1.0e-3, 1.0e-2, 3.0e-2]


@pytest.mark.parametrize("value, label", [(0.0021, "21e-4"), (2.05e-5, "21e-6"), (37.2, "37"), (1000.0, "1000"),
                                          (0.5, "5e-1"), (1.0e-4, "1e-4"), (12, "12"), (True, "true"), (0.0, "0"),
                                          (1.0e6, "1e6"), ("a.b", "a_b")])
def test_value_labels_have_no_dot(value, label):
    assert value_label(value) == label


def test_every_trial_name_is_a_valid_dvc_params_key():
    got = _trials("ft", _search({"lr": {"loguniform": [1.0e-7, 1.0e7]}, "weight_decay": {"uniform": [0.0, 1.0]}}, 64))
    assert all(TRIAL_NAME.match(t) and "." not in t for t in got)


# ---------------------------------------------------------------------------------------------
# validation: one line naming the key and what is allowed


SHAPE_CASES = [
    ({"space": {"lr": {"loguniform": [1.0e-3, 1.0e-5]}}, "n": 2}, r"finetune\.search\.s\.space\.lr\.loguniform: .*lo < hi"),
    ({"space": {"lr": {"loguniform": [0.0, 1.0e-3]}}, "n": 2}, r"space\.lr\.loguniform: .*are positive"),
    ({"space": {"lr": {"uniform": [1.0, 1.0]}}, "n": 2}, r"space\.lr\.uniform: .*lo < hi"),
    ({"space": {"lr": {"uniform": [1.0]}}, "n": 2}, r"space\.lr\.uniform: .*\[lo, hi\]"),
    ({"space": {"warmup_steps": {"int": [0, 2.5]}}, "n": 2}, r"space\.warmup_steps\.int: .*integers"),
    ({"space": {"lr": {"normal": [0, 1]}}, "n": 2}, r"space\.lr\.normal: unknown distribution; allowed: loguniform, uniform, int, choice"),
    ({"space": {"lr": {"choice": [1.0e-3]}}, "n": 2}, r"space\.lr\.choice: .*at least two options"),
    ({"space": {"lr": []}}, r"space\.lr: .*at least one value"),
    ({"space": {"lr": [1.0e-3, 1.0e-3]}}, r"space\.lr: .*each grid value once"),
    ({"space": {"lr": {"uniform": [0.1, 0.2]}}, "n": 2, "sampler": "halton"}, r"finetune\.search\.s\.sampler: 'halton' .*allowed: random, sobol"),
    ({"space": {"lr": {"uniform": [0.1, 0.2]}}}, r"finetune\.search\.s\.n: None .*number of draws of lr"),
    ({"space": {"lr": {"uniform": [0.1, 0.2]}}, "n": 0}, r"finetune\.search\.s\.n: 0 "),
    ({"space": {"lr": [0.1, 0.2]}, "n": 4}, r"finetune\.search\.s\.n: 4 .*grid"),
    ({"space": {}, "n": 4}, r"finetune\.search\.s\.space: \{\} "),
    ({"space": {"lr": [0.1]}, "draws": 4}, r"finetune\.search\.s\.draws: unknown key\. Allowed keys in finetune\.search\.s: method, space, n, sampler, seed"),
    ({"space": {"lr": [0.1]}, "seed": -1}, r"finetune\.search\.s\.seed: -1"),
]


@pytest.mark.parametrize("raw, message", SHAPE_CASES)
def test_a_bad_search_is_one_line_naming_the_key(raw, message):
    import re

    with pytest.raises(ParamsError) as err:
        parse(FinetuneParams, {"methods": ["ft", "s"], "search": {"s": {**raw, "method": "ft"}},
                               "trials": {"s-default": {"method": "s"}}})
    assert re.search(message, str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


def test_a_trial_name_clash_is_refused():
    with pytest.raises(ParamsError, match=r"finetune\.search\.lp: its trial 'lp-lr1e-3' is also a hand-written trial"):
        draw_trials({"lp-lr1e-3": {"method": "lp"}}, {"lp": parse_search("lp", {"space": {"lr": [1.0e-3]}})})


def test_a_search_of_a_method_not_compared_is_refused():
    with pytest.raises(ParamsError, match=r"finetune\.search\.flyp: 'flyp' is not allowed; the method \(the search's name"):
        parse(FinetuneParams, {"methods": ["ft"], "search": {"ft": {"space": {"lr": [1.0e-4]}},
                                                              "flyp": {"space": {"lr": [1.0e-4]}}}})


def _check_message(tmp_path, monkeypatch, capsys, search: dict) -> str:
    from pipeline.cli import main

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"]["search"].update(search)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["check", "--params", str(tmp_path / "params.yaml")])
    assert done.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "data").exists()  # nothing written
    return err


def test_check_refuses_a_hyper_parameter_the_method_does_not_have(tmp_path, monkeypatch, capsys):
    err = _check_message(tmp_path, monkeypatch, capsys, {"ft": {"space": {"lrr": {"loguniform": [1.0e-5, 1.0e-3]}},
                                                                 "n": 2}})
    assert "finetune.search.ft.space.lrr: unknown key (did you mean finetune.search.ft.space.lr?)" in err
    assert "Allowed keys in finetune.search.ft.space: lr, warmup_steps, weight_decay" in err


def test_check_refuses_a_bound_the_method_refuses(tmp_path, monkeypatch, capsys):
    err = _check_message(tmp_path, monkeypatch, capsys, {"ft": {"space": {"weight_decay": {"uniform": [-0.1, 0.1]}},
                                                                 "n": 2}})
    assert err.startswith("error: finetune.search.ft.space.weight_decay: -0.1 must be >= 0"), err


def test_check_refuses_an_unregistered_method(tmp_path, monkeypatch, capsys):
    err = _check_message(tmp_path, monkeypatch, capsys, {"x": {"method": "flypp", "space": {"lr": [1.0e-4]}}})
    assert "finetune.search.x.method: 'flypp' is not a registered method (did you mean flyp?)" in err


# ---------------------------------------------------------------------------------------------
# the edge of the space (the report's "widen the search")


def test_the_edge_is_the_spaces_not_the_draws():
    s = parse_search("ft", {"space": {"lr": {"loguniform": [1.0e-5, 1.0e-1]}, "warmup_steps": [0, 6, 12]}, "n": 4})
    lr, ws = s.dims[0], s.dims[1]
    # n = 4: the outer 1/8 of 4 decades is half a decade at each end (log scale)
    assert edge(lr, 3.0e-5, 4)[0] == "low" and edge(lr, 4.0e-5, 4) is None  # 10^-4.5 = 3.16e-5
    assert edge(lr, 5.0e-2, 4)[0] == "high" and edge(lr, 2.0e-2, 4) is None
    assert "lowest 1/8 (log scale) of lr ~ loguniform[1e-05, 0.1]" in edge(lr, 1.0e-5, 4)[1]
    assert edge(ws, 0, 4)[0] == "low" and edge(ws, 12, 4)[0] == "high" and edge(ws, 6, 4) is None
    u = parse_search("x", {"space": {"weight_decay": {"uniform": [0.0, 1.0]}}, "n": 2}).dims[0]
    assert edge(u, 0.2, 2)[0] == "low" and edge(u, 0.3, 2) is None and edge(u, 0.8, 2)[0] == "high"
    c = parse_search("x", {"space": {"mode": {"choice": ["a", "b"]}}, "n": 2}).dims[0]
    assert edge(c, "a", 2) is None  # categories have no edge


def test_space_edges_of_a_drawn_trial_and_of_a_hand_written_one():
    from pipeline.evaluation.selection import space_edges

    searches = {"ft": parse_search("ft", {"space": {"lr": {"loguniform": [1.0e-5, 1.0e-3]}}, "n": 2})}
    hparams = {"ft-0": {"lr": 1.1e-5}, "ft-1": {"lr": 1.0e-4}, "h-a": {"lr": 5.0e-4}, "h-b": {"lr": 9.0e-4}}
    origin = {"ft-0": "ft", "ft-1": "ft", "h-a": None, "h-b": None}
    assert space_edges("ft-0", hparams, origin, searches) == [
        "lr=1.1e-05 is in the lowest 1/4 (log scale) of lr ~ loguniform[1e-05, 0.001]"]
    # the smallest value drawn, but in the middle of the space: no edge
    assert space_edges("ft-1", hparams, origin, searches) == []
    # hand-written: the edge of the hand-written list
    assert space_edges("h-b", hparams, origin, searches) == ["lr=0.0009 is the largest tried"]
    # a second search of the method reaching below widens the space: no longer an edge
    searches["ft-low"] = parse_search("ft-low", {"method": "ft", "space": {"lr": {"loguniform": [1.0e-7, 1.0e-5]}},
                                                 "n": 2})
    origin["ft-low-0"] = "ft-low"
    hparams["ft-low-0"] = {"lr": 1.0e-6}
    assert space_edges("ft-0", hparams, origin, searches) == []


# ---------------------------------------------------------------------------------------------
# the generated trials file


def test_the_committed_trials_file_matches_the_default_params(tmp_path):
    """trials.yaml at the root is what `python -m pipeline search` writes for params.yaml."""
    from pipeline.config import render_generated

    params = load_params(ROOT / "params.yaml")
    assert (ROOT / "trials.yaml").read_text() == render_generated(params.finetune)
    assert len(params.finetune.all_trials) == 12  # the default's budget: 12 trials, as before the search


def test_check_refuses_a_stale_trials_file_naming_the_command(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:  # no trials.yaml at all
        main(["check"])
    assert done.value.code == 1
    assert "trials.yaml: the generated trials file is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["search"])
    assert done.value.code in (0, None)
    assert "trials.yaml: 12 trials (written)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["check"])
    assert done.value.code in (0, None), capsys.readouterr().err
    capsys.readouterr()
    raw["finetune"]["search"]["ft"]["n"] = 3  # edited params.yaml, trials.yaml not regenerated
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SystemExit) as done:
        main(["check", "--write"])
    assert done.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "trials.yaml: out of date with finetune.trials and finetune.search" in err and "missing: ft-2-" in err
    assert "run `python -m pipeline search`" in err
    assert not (tmp_path / "data").exists()  # refused before any work
    # a hand-edited value is refused too
    main_ok = tmp_path / "trials.yaml"
    with pytest.raises(SystemExit):
        main(["search"])
    capsys.readouterr()
    text = main_ok.read_text()
    data = yaml.safe_load(text)
    first = next(iter(data["trials"]))
    data["trials"][first]["lr"] = 0.5
    main_ok.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SystemExit) as done:
        main(["check"])
    assert done.value.code == 1 and f"other values: {first}" in capsys.readouterr().err


def test_stages_read_the_generated_trials_instead_of_drawing(tmp_path, monkeypatch):
    """A trials file of this spec is read as it is (no sampler runs); one of another spec is
    ignored and the trials are drawn."""
    from pipeline.config import render_generated

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(tmp_path / "params.yaml")
    text = render_generated(params.finetune)
    name = next(iter(params.finetune.all_trials))
    marked = text.replace(f"{name}: {{method: lp, lr: ", f"{name}: {{method: lp, marker: 1, lr: ")
    assert marked != text
    (tmp_path / "trials.yaml").write_text(marked)
    assert load_params(tmp_path / "params.yaml").finetune.all_trials[name].get("marker") == 1  # read, not drawn
    raw["finetune"]["search"]["lp"]["seed"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    drawn = load_params(tmp_path / "params.yaml").finetune.all_trials
    assert name not in drawn and all("marker" not in v for v in drawn.values())
