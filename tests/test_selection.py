"""Model selection never looks at a test split: every protocol of `evaluate.selection`, the
choice of a method's trial (argmax over trials on the protocol's validation data, ties to the
first listed) and of the WiSE-FT α (ties to the larger), the hyper-parameter edge report, and
the `selection` stage end to end on hand-built fine-tuning outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from pipeline import artifacts as paths
from pipeline.config import ParamsError, load_params
from pipeline.core.levels import parse_levels
from pipeline.data.datasets import DATASETS
from pipeline.data.sampling import FEWSHOT_VAL
from pipeline.evaluation.selection import (check_selection_split, edges, posthoc_of, resolve_protocol, search_posthoc,
                                           select_alpha, select_trial)
from pipeline.models.evalmodel import TunedClassifier

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("auto", "id_val", "ood_val", "fewshot_val", "none")


# ---------------------------------------------------------------------------------------------
# protocols: no protocol can read a test split


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_protocol_reads_a_test_split(name, protocol):
    spec = DATASETS[name]
    has = {"id_val": spec.id_val is not None, "ood_val": spec.ood_val is not None}
    if protocol in has and not has[protocol]:
        with pytest.raises(ParamsError) as err:
            resolve_protocol(protocol, spec, parse_levels([1, 4]))
        assert str(err.value).startswith("evaluate.selection"), str(err.value)
        assert repr(protocol) in str(err.value)
        return
    p = resolve_protocol(protocol, spec, parse_levels([1, 4]))
    assert p.split is None or p.split == FEWSHOT_VAL or "test" not in p.split, (protocol, p)
    if p.split not in (None, FEWSHOT_VAL):
        assert p.split in (*spec.id_splits, *spec.ood_splits)  # a real split of the dataset
        check_selection_split(p.split)
        assert p.key(spec.metric) == f"{p.split}/{spec.metric}"
    if protocol == "none":
        assert p.key(spec.metric) is None  # reads no score at all
    # post-hoc settings (Tip-Adapter's α, β): the protocol's split's choice, never a test split's
    everywhere = {f"posthoc/{s}/alpha": float(i) for i, s in enumerate((*spec.eval_splits, FEWSHOT_VAL))}
    chosen = posthoc_of(everywhere, p.split)
    assert chosen == ({} if p.split is None else {"alpha": everywhere[f"posthoc/{p.split}/alpha"]})
    if protocol == "auto":  # id_val where the dataset has one, else ood_val
        assert p.name == ("id_val" if has["id_val"] else "ood_val")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_the_finetune_stage_scores_only_validation_splits(name):
    splits = DATASETS[name].val_splits
    assert splits, "every dataset offers at least one validation split"
    assert all("test" not in s and "val" in s for s in splits), splits


def test_which_protocols_each_dataset_lacks():
    """RxRx1 and Waterbirds have no ID validation split: `auto` falls back to ood_val."""
    lacking = {n for n, s in DATASETS.items() if s.id_val is None}
    assert lacking == {"rxrx1", "waterbirds"}
    assert all(s.ood_val == "val" for s in DATASETS.values())
    assert resolve_protocol("auto", DATASETS["rxrx1"]).split == "val"
    assert resolve_protocol("auto", DATASETS["synthetic"]).split == "id_val"


def _fake_spec(id_splits, ood_splits):
    return dataclasses.replace(DATASETS["synthetic"], name="fake", id_splits=id_splits, ood_splits=ood_splits)


@pytest.mark.parametrize("protocol", ["auto", "id_val", "ood_val"])
def test_a_val_split_named_like_a_test_split_is_refused(protocol):
    """The only 'val' split of this dataset is called val_test: no protocol may read it."""
    spec = _fake_spec(id_splits=("id_test",), ood_splits=("val_test", "test"))
    assert spec.id_val is None and spec.ood_val is None
    assert spec.val_splits == ()
    with pytest.raises(ParamsError) as err:
        resolve_protocol(protocol, spec)
    assert str(err.value).startswith("evaluate.selection"), str(err.value)
    assert "fake" in str(err.value)
    with pytest.raises(ValueError, match="leak"):
        check_selection_split("val_test")


def test_a_dataset_without_val_splits_can_still_use_fewshot_val_or_none():
    spec = _fake_spec(id_splits=("id_test",), ood_splits=("val_test", "test"))
    assert resolve_protocol("fewshot_val", spec, parse_levels([1, "25%"])).split == FEWSHOT_VAL
    assert resolve_protocol("none", spec).split is None


def test_fewshot_val_needs_train_rows_to_hold_out():
    with pytest.raises(ParamsError, match=r"^evaluate\.selection: .*100%"):
        resolve_protocol("fewshot_val", DATASETS["synthetic"], parse_levels([4, "100%"]))
    # `100%` is fine for the protocols that read a dataset split
    assert resolve_protocol("id_val", DATASETS["synthetic"], parse_levels([4, "100%"])).split == "id_val"


@pytest.mark.parametrize("split", ["test", "id_test", "val_test"])
def test_selection_on_a_test_split_is_refused(split):
    with pytest.raises(ValueError, match="leak"):
        check_selection_split(split)
    with pytest.raises(ValueError, match="leak"):  # nor the post-hoc settings of a test split
        posthoc_of({f"posthoc/{split}/alpha": 1.0}, split)


@pytest.mark.parametrize("split", ["test", "id_test"])
def test_the_finetune_stage_searches_post_hoc_settings_on_validation_splits_only(split):
    """The finetune stage's post-hoc search (`_val_metrics`) refuses a test split before
    scoring anything."""
    from pipeline.stages.finetune import _val_metrics

    with pytest.raises(ValueError, match="leak"):
        _val_metrics(None, split, None, None, None)


class _AccuracyDataset:
    """The little of a WILDS dataset `split_metrics` reads; `eval` is plain accuracy, counted."""

    def __init__(self, y):
        self.y_array, self.metadata_array, self.calls = y, torch.zeros(len(y), 1, dtype=torch.long), 0

    def eval(self, y_pred, y_true, metadata):
        self.calls += 1
        return {"acc_avg": float((y_pred == y_true).float().mean())}, ""


def test_the_finetune_stage_post_hoc_search_is_the_validation_argmax():
    """`_val_metrics` on a cache classifier: the (β, α) of the best validation accuracy, the
    first in β-outer order among equals, found here by brute force; the split's scores are at
    that setting; repeated predictions are scored once."""
    import torch.nn.functional as F

    from pipeline.methods.tip_adapter import TipClassifier
    from pipeline.stages.finetune import _val_metrics

    g = torch.Generator().manual_seed(3)
    n, m, c, d = 40, 12, 4, 8
    f = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    keys = F.normalize(torch.randn(m, d, generator=g), dim=-1)
    head = 3 * F.normalize(torch.randn(c, d, generator=g), dim=-1)
    labels = torch.arange(m) % c
    y = torch.randint(c, (n,), generator=g)
    betas, alphas = (0.5, 2.0, 5.0), (0.0, 1.0, 4.0, 9.0)
    clf = TipClassifier(head, keys, F.one_hot(labels, c).float(), {"alpha": 1.0, "beta": 2.0},
                        ({"beta": betas, "alpha": alphas},))
    dataset = _AccuracyDataset(y)
    task = SimpleNamespace(dataset=dataset, spec=SimpleNamespace(metric="acc_avg"))
    out = _val_metrics(task, "id_val", f, clf, torch.arange(n))

    def accuracy(alpha, beta):  # the logits written out
        logits = (f @ head.t() + alpha * torch.exp(-beta * (1 - f @ keys.t())) @ F.one_hot(labels, c).float())
        return float((logits.argmax(1) == y).float().mean())

    table = {(b, a): accuracy(a, b) for b in betas for a in alphas}
    best = max(table.values())
    beta, alpha = next(k for k, v in table.items() if v == best)
    assert len(set(table.values())) > 1  # the grid matters
    assert (out["posthoc/id_val/beta"], out["posthoc/id_val/alpha"]) == (beta, alpha)
    assert out["id_val/acc_avg"] == pytest.approx(best)
    assert dataset.calls < len(table) + 1  # equal predictions are scored once


class _Table(TunedClassifier):
    """A post-hoc classifier whose score the test reads from a table: epoch first, then β × α."""

    search = ({"epoch": (1, 2, 3)}, {"beta": (0.5, 1.0), "alpha": (0.1, 0.2, 0.3)})

    def forward(self, features):
        raise AssertionError("the search scores through `score`")


def _key(setting):
    return (setting["epoch"], setting["beta"], setting["alpha"])


def test_post_hoc_search_follows_validation_stage_by_stage():
    rng = np.random.default_rng(0)
    grid = [(e, b, a) for e in (1, 2, 3) for b in (0.5, 1.0) for a in (0.1, 0.2, 0.3)]
    val = {k: float(rng.random()) for k in grid}
    test = {k: 1.0 - v for k, v in val.items()}  # the test split would choose otherwise
    clf = _Table({"epoch": 3, "beta": 1.0, "alpha": 0.2})
    setting, score = search_posthoc(clf, lambda c: val[_key(c.setting)])
    # independently: the epoch at the defaults, then β × α at that epoch
    epoch = max((1, 2, 3), key=lambda e: val[(e, 1.0, 0.2)])
    beta, alpha = max(((b, a) for b in (0.5, 1.0) for a in (0.1, 0.2, 0.3)), key=lambda ba: val[(epoch, *ba)])
    assert setting == {"epoch": epoch, "beta": beta, "alpha": alpha}
    assert score == val[(epoch, beta, alpha)]
    on_test, _ = search_posthoc(clf, lambda c: test[_key(c.setting)])
    assert on_test != setting
    assert clf.setting == {"epoch": 3, "beta": 1.0, "alpha": 0.2}  # the defaults stay the classifier's


def test_post_hoc_ties_and_nan_go_to_the_first_in_grid_order():
    clf = _Table({"epoch": 3, "beta": 1.0, "alpha": 0.2})
    flat, _ = search_posthoc(clf, lambda c: 0.5)
    assert flat == {"epoch": 1, "beta": 0.5, "alpha": 0.1}
    nan_first = {1: math.nan, 2: 0.4, 3: 0.4}
    chosen, _ = search_posthoc(clf, lambda c: nan_first[c.setting["epoch"]] if c.setting["alpha"] == 0.2
                               and c.setting["beta"] == 1.0 else 0.0)
    assert chosen["epoch"] == 2
    with pytest.raises(ValueError, match="unknown post-hoc"):
        clf.at(gamma=1.0)


# ---------------------------------------------------------------------------------------------
# the choice of trial and of α

# trial scores on the protocol's data: 3 trials (params.yaml order) × 4 seeds, with a tie
# (seed 1: a = b), a NaN (seed 2: a, whose real score would have won) and all NaN (seed 3)
ORDER = ["a", "b", "c"]
TABLE = {
    0: {"a": 0.50, "b": 0.70, "c": 0.60},
    1: {"a": 0.80, "b": 0.80, "c": 0.10},
    2: {"a": math.nan, "b": 0.30, "c": 0.40},
    3: {"a": math.nan, "b": math.nan, "c": math.nan},
}
EXPECTED = {0: "b", 1: "a", 2: "c", 3: "a"}


@pytest.mark.parametrize("seed", sorted(TABLE))
def test_selected_trial_is_the_argmax(seed):
    scores = TABLE[seed]
    chosen = select_trial(scores, ORDER)
    assert chosen == EXPECTED[seed]
    column = np.array([scores[t] for t in ORDER])
    if not np.isnan(column).all():  # numpy's nanargmax: the first of the maxima, NaN skipped
        assert chosen == ORDER[int(np.nanargmax(column))]


def test_ties_go_to_the_trial_listed_first_not_the_dict_order():
    scores = {"a": 0.8, "b": 0.8, "c": 0.1}
    assert select_trial(scores, ["a", "b", "c"]) == "a"
    assert select_trial(scores, ["b", "a", "c"]) == "b"
    assert select_trial({"b": 0.1}, ["a", "b"]) == "b"  # a trial without a score never wins
    with pytest.raises(ValueError):
        select_trial({}, [])


def test_selected_alpha_follows_validation_not_test():
    per_alpha = {
        0.0: {"id_val/acc_avg": 0.50, "test/acc_avg": 0.90},
        0.5: {"id_val/acc_avg": 0.70, "test/acc_avg": 0.60},
        1.0: {"id_val/acc_avg": 0.65, "test/acc_avg": 0.40},
    }
    assert select_alpha({a: m["id_val/acc_avg"] for a, m in per_alpha.items()}) == 0.5


def test_alpha_ties_prefer_the_fine_tuned_end():
    assert select_alpha({0.0: 0.5, 0.5: 0.7, 1.0: 0.7}) == 1.0
    assert select_alpha({0.0: 0.7, 0.25: 0.7, 0.5: 0.6, 1.0: 0.2}) == 0.25
    assert select_alpha({1.0: 0.3, 0.75: 0.3, 0.0: 0.3}) == 1.0  # whatever the dict order


# ---------------------------------------------------------------------------------------------
# edges: the chosen value is the smallest or largest tried

TRIED = [
    {"lr": 3e-5, "weight_decay": 0.1, "warmup_steps": 6, "use_avl": True, "loss": "ce"},
    {"lr": 1e-4, "weight_decay": 0.1, "warmup_steps": 6, "use_avl": False, "loss": "ce"},
    {"lr": 3e-4, "weight_decay": 0.1, "warmup_steps": 6, "use_avl": True, "loss": "mpm_nce"},
]


def test_edges_name_the_smallest_and_largest_tried():
    assert edges(TRIED[0], TRIED) == ["lr=3e-05 is the smallest tried"]
    assert edges(TRIED[2], TRIED) == ["lr=0.0003 is the largest tried"]


def test_edges_ignore_interior_values_and_settings_that_do_not_vary():
    # weight_decay and warmup_steps are the same in every trial; booleans and strings are
    # not ranges: none of them is reported, nor the interior lr
    assert edges(TRIED[1], TRIED) == []
    assert edges(TRIED[0], TRIED[:1]) == []  # one trial: nothing varies


def test_edges_report_every_varied_setting_at_an_edge():
    tried = [{"lam": 10.0, "lr": 1e-4}, {"lam": 100.0, "lr": 1e-4}, {"lam": 100.0, "lr": 3e-5}]
    assert edges(tried[1], tried) == ["lam=100 is the largest tried", "lr=0.0001 is the largest tried"]
    assert edges(tried[2], tried) == ["lam=100 is the largest tried", "lr=3e-05 is the smallest tried"]


# ---------------------------------------------------------------------------------------------
# the `selection` stage end to end on hand-built finetune outputs

TRIALS = {
    "ft-lr3e-5": {"method": "ft", "lr": 3.0e-5},
    "ft-lr1e-4": {"method": "ft", "lr": 1.0e-4},
    "ft-lr3e-4": {"method": "ft", "lr": 3.0e-4},
    "lp-lr1e-3": {"method": "lp", "lr": 1.0e-3},
    "lp-lr1e-2": {"method": "lp", "lr": 1.0e-2},
}
LEVELS = [1, "25%"]
SEEDS = [0, 1]
SPLITS = ("id_val", "val", FEWSHOT_VAL)


def _score(trial: str, level: str, seed: int, split: str) -> float:
    """Per-cell scores; each protocol's winner differs, and the ID test split (which
    scores.json never holds in the real pipeline) would pick yet another."""
    names = [t for t in TRIALS if TRIALS[t]["method"] == TRIALS[trial]["method"]]
    i = names.index(trial)
    rank = {"id_val": [1, 2, 0], "val": [2, 0, 1], FEWSHOT_VAL: [0, 1, 2], "id_test": [0, 0, 3]}[split]
    rank = rank[: len(names)]
    return 0.1 * rank[(i + seed) % len(names)] + (0.01 if level == "25%" else 0.0)


def _expected(method: str, level: str, seed: int, split: str, table) -> str:
    names = [t for t in TRIALS if TRIALS[t]["method"] == method]
    column = np.array([table[(t, level, seed)][f"{split}/acc_avg"] for t in names])
    return names[int(np.nanargmax(column))]


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A project folder: params.yaml (2 methods, 5 trials, 2 levels, 2 seeds) and every
    runs/finetune/<trial>/<level>/seed<S>/ the selection stage reads."""
    from pipeline.core.validation import to_dict
    from pipeline.methods import parse_hparams

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["dataset"]["name"] = "synthetic"
    raw["finetune"]["methods"] = ["ft", "lp"]
    raw["finetune"]["trials"] = TRIALS
    raw["finetune"]["search"] = {}
    raw["sample"] = {"levels": LEVELS, "seeds": SEEDS}

    def write_params(selection: str) -> Path:
        raw["evaluate"]["selection"] = selection
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return tmp_path / "params.yaml"

    table, sha = {}, {}
    for trial, spec in TRIALS.items():
        overrides = {k: v for k, v in spec.items() if k != "method"}
        hparams = to_dict(parse_hparams(spec["method"], overrides))
        for level in map(str, LEVELS):
            for seed in SEEDS:
                d = paths.finetune_dir(trial, level, seed)
                d.mkdir(parents=True)
                scores = {f"{split}/acc_avg": _score(trial, level, seed, split) for split in SPLITS}
                scores["val/F1-macro_all"] = 1.0  # another metric: never the one selected on
                table[(trial, level, seed)] = scores
                (d / paths.SCORES).write_text(json.dumps(scores))
                (d / paths.CONFIG).write_text(json.dumps({"trial": trial, "hparams": hparams}))
                weights = f"{trial}/{level}/{seed}".encode() * 7
                (d / paths.WEIGHTS).write_bytes(weights)
                sha[(trial, level, seed)] = hashlib.sha256(weights).hexdigest()
    return {"root": tmp_path, "write_params": write_params, "table": table, "sha": sha}


@pytest.mark.parametrize("selection, split", [("auto", "id_val"), ("id_val", "id_val"),
                                               ("ood_val", "val"), ("fewshot_val", FEWSHOT_VAL)])
def test_selection_stage_picks_the_argmax_per_seed(project, selection, split):
    from pipeline.stages import selection as stage

    params = load_params(project["write_params"](selection))
    records = stage.run(params)
    assert [(r["method"], r["level"]) for r in records] == [
        ("ft", "1"), ("ft", "25%"), ("lp", "1"), ("lp", "25%")]
    table = project["table"]
    for r in records:
        method, level = r["method"], r["level"]
        assert r["split"] == split and r["score_key"] == f"{split}/acc_avg" and r["metric"] == "acc_avg"
        assert r["trials"] == [t for t in TRIALS if TRIALS[t]["method"] == method]
        assert sorted(r["seeds"]) == [str(s) for s in SEEDS]
        for seed in SEEDS:
            cell = r["seeds"][str(seed)]
            want = _expected(method, level, seed, split, table)
            assert cell["trial"] == want, (method, level, seed)
            assert cell["score"] == pytest.approx(table[(want, level, seed)][f"{split}/acc_avg"])
            assert cell["scores"] == {t: pytest.approx(table[(t, level, seed)][f"{split}/acc_avg"])
                                      for t in r["trials"]}
            assert cell["weights_sha256"] == project["sha"][(want, level, seed)]
            assert cell["hparams"]["lr"] == TRIALS[want]["lr"]
            lrs = sorted(TRIALS[t]["lr"] for t in r["trials"])
            lr = TRIALS[want]["lr"]
            edge = ([f"lr={lr:g} is the smallest tried"] if lr == lrs[0] else
                    [f"lr={lr:g} is the largest tried"] if lr == lrs[-1] else [])
            assert cell["edges"] == edge  # only lr varies between the trials
        on_disk = json.loads((project["root"] / paths.select_file(method, level)).read_text())
        assert on_disk == json.loads(json.dumps(r))
    # the protocols disagree on this table, so the choice really follows the protocol
    chosen = {(r["method"], r["level"], s): r["seeds"][str(s)]["trial"] for r in records for s in SEEDS}
    other = "val" if split != "val" else "id_val"
    assert any(chosen[(m, lv, s)] != _expected(m, lv, s, other, table) for (m, lv, s) in chosen)


def test_selection_stage_ignores_a_decoy_test_score(project):
    """A test score in scores.json (the real stage never writes one) cannot sway the choice."""
    from pipeline.stages import selection as stage

    for (trial, level, seed), scores in project["table"].items():
        d = paths.finetune_dir(trial, level, seed)
        decoy = {**scores, "id_test/acc_avg": _score(trial, level, seed, "id_test"),
                 "test/acc_avg": _score(trial, level, seed, "id_test")}
        (d / paths.SCORES).write_text(json.dumps(decoy))
    records = stage.run(load_params(project["write_params"]("id_val")))
    for r in records:
        for seed in SEEDS:
            assert r["seeds"][str(seed)]["trial"] == _expected(r["method"], r["level"], seed, "id_val",
                                                               project["table"])


@pytest.mark.parametrize("selection, split", [("id_val", "id_val"), ("ood_val", "val"),
                                               ("fewshot_val", FEWSHOT_VAL), ("none", None)])
def test_selection_stage_carries_the_protocols_post_hoc_settings(project, selection, split):
    """The chosen trial's post-hoc settings (finetune's `posthoc/<split>/<name>`) of the
    protocol's split go into the record; decoy test-split settings never do; `none`: {}."""
    from pipeline.stages import selection as stage

    value = {s: 0.1 * (i + 1) for i, s in enumerate((*SPLITS, "id_test", "test"))}
    for (trial, level, seed), scores in project["table"].items():
        posthoc = {f"posthoc/{s}/{name}": v + (1 if name == "beta" else 0) for s, v in value.items()
                   for name in ("alpha", "beta")}
        (paths.finetune_dir(trial, level, seed) / paths.SCORES).write_text(json.dumps({**scores, **posthoc}))
    for r in stage.run(load_params(project["write_params"](selection))):
        for seed in SEEDS:
            got = r["seeds"][str(seed)]["posthoc"]
            assert got == ({} if split is None else {"alpha": value[split], "beta": value[split] + 1}), got


def test_selection_stage_protocol_none_takes_the_first_trial(project):
    from pipeline.stages import selection as stage

    records = stage.run(load_params(project["write_params"]("none")))
    first = {"ft": "ft-lr3e-5", "lp": "lp-lr1e-3"}
    for r in records:
        assert r["protocol"] == "none" and r["split"] is None and r["score_key"] is None
        for seed in SEEDS:
            cell = r["seeds"][str(seed)]
            assert cell["trial"] == first[r["method"]]
            assert cell["score"] is None and cell["scores"] == {} and cell["edges"] == []
            assert cell["weights_sha256"] == project["sha"][(first[r["method"]], r["level"], seed)]


def test_selection_stage_nan_scores_go_to_the_first_trial(project):
    from pipeline.stages import selection as stage

    for trial in ("ft-lr3e-5", "ft-lr1e-4", "ft-lr3e-4"):
        d = paths.finetune_dir(trial, "1", 0)
        scores = json.loads((d / paths.SCORES).read_text())
        (d / paths.SCORES).write_text(json.dumps({**scores, "id_val/acc_avg": math.nan}))
    records = stage.run(load_params(project["write_params"]("id_val")))
    cell = next(r for r in records if (r["method"], r["level"]) == ("ft", "1"))["seeds"]["0"]
    assert cell["trial"] == "ft-lr3e-5" and cell["score"] is None


def test_selection_stage_names_the_dvc_target_of_a_missing_score(project):
    from pipeline.stages import selection as stage

    (paths.finetune_dir("ft-lr1e-4", "25%", 1) / paths.SCORES).unlink()
    with pytest.raises(FileNotFoundError) as err:
        stage.run(load_params(project["write_params"]("auto")))
    assert "dvc repro finetune@ft-lr1e-4-25%" in str(err.value)
    assert not (project["root"] / paths.SELECT).exists()  # no half-finished selection


def test_selection_stage_refuses_scores_without_the_protocol_key(project):
    from pipeline.stages import selection as stage

    d = paths.finetune_dir("lp-lr1e-2", "1", 0)
    scores = json.loads((d / paths.SCORES).read_text())
    del scores["val/acc_avg"]
    (d / paths.SCORES).write_text(json.dumps(scores))
    with pytest.raises(ValueError, match=r"'val/acc_avg'.*dvc repro finetune@lp-lr1e-2-1"):
        stage.run(load_params(project["write_params"]("ood_val")))


# ---------------------------------------------------------------------------------------------
# trials drawn by finetune.search: the same stage, the same guarantee (no test split), the edge of
# the *space*, and the report's search section on the records


SEARCH = {"ft": {"space": {"weight_decay": [0.0, 0.1], "lr": {"loguniform": [1.0e-5, 1.0e-3]}}, "n": 3},
          "lp": {"space": {"lr": {"loguniform": [1.0e-3, 1.0e-1]}}, "sampler": "sobol", "n": 4}}


@pytest.fixture()
def searched(tmp_path, monkeypatch):
    """params.yaml with two searches (a grid × loguniform, a Sobol loguniform) and the finetune
    outputs of every drawn trial: validation scores that peak at one trial, a decoy test score
    that peaks at another (the real stage never writes one)."""
    from pipeline.core.validation import to_dict
    from pipeline.methods import parse_hparams

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"].update(methods=["ft", "lp"], trials={}, search=SEARCH)
    raw["sample"] = {"levels": [1], "seeds": SEEDS}
    raw["evaluate"]["selection"] = "id_val"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(tmp_path / "params.yaml")
    trials = params.finetune.all_trials
    assert len(trials) == 2 * 3 + 4
    val, test = {}, {}
    for i, (trial, spec) in enumerate(trials.items()):
        method = spec["method"]
        hp = to_dict(parse_hparams(method, {k: v for k, v in spec.items() if k != "method"}))
        for seed in SEEDS:
            # validation peaks at the trial with the smallest lr (an edge trial when it lies in the
            # outer 1/(2n) of the space); the decoy test score at the largest lr
            val[(trial, seed)] = -math.log10(spec["lr"]) / 10 + 0.001 * seed
            test[(trial, seed)] = math.log10(spec["lr"])
            d = paths.finetune_dir(trial, "1", seed)
            d.mkdir(parents=True)
            (d / paths.SCORES).write_text(json.dumps({"id_val/acc_avg": val[(trial, seed)],
                                                      "id_test/acc_avg": test[(trial, seed)],
                                                      "test/acc_avg": test[(trial, seed)]}))
            (d / paths.CONFIG).write_text(json.dumps({"trial": trial, "hparams": hp}))
            (d / paths.WEIGHTS).write_bytes(f"{trial}/{seed}".encode())
    return params, val


def test_trials_of_a_search_are_chosen_on_validation_never_test(searched):
    from pipeline.core.search import edge
    from pipeline.stages import selection as stage

    params, val = searched
    records = stage.run(params)
    for r in records:
        trials = params.finetune.trials_of(r["method"])
        assert r["trials"] == trials and set(r["origin"].values()) == {r["method"]}
        assert r["searches"][r["method"]]["n"] == SEARCH[r["method"]]["n"]
        for seed in SEEDS:
            cell = r["seeds"][str(seed)]
            want = max(trials, key=lambda t: val[(t, seed)])  # independent argmax on validation
            assert cell["trial"] == want and cell["scores"] == {t: pytest.approx(val[(t, seed)]) for t in trials}
            lr = params.finetune.all_trials[want]["lr"]
            s = params.finetune.searches[r["method"]]
            expect = [e[1] for d in s.dims if (e := edge(d, r["hparams"][want][d.key], s.n))]
            assert cell["edges"] == expect
            lo = SEARCH[r["method"]]["space"]["lr"]["loguniform"][0]
            zone = (math.log(lr) - math.log(lo)) / math.log(100)  # both spaces span two decades
            assert any(e.startswith("lr=") for e in cell["edges"]) == (zone <= 1 / (2 * s.n))


def test_the_report_shows_the_search(searched):
    from pipeline.report.search import plot_search, search_report
    from pipeline.report.tables import _md_table
    from pipeline.stages import selection as stage

    params, val = searched
    records = stage.run(params)
    md, plots, long = search_report(records, lambda name: f"k={name}", _md_table)
    text = "\n".join(md)
    assert "## Search" in text
    assert "**ft**: `ft` weight_decay ∈ [0, 0.1]; lr ~ loguniform[1e-05, 0.001] (random, n = 3), 6 trials" in text
    assert "**lp**: `lp` lr ~ loguniform[0.001, 0.1] (sobol, n = 4), 4 trials" in text
    for r in records:  # the chosen value of every seed is in the table
        for cell in r["seeds"].values():
            assert f"| {cell['trial']} " in text
            assert f"{r['hparams'][cell['trial']]['lr']:.3g}" in text
    assert [p.name for p in plots] == ["search_ft.png", "search_lp.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    # log x for the log-uniform lr; linear for the weight-decay grid
    assert plot_search(records, "ft", str, plots[0]) == ["linear", "log"]
    assert len(long) == (6 + 4) * len(SEEDS) and long["chosen"].sum() == 2 * len(SEEDS)
