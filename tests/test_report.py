"""The report stage: tables, plots, DVC metrics and the MLflow summary run from fake inputs.

The inputs are well-formed stand-ins for what `embed`, `selection` and `evaluate` write: the
zero-shot level in data/embed/metrics.json; per method × level the selection record
runs/select/<method>/<level>.json (the trial each seed chose, its scores and any edge of the
search); and per method × level × seed runs/evaluate/<method>/<level>/seed<S>/metrics.json
(with a WiSE-FT sweep for `ft`) and selection.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import pipeline  # noqa: F401  (offline environment setup)
from pipeline import artifacts as paths, report
from pipeline.config import load_params
from pipeline.core.levels import parse_level
from pipeline.core.validation import to_dict
from pipeline.data.datasets import get_spec
from pipeline.evaluation.selection import edges as search_edges
from pipeline.methods import parse_hparams
from pipeline.report.inputs import level_key

METHODS = ("ft", "flyp")
LEVELS = (1, 4, "25%")
SEEDS = (0, 1, 2)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_CLASSES = 4  # k shots per class -> k * N_CLASSES training examples
TRAIN_SIZE = 400  # "25%" -> 100 training examples
# two trials per method (only lr differs): either choice is on an edge of the search
LRS = (3e-5, 1e-4)

# the retention tasks of the fake runs: (pre-trained accuracy, best constant guess, images); the
# model is at chance on texture, so the report flags it and leaves it out of the mean
ZS_TASKS = {"synthetic/heldout-shapes": (0.7, 0.25, 800), "synthetic/colour": (0.6, 1 / 6, 1000),
            "synthetic/texture": (0.255, 0.25, 1000)}
INFORMATIVE = ("synthetic/heldout-shapes", "synthetic/colour")

# the headline keys of each dataset (DatasetSpec: last ID split, last OOD split, metric) and
# what `evaluate.selection: auto` resolves to (id_val where the dataset has one, else ood_val)
HEAD = {
    "synthetic": {"id": "id_test/acc_avg", "ood": "test/acc_avg", "select": "id_val/acc_avg",
                  "protocol": "id_val", "zs": ("synthetic/heldout-shapes", "synthetic/colour", "synthetic/texture")},
    "waterbirds": {"id": None, "ood": "test/acc_wg", "select": "val/acc_wg", "protocol": "ood_val",
                   "zs": ()},
}


def n_train(level) -> int:
    lv = parse_level(level)
    return lv.shots * N_CLASSES if lv.kind == "shots" else int(round(lv.fraction * TRAIN_SIZE))


def lrs_trials(method: str, lrs=LRS) -> list[tuple[str, dict]]:
    return [(f"{method}-lr{lr:.0e}".replace("e-0", "e-"), {"lr": lr}) for lr in lrs]


def default_trials(methods) -> dict[str, list[tuple[str, dict]]]:
    """method -> [(trial name, hparam overrides)] (zeroshot has no hparams: one trial)."""
    return {m: [("zeroshot-default", {})] if m == "zeroshot" else lrs_trials(m) for m in methods}


def default_choice(method: str, level: str, seed: int, n: int) -> int:
    """Which trial a seed chose: ft the first except seed 1 (counts 2 + 1), others the last."""
    if method == "ft":
        return 1 if seed == 1 else 0
    return n - 1


def zeroshot_metrics(dataset: str) -> dict[str, float]:
    h = HEAD[dataset]
    m = {h["ood"]: 0.46, h["select"]: 0.5, "iimm": 0.31 if dataset == "synthetic" else 0.42,
         "iimm/s_intra": 0.4, "iimm/s_inter": 0.22, "silhouette/modality": 0.8,
         "silhouette/class": 0.05, "test/acc_worst_domain": 0.3}
    if h["id"]:
        m[h["id"]] = 0.55
    for t in h["zs"]:
        m[f"zs/{t}/acc"] = ZS_TASKS[t][0]
    return m


def model_metrics(dataset: str, method: str, level, seed: int, alpha: float = 1.0) -> dict[str, float]:
    """A deterministic, plausible fine-tuned model: ID rises with the training examples,
    retention and RSA fall; alpha interpolates from the zero-shot numbers (alpha = 0) to the
    fine-tuned ones."""
    h = HEAD[dataset]
    zs = zeroshot_metrics(dataset)
    lk = math.log2(n_train(level) / N_CLASSES) + 1
    gain = {"zeroshot": 0.0, "ft": 0.08, "flyp": 0.07, "lp": 0.05, "lpft": 0.075, "dive": 0.065}[method] * lk + 0.01 * seed
    bump = 4 * alpha * (1 - alpha) * 0.08  # WiSE-FT: the middle of the curve beats both ends
    m = {h["ood"]: zs[h["ood"]] + alpha * (0.3 * gain) + bump,
         h["select"]: zs[h["select"]] + alpha * (0.3 * gain) + bump,
         "rsa/image": 1 - alpha * {"ft": 0.12, "dive": 0.01}.get(method, 0.08) * lk - 0.005 * seed,
         "rsa/text": 1 - alpha * {"ft": 0.02, "dive": 0.005}.get(method, 0.1) * lk}
    if h["id"]:
        m[h["id"]] = zs[h["id"]] + alpha * gain + bump / 2
    for t in h["zs"]:
        m[f"zs/{t}/acc"] = zs[f"zs/{t}/acc"] - alpha * {"ft": 0.05, "dive": 0.004}.get(method, 0.03) * lk - 0.01 * seed
    return m


def trial_retention(dataset: str, method: str, level, seed: int, names: list[str]) -> dict[str, dict[str, float]]:
    """Each trial's retention accuracies (as finetune's scores.json): trial i forgets 0.02 · i more."""
    base = model_metrics(dataset, method, level, seed)
    return {t: {f"zs/{z}/acc": base[f"zs/{z}/acc"] - 0.02 * i for z in HEAD[dataset]["zs"]}
            for i, t in enumerate(names)}


def trial_scores(dataset: str, method: str, level, seed: int, names: list[str], chosen: int) -> dict[str, float]:
    """The trials' validation scores (alpha = 1): the chosen trial has the highest."""
    base = model_metrics(dataset, method, level, seed)[HEAD[dataset]["select"]]
    return {t: base - 0.01 * abs(i - chosen) for i, t in enumerate(names)}


def eval_metrics(dataset: str, method: str, level, seed: int, wise: bool, score: float = math.nan,
                 n_trials: int = 2) -> dict[str, float]:
    h = HEAD[dataset]
    base = model_metrics(dataset, method, level, seed)
    out = dict(base)
    alphas = ALPHAS if wise else (1.0,)
    per = {a: model_metrics(dataset, method, level, seed, a) for a in alphas}
    if wise:
        for a, m in per.items():
            out.update({f"wise/{a:g}/{key}": v for key, v in m.items()})
    best = max(alphas, key=lambda a: (per[a][h["select"]], a))
    out["selected/alpha"] = best
    out.update({f"selected/{key}": v for key, v in per[best].items()})
    if not math.isnan(score):
        out["selection/score"] = score
    out["selection/trials"] = n_trials
    n = n_train(level)
    out["train/n_train"] = n
    out["train/steps"] = max(30, min(300, n))
    out["train/trainable_params"] = 1000.0 if method == "ft" else 2000.0
    out["train/trainable_share"] = 0.5 if method == "ft" else 1.0
    out["train/wall_time_s"] = 10.0 * n + seed
    return out


def write_inputs(root: Path, dataset: str = "synthetic", methods=METHODS, levels=LEVELS,
                 seeds=SEEDS, wise_methods=("ft",), trials=None, choose=default_choice) -> Path:
    """params.yaml plus every input file of the report under `root`; returns params.yaml.

    `trials`: method -> [(trial name, overrides)]; `choose(method, level, seed, n)`: the index
    of the trial that seed chose. Edges are computed as the selection stage does."""
    trials = trials or default_trials(methods)
    h = HEAD[dataset]
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    base["dataset"]["name"] = dataset
    base["finetune"]["methods"] = list(methods)
    base["finetune"]["trials"] = {name: {"method": m, **over} for m in methods for name, over in trials[m]}
    base["finetune"]["search"] = {}
    base["sample"] = {"levels": list(levels), "seeds": list(seeds)}
    pfile = root / "params.yaml"
    pfile.write_text(yaml.safe_dump(base, sort_keys=False))
    (root / paths.EMBED).mkdir(parents=True, exist_ok=True)
    (root / paths.EMBED_METRICS).write_text(json.dumps(zeroshot_metrics(dataset)))
    (root / paths.PREPARED).mkdir(parents=True, exist_ok=True)
    (root / paths.PREPARED_RETENTION).write_text(json.dumps({"tasks": [
        {"name": t, "kind": "dataset", "n_samples": ZS_TASKS[t][2], "n_classes": round(1 / ZS_TASKS[t][1]),
         "majority": ZS_TASKS[t][1]} for t in h["zs"]]}))
    split, metric = h["select"].split("/")
    for m in methods:
        names = [name for name, _ in trials[m]]
        hps = {name: to_dict(parse_hparams(m, over)) for name, over in trials[m]}
        for level in levels:
            lv = parse_level(level)
            record = {"method": m, "level": lv.name, "protocol": h["protocol"], "split": split,
                      "metric": metric, "score_key": h["select"], "trials": names, "seeds": {}}
            for s in seeds:
                c = choose(m, lv.name, s, len(names))
                trial = names[c]
                scores = trial_scores(dataset, m, level, s, names, c)
                edge = search_edges(hps[trial], list(hps.values()))
                record["seeds"][str(s)] = {"trial": trial, "score": scores[trial], "scores": scores,
                                           "hparams": hps[trial], "edges": edge,
                                           "weights_sha256": f"{m}{lv.name}{s}".encode().hex(),
                                           "retention": trial_retention(dataset, m, level, s, names)}
                d = root / paths.evaluate_dir(m, lv.name, s)
                d.mkdir(parents=True, exist_ok=True)
                met = eval_metrics(dataset, m, level, s, wise=m in wise_methods, score=scores[trial],
                                   n_trials=len(names))
                (d / paths.EVAL_METRICS).write_text(json.dumps(met))
                (d / paths.EVAL_SELECTION).write_text(json.dumps({
                    "protocol": h["protocol"], "split": split, "metric": metric, "trial": trial,
                    "score": scores[trial], "trials": names, "scores": scores, "edges": edge,
                    "hparams": hps[trial], "alpha": met["selected/alpha"],
                    "alphas": list(ALPHAS if m in wise_methods else (1.0,)), "level": lv.name,
                    "level_kind": lv.kind, "seed": s, "n_train": n_train(level), "headline": metric}))
            sel = root / paths.select_file(m, lv.name)
            sel.parent.mkdir(parents=True, exist_ok=True)
            sel.write_text(json.dumps(record))
    return pfile


def chosen_trial(method: str, level, seed: int, trials=None) -> str:
    names = [n for n, _ in (trials or default_trials(METHODS))[method]]
    return names[default_choice(method, parse_level(level).name, seed, len(names))]


def read_csv(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"level": str})


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One full report of synthetic: 2 methods × 3 levels (1, 4, 25%) × 3 seeds, two trials per
    method (ft with a WiSE-FT sweep)."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        params = load_params(write_inputs(root))
        flat = report.run(report.ReportConfig.of(params))
        yield {"root": root, "params": params, "flat": flat,
               "uri": f"sqlite:///{root / 'mlflow.db'}"}


def assert_runs_are_the_inputs(runs: pd.DataFrame) -> None:
    """`runs` (runs.csv, or `read_runs` in memory) holds one row per run with the values
    computed here from the fake inputs, not from the report's own reading of them."""
    assert list(runs.columns) == list(report.columns())
    assert list(report.columns())[:6] == ["dataset", "method", "level", "level_kind", "seed", "trial"]
    assert len(runs) == 1 + len(METHODS) * len(LEVELS) * len(SEEDS)
    z = runs[runs["method"] == "zeroshot"]
    assert len(z) == 1 and z["level"].iloc[0] == "0" and pd.isna(z["seed"].iloc[0])
    assert z["level_kind"].iloc[0] == "shots" and z["trial"].fillna("").iloc[0] == ""  # ("" reads back as NaN)
    zm = zeroshot_metrics("synthetic")
    assert z["id"].iloc[0] == pytest.approx(zm["id_test/acc_avg"])
    assert z["ood"].iloc[0] == pytest.approx(zm["test/acc_avg"])
    assert z["zs"].iloc[0] == pytest.approx(np.mean([v[0] for v in ZS_TASKS.values()]))
    assert z["rsa_image"].iloc[0] == 1.0 and z["rsa_text"].iloc[0] == 1.0
    assert z["n_train"].iloc[0] == 0 and pd.isna(z["selection_score"].iloc[0])
    for m in METHODS:
        for lv in LEVELS:
            for s in SEEDS:
                r = runs[(runs["method"] == m) & (runs["level"] == str(lv)) & (runs["seed"] == s)]
                assert len(r) == 1
                r = r.iloc[0]
                assert r["dataset"] == "synthetic"
                assert r["level_kind"] == ("fraction" if lv == "25%" else "shots")
                assert r["trial"] == chosen_trial(m, lv, s)
                names = [n for n, _ in default_trials(METHODS)[m]]
                c = names.index(r["trial"])
                score = trial_scores("synthetic", m, lv, s, names, c)[r["trial"]]
                e = eval_metrics("synthetic", m, lv, s, wise=m == "ft", score=score)
                assert r["id"] == pytest.approx(e["id_test/acc_avg"])
                assert r["ood"] == pytest.approx(e["test/acc_avg"])
                assert r["zs"] == pytest.approx(np.mean([e[f"zs/{t}/acc"] for t in ZS_TASKS]))
                assert r["rsa_image"] == pytest.approx(e["rsa/image"])
                assert r["rsa_text"] == pytest.approx(e["rsa/text"])
                assert r["selected_alpha"] == pytest.approx(e["selected/alpha"])
                assert r["selected_id"] == pytest.approx(e["selected/id_test/acc_avg"])
                assert r["selected_ood"] == pytest.approx(e["selected/test/acc_avg"])
                assert r["selection_score"] == pytest.approx(e["selection/score"])
                assert r["n_train"] == n_train(lv)
                assert r["train_steps"] == e["train/steps"]
                assert r["trainable_share"] == pytest.approx(e["train/trainable_share"])
                assert r["wall_time_s"] == pytest.approx(e["train/wall_time_s"])
    # the sweep mattered: ft picks an interior α, flyp (no sweep) reports α = 1
    assert set(runs.loc[runs["method"] == "flyp", "selected_alpha"]) == {1.0}
    assert (runs.loc[runs["method"] == "ft", "selected_alpha"] < 1.0).all()


def test_runs_csv_one_row_per_run(done):
    assert_runs_are_the_inputs(read_csv(done["root"] / report.RUNS_CSV))


def test_read_runs_gives_the_inputs_and_the_csv(done, monkeypatch):
    """`read_runs` (the report's public reader of the inputs) against values computed from
    the inputs, then the round trip through runs.csv."""
    monkeypatch.chdir(done["root"])
    df = report.read_runs(report.ReportConfig.of(done["params"]))
    assert_runs_are_the_inputs(df)
    csv = read_csv(done["root"] / report.RUNS_CSV)
    assert len(df) == len(csv)
    assert list(df["method"]) == list(csv["method"]) and list(df["level"]) == list(csv["level"])
    assert list(df["trial"].fillna("")) == list(csv["trial"].fillna(""))
    for col in report.values():
        np.testing.assert_allclose(df[col].to_numpy(float), csv[col].to_numpy(float), err_msg=col)


def test_summary_mean_and_std_over_seeds(done):
    summ = read_csv(done["root"] / report.SUMMARY_CSV)
    assert len(summ) == 1 + len(METHODS) * len(LEVELS)
    # zero-shot first, then params order, levels shots by k then fractions
    assert list(zip(summ["method"], summ["level"])) == [
        ("zeroshot", "0"), ("ft", "1"), ("ft", "4"), ("ft", "25%"),
        ("flyp", "1"), ("flyp", "4"), ("flyp", "25%")]
    z = summ[summ["method"] == "zeroshot"].iloc[0]
    assert z["level"] == "0" and z["seeds"] == 1 and z["id_std"] == 0.0 and pd.isna(z["id_ci"])
    for m in METHODS:
        for lv in LEVELS:
            r = summ[(summ["method"] == m) & (summ["level"] == str(lv))].iloc[0]
            assert r["seeds"] == len(SEEDS)
            for col, key in (("id", "id_test/acc_avg"), ("ood", "test/acc_avg"),
                             ("rsa_image", "rsa/image"), ("wall_time_s", "train/wall_time_s")):
                vals = [eval_metrics("synthetic", m, lv, s, wise=m == "ft")[key] for s in SEEDS]
                assert r[f"{col}_mean"] == pytest.approx(np.mean(vals))
                assert r[f"{col}_std"] == pytest.approx(np.std(vals, ddof=1))
                assert r[f"{col}_std"] > 0 and r[f"{col}_ci"] > r[f"{col}_std"] / math.sqrt(len(SEEDS))


def test_confidence_intervals_equal_scipys(done):
    from scipy import stats as sst

    from pipeline.evaluation.stats import mean_ci

    def scipy_half(vals) -> float:
        vals = np.asarray(vals, float)
        lo, hi = sst.t.interval(0.95, len(vals) - 1, loc=vals.mean(), scale=sst.sem(vals))
        return (hi - lo) / 2

    runs = read_csv(done["root"] / report.RUNS_CSV)
    summ = read_csv(done["root"] / report.SUMMARY_CSV)
    checked = 0
    for m in METHODS:
        for lv in LEVELS:
            g = runs[(runs["method"] == m) & (runs["level"] == str(lv))]
            r = summ[(summ["method"] == m) & (summ["level"] == str(lv))].iloc[0]
            for col in ("id", "ood", "zs", "rsa_image", "selected_ood", "wall_time_s"):
                vals = g[col].to_numpy(float)
                assert len(vals) == len(SEEDS) and np.ptp(vals) > 0
                assert r[f"{col}_ci"] == pytest.approx(scipy_half(vals), rel=1e-6)
                assert r[f"{col}_mean"] == pytest.approx(vals.mean())
                checked += 1
    assert checked == len(METHODS) * len(LEVELS) * 6
    # the function itself, on a hand list (4 values: 3 degrees of freedom)
    hand = [0.61, 0.55, 0.70, 0.58]
    mean, half = mean_ci(hand)
    assert mean == pytest.approx(np.mean(hand))
    assert half == pytest.approx(scipy_half(hand))
    assert half == pytest.approx(sst.t.ppf(0.975, 3) * np.std(hand, ddof=1) / 2)
    assert mean_ci([0.61, float("nan"), 0.55]) == pytest.approx(mean_ci([0.61, 0.55]))  # NaN dropped
    one_mean, one_half = mean_ci([0.42])
    assert one_mean == 0.42 and math.isnan(one_half)
    assert all(math.isnan(v) for v in mean_ci([]))


def test_summary_markdown(done):
    md = (done["root"] / report.SUMMARY_MD).read_text()
    assert md.startswith("# Report: synthetic")
    assert "| method" in md and "| zero-shot" in md and " ± " in md
    assert "`id_test/acc_avg`" in md and "`test/acc_avg`" in md
    assert "levels k=1, k=4, 25%" in md and "4 trials" in md
    assert "95 % confidence interval over 3 seeds" in md and "2 degrees of freedom" in md
    for name in ("id_vs_shots", "ood_vs_shots", "id_vs_ood", "retention", "rsa_vs_shots"):
        assert f"({name}.png)" in md
    # the largest level is the one with the most training examples: 25% (100 examples)
    assert "## At the largest level (25%, 100 training examples)" in md
    # one dataset: no IIMM plot, and the summary says why
    assert "No `iimm_vs_change.png`" in md and "across tasks" in md
    # two trials per method: every choice is on an edge of its list
    assert "## Selection (`id_val` on `id_val`)" in md
    assert "**Widen the search**" in md and "6 of 6 cells" in md
    # every table row has the same number of cells as its header
    tables = 0
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            tables += 1
            assert len({ln.count("|") for ln in lines}) == 1, block
            assert set(lines[1].replace("|", "").strip()) <= set("-: ")
    # results, the paired tests (OOD, ID) and the ranks over levels (OOD, ID), retention tasks,
    # changes and trials, selection, WiSE-FT selection and cost
    assert tables == 10


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert w >= 600 and h >= 400, (path, im.size)
        # not a blank canvas: a real plot has many distinct colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


def test_plots_are_valid_pngs(done):
    root = done["root"]
    for name in ("id_vs_shots", "ood_vs_shots", "id_vs_ood", "retention", "rsa_vs_shots"):
        _check_png(root / report.PLOTS[name])
    assert not (root / report.PLOTS["iimm_vs_change"]).exists()
    assert not list(root.joinpath(paths.REPORTS).rglob("*.tmp"))


def test_dvc_metrics_and_plot_data(done):
    root = done["root"]
    flat = json.loads((root / report.METRICS_JSON).read_text())
    assert flat == pytest.approx(done["flat"])
    zm = zeroshot_metrics("synthetic")
    assert flat["zeroshot/id"] == pytest.approx(zm["id_test/acc_avg"])
    assert flat["zeroshot/ood"] == pytest.approx(zm["test/acc_avg"])
    assert flat["zeroshot/rsa_image"] == 1.0
    assert flat["zeroshot/iimm"] == pytest.approx(zm["iimm"])
    assert "zeroshot/n_train" not in flat and "zeroshot/selected_alpha" not in flat
    for m in METHODS:
        for lv in LEVELS:
            key = level_key(parse_level(lv))
            assert key == ("25%" if lv == "25%" else f"k{lv}")
            for col in ("id", "ood", "zs", "rsa_image", "rsa_text", "selected_alpha",
                        "selected_id", "selected_ood", "selection_score", "n_train"):
                assert f"{m}/{key}/{col}" in flat
            vals = [eval_metrics("synthetic", m, lv, s, wise=m == "ft")["test/acc_avg"] for s in SEEDS]
            assert flat[f"{m}/{key}/ood"] == pytest.approx(np.mean(vals))
    assert "ft/25%/id" in flat and "ft/k25%/id" not in flat
    assert all(math.isfinite(v) for v in flat.values())
    long = pd.read_csv(root / report.SHOTS_CSV, dtype={"level": str})
    assert report.SHOTS_CSV.name == "levels.csv"
    assert list(long.columns) == ["method", "level", "n_train", "metric", "value", "ci"]
    summ = read_csv(root / report.SUMMARY_CSV)
    s4 = summ[(summ["method"] == "ft") & (summ["level"] == "4")].iloc[0]
    row = long[(long["method"] == "ft") & (long["level"] == "k=4") & (long["metric"] == "id")]
    assert len(row) == 1
    assert row["value"].iloc[0] == pytest.approx(flat["ft/k4/id"])
    assert row["n_train"].iloc[0] == n_train(4) and row["ci"].iloc[0] == pytest.approx(s4["id_ci"])
    z = long[long["method"] == "zeroshot"]
    assert set(z["level"]) == {"zero-shot"} and set(z["n_train"]) == {0} and z["ci"].isna().all()
    done_marker = json.loads((root / report.SUMMARY_JSON).read_text())
    assert done_marker["runs"] == 1 + len(METHODS) * len(LEVELS) * len(SEEDS)
    assert done_marker["mlflow_run_id"]
    assert str(report.SELECTION_CSV) in done_marker["files"]


def test_levels_share_one_axis(done):
    """Fractions and shots sit on one axis: training examples per level."""
    summ = read_csv(done["root"] / report.SUMMARY_CSV)
    for m in METHODS:
        g = summ[summ["method"] == m]
        assert list(g["level_label"]) == ["k=1", "k=4", "25%"]
        assert list(g["level_kind"]) == ["shots", "shots", "fraction"]
        assert list(g["n_train_mean"]) == [n_train(lv) for lv in LEVELS] == [4, 16, 100]
    z = summ[summ["method"] == "zeroshot"].iloc[0]
    assert z["level_label"] == "zero-shot" and z["n_train_mean"] == 0
    long = pd.read_csv(done["root"] / report.SHOTS_CSV, dtype={"level": str})
    for (m, metric), g in long[long["method"] != "zeroshot"].groupby(["method", "metric"]):
        assert list(g["level"]) == ["k=1", "k=4", "25%"], (m, metric)
        assert g["n_train"].is_monotonic_increasing and g["n_train"].is_unique, (m, metric)
    assert set(long.loc[long["level"] == "25%", "n_train"]) == {100}
    assert set(long.loc[long["level"] == "k=4", "n_train"]) == {16}
    # the IIMM points (and the "largest level" headline) take the level with most examples
    points = report.task_points("synthetic", done["flat"])
    assert {(p["method"], p["level"], p["n_train"]) for p in points} == {("ft", "25%", 100), ("flyp", "25%", 100)}


def test_selection_table_in_csv(done):
    sel = read_csv(done["root"] / report.SELECTION_CSV)
    assert list(sel.columns) == ["method", "level", "protocol", "split", "trials", "chosen",
                                 "val_score", "edges"]
    assert list(zip(sel["method"], sel["level"])) == [(m, str(lv)) for m in METHODS for lv in LEVELS]
    assert set(sel["protocol"]) == {"id_val"} and set(sel["split"]) == {"id_val"}
    assert set(sel["trials"]) == {2}
    for _, r in sel.iterrows():
        if r["method"] == "ft":
            assert r["chosen"] == "ft-lr3e-5 ×2, ft-lr1e-4 ×1"
            assert r["edges"] == "lr=0.0001 is the largest tried; lr=3e-05 is the smallest tried"
        else:
            assert r["chosen"] == "flyp-lr1e-4 ×3" and r["edges"] == "lr=0.0001 is the largest tried"
        names = [n for n, _ in default_trials(METHODS)[r["method"]]]
        scores = [trial_scores("synthetic", r["method"], r["level"], s, names,
                               names.index(chosen_trial(r["method"], r["level"], s)))[chosen_trial(r["method"], r["level"], s)]
                  for s in SEEDS]
        assert r["val_score"] == pytest.approx(np.mean(scores))


def test_mlflow_summary_run(done):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(done["uri"])
    exp = client.get_experiment_by_name("synthetic")
    found = client.search_runs([exp.experiment_id], filter_string="tags.level = 'report'")
    assert len(found) == 1
    run = found[0]
    assert run.info.run_name == "report"
    # a few headline numbers per row: the zero-shot model's, and each row's ID and OOD at the
    # chosen trial and α against the training examples; every mean is in the artifacts
    curves = {k for k in run.data.metrics if k.startswith("curve/")}
    assert curves == {f"curve/{m}/{c}" for m in ("ft", "flyp") for c in ("selected_id", "selected_ood")}
    zero = {f"zeroshot/{c}" for c in ("id", "ood", "zs", "iimm")}
    assert set(run.data.metrics) == curves | zero | {"rows"}
    assert run.data.metrics["rows"] == 2
    for key in zero:
        assert run.data.metrics[key] == pytest.approx(done["flat"][key])
    # each curve: the zero-shot model at step 0, then one point per level at its training-set size
    history = sorted(client.get_metric_history(run.info.run_id, "curve/ft/selected_ood"), key=lambda h: h.step)
    assert [h.step for h in history] == [0, *(n_train(lv) for lv in LEVELS)]
    assert history[0].value == pytest.approx(done["flat"]["zeroshot/ood"])
    assert history[-1].value == pytest.approx(done["flat"]["ft/25%/selected_ood"])
    # the full tables: every flat mean (report.json, and the MLflow table), the summary table
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        logged = json.loads(Path(client.download_artifacts(run.info.run_id, "report.json", tmp)).read_text())
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "report_metrics.json", tmp)).read_text())
        summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary_table.json", tmp)).read_text())
    assert logged == pytest.approx(done["flat"])
    assert dict(zip(*zip(*table["data"]))) == pytest.approx(done["flat"])
    cols = summary["columns"]
    rows = [dict(zip(cols, r)) for r in summary["data"]]
    assert {(r["method"], r["family"]) for r in rows} == {("zeroshot", "zero-shot"), ("ft", "robust"), ("flyp", "robust")}
    ft25 = next(r for r in rows if r["method"] == "ft" and r["level"] == "25%")
    assert ft25["ood_mean"] == pytest.approx(done["flat"]["ft/25%/ood"])
    p = run.data.params
    assert p["dataset"] == "synthetic" and p["methods"] == "ft,flyp" and p["levels"] == "1,4,25%"
    assert p["rows"] == "ft,flyp"
    assert p["seeds"] == "0,1,2" and p["selection"] == "auto" and p["select_split"] == "id_val"
    assert p["trials"] == "4"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.md", "summary.csv", "selection.csv", "runs.csv", "id_vs_ood.png",
            "rsa_vs_shots.png", "significance.csv", "cd_ood.png", "cd_id.png"} <= names


def test_significance_section_tests_the_selected_figures_paired_over_seeds(done):
    """The report's answer: per level, each method against the best and against zero-shot,
    paired over seeds, on the figures at the selected trial and α (runs.csv's selected_*)."""
    from scipy import stats

    root = done["root"]
    md = (root / report.SUMMARY_MD).read_text()
    section = md[md.index("## Which differences are real"):]
    assert "paired t-test" in section and "Holm" in section and "With 3 seeds" in section
    tests = pd.read_csv(root / "reports" / "significance.csv", dtype={"level": str})
    runs = read_csv(root / report.RUNS_CSV)
    assert set(tests["level"]) == {"1", "4", "25%"} and set(tests["value"]) == {"id", "ood"}
    # 2 methods × 3 levels × 2 figures × 2 references
    assert len(tests) == 2 * 3 * 2 * 2
    at = runs[(runs["level"] == "4") & runs["seed"].notna()]
    ft = at[at["method"] == "ft"].sort_values("seed")["selected_ood"].to_numpy()
    flyp = at[at["method"] == "flyp"].sort_values("seed")["selected_ood"].to_numpy()
    zs = runs[runs["level"] == "0"]["selected_ood"].iloc[0]
    row = tests[(tests["level"] == "4") & (tests["value"] == "ood") & (tests["reference"] == "zero-shot")
                & (tests["method"] == "ft")].iloc[0]
    assert row["diff"] == pytest.approx((ft - zs).mean())
    assert row["p"] == pytest.approx(stats.ttest_1samp(ft - zs, 0.0).pvalue)
    best = "ft" if ft.mean() >= flyp.mean() else "flyp"
    vs_best = tests[(tests["level"] == "4") & (tests["value"] == "ood") & (tests["reference"] == "best")]
    assert set(vs_best["ref_method"]) == {best}
    # one line per level in plain language
    for label in ("**k=1**", "**k=4**", "**25%**"):
        assert f"- {label} (3 seeds) — OOD: best " in section
    assert "beat zero-shot" in section
    for name in ("cd_ood", "cd_id"):
        _check_png(root / report.PLOTS[name])
        assert f"({name}.png)" in section


def test_selection_reports_chosen_trials_and_edges(tmp_path, monkeypatch):
    """ft with three learning rates: at k=1 seeds 0 and 1 choose the middle one and seed 2 the
    largest (an edge); at k=4 every seed chooses the middle one (no edge)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = {"ft": lrs_trials("ft", (1e-5, 3e-5, 1e-4))}
    assert [n for n, _ in trials["ft"]] == ["ft-lr1e-5", "ft-lr3e-5", "ft-lr1e-4"]

    def choose(method, level, seed, n):
        return 2 if (level, seed) == ("1", 2) else 1

    params = load_params(write_inputs(tmp_path, methods=("ft",), levels=(1, 4), trials=trials, choose=choose))
    cfg = report.ReportConfig.of(params)
    report.run(cfg)
    sel = read_csv(report.SELECTION_CSV).set_index("level")
    assert list(sel.index) == ["1", "4"] and set(sel["trials"]) == {3}
    assert sel.loc["1", "chosen"] == "ft-lr3e-5 ×2, ft-lr1e-4 ×1"
    assert sel.loc["1", "edges"] == "lr=0.0001 is the largest tried"
    assert sel.loc["4", "chosen"] == "ft-lr3e-5 ×3"
    assert pd.isna(sel.loc["4", "edges"])  # interior choice: no edge
    runs = read_csv(report.RUNS_CSV)
    assert list(runs.loc[runs["level"] == "1", "trial"]) == ["ft-lr3e-5", "ft-lr3e-5", "ft-lr1e-4"]

    md = report.SUMMARY_MD.read_text()
    assert "3 trials, selected per method, level and seed by `auto`" in md
    block = md.split("## Selection")[1].split("\n\n")
    rows = {ln.split("|")[2].strip(): [c.strip() for c in ln.split("|")[1:-1]]
            for ln in block[2].splitlines()[2:]}
    assert rows["k=1"] == ["ft", "k=1", "3", "ft-lr3e-5 ×2, ft-lr1e-4 ×1",
                           f"{sel.loc['1', 'val_score']:.3f}", "lr=0.0001 is the largest tried"]
    assert rows["k=4"] == ["ft", "k=4", "3", "ft-lr3e-5 ×3", f"{sel.loc['4', 'val_score']:.3f}", "–"]
    widen = next(ln for ln in md.splitlines() if "Widen the search" in ln)
    assert "1 of 2 cells (ft at k=1)" in widen and "k=4" not in widen

    # no choice on an edge: no warning
    from pipeline.report.tables import selection_table, summary_markdown

    records = report.read_selection(cfg)
    for r in records:
        for c in r["seeds"].values():
            c["edges"] = []
    table = selection_table(records)
    assert (table["edges"] == "").all()
    summ = pd.read_csv(report.SUMMARY_CSV, dtype={"level": str})
    quiet = summary_markdown(cfg, summ, report.Headline.of(get_spec("synthetic")),
                             zeroshot_metrics("synthetic"), [], [], [], table)
    assert "## Selection" in quiet and "Widen the search" not in quiet


def test_second_dataset_adds_iimm_plot_and_no_id(done, tmp_path, monkeypatch):
    """waterbirds has no ID split; with synthetic's report run in the same MLflow store,
    two tasks are present and the IIMM plot appears."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", done["uri"])
    params = load_params(write_inputs(tmp_path, dataset="waterbirds", seeds=(0,)))
    flat = report.run(report.ReportConfig.of(params))
    runs = read_csv(report.RUNS_CSV)
    assert "id" not in runs.columns and "selected_id" not in runs.columns
    assert runs.loc[runs["method"] == "ft", "ood"].notna().all()
    assert not any(k.endswith("/id") for k in flat)
    assert not report.PLOTS["id_vs_shots"].exists() and not report.PLOTS["id_vs_ood"].exists()
    assert not report.PLOTS["retention"].exists()  # waterbirds: no retention tasks
    md = report.SUMMARY_MD.read_text()
    assert "No zero-shot retention task for waterbirds" in md and "retention: {tasks: [{folder:" in md
    summ = read_csv(report.SUMMARY_CSV)
    assert (summ["ood_std"] == 0).all()  # one seed: std 0
    assert summ["ood_ci"].isna().all()  # and no interval
    sel = read_csv(report.SELECTION_CSV)
    assert set(sel["protocol"]) == {"ood_val"} and set(sel["split"]) == {"val"}
    _check_png(report.PLOTS["iimm_vs_change"])
    _check_png(report.PLOTS["ood_vs_shots"])
    md = report.SUMMARY_MD.read_text()
    assert "no ID split" in md and "(iimm_vs_change.png)" in md and " ± " not in md
    assert "2 tasks side by side: synthetic, waterbirds" in md


def test_missing_run_names_file_and_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_inputs(tmp_path, levels=(4, "25%"), seeds=(0, 1)))
    cfg = report.ReportConfig.of(params)
    gone = paths.evaluate_dir("flyp", "4", 1) / paths.EVAL_METRICS
    gone_frac = paths.evaluate_dir("ft", "25%", 0) / paths.EVAL_METRICS
    kept = {p: p.read_text() for p in (gone, gone_frac, paths.EMBED_METRICS)}
    for p in kept:
        p.unlink()
    paths.REPORTS.mkdir()
    report.SUMMARY_JSON.write_text("{}")  # a finished report from an earlier run
    with pytest.raises(FileNotFoundError) as err:
        report.run(cfg)
    msg = str(err.value)
    assert str(gone) in msg and "dvc repro evaluate@flyp`" in msg
    assert str(gone_frac) in msg and "dvc repro evaluate@ft`" in msg
    assert str(paths.EMBED_METRICS) in msg and "dvc repro embed" in msg
    assert isinstance(err.value, report.MissingInputsError)
    assert err.value.missing == [paths.EMBED_METRICS, gone_frac, gone]
    assert report.SUMMARY_JSON.read_text() == "{}"  # missing inputs change nothing
    with pytest.raises(FileNotFoundError):
        report.read_runs(cfg)

    # every run there, but a selection record missing
    for p, text in kept.items():
        p.write_text(text)
    record = paths.select_file("flyp", "25%")
    record.unlink()
    with pytest.raises(report.MissingInputsError) as err:
        report.run(cfg)
    assert err.value.missing == [record]
    assert str(record) in str(err.value) and "dvc repro selection" in str(err.value)


def test_crash_leaves_no_finished_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_inputs(tmp_path, methods=("ft",), levels=(1,), seeds=(0,)))
    paths.REPORTS.mkdir()
    report.SUMMARY_JSON.write_text("{}")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot_panels", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        report.run(report.ReportConfig.of(params))
    assert not report.SUMMARY_JSON.exists() and not report.SUMMARY_MD.exists()


def test_wrong_dataset_metrics_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_inputs(tmp_path, methods=("ft",), levels=(1,), seeds=(0,)))
    f = paths.evaluate_dir("ft", "1", 0) / paths.EVAL_METRICS
    f.write_text(json.dumps({"test/acc_wg": 0.5}))
    with pytest.raises(ValueError, match="ft/1/seed0/metrics.json: no .test/acc_avg"):
        report.read_runs(report.ReportConfig.of(params))


def test_zeroshot_method_at_a_level_is_not_the_zero_shot_level(tmp_path, monkeypatch):
    """`zeroshot` listed in finetune.methods gives ordinary rows at its levels next to the
    zero-shot level (level 0)."""
    monkeypatch.chdir(tmp_path)
    params = load_params(write_inputs(tmp_path, methods=("zeroshot", "ft"), levels=(2, "25%"), seeds=(0,)))
    runs = report.read_runs(report.ReportConfig.of(params))
    assert list(runs.loc[runs["method"] == "zeroshot", "seed"].isna()) == [True, False, False]
    summ = report.summarize(runs, list(params.finetune.methods), list(params.sample.parsed_levels))
    assert list(zip(summ["method"], summ["level"])) == [
        ("zeroshot", "0"), ("zeroshot", "2"), ("zeroshot", "25%"), ("ft", "2"), ("ft", "25%")]
    flat = report.flat_metrics(summ, zeroshot_metrics("synthetic"))
    assert flat["zeroshot/id"] == pytest.approx(0.55)
    assert "zeroshot/k2/id" in flat and "zeroshot/k2/selected_alpha" in flat
    assert "zeroshot/25%/n_train" in flat and flat["zeroshot/25%/n_train"] == n_train("25%")
    assert "zeroshot/n_train" not in flat  # the zero-shot level has no training data


def test_retention_section_reports_changes_with_intervals(done):
    """Retention is the fine-tuned minus the pre-trained accuracy per task, mean ± Student-t CI
    over seeds; the mean leaves out the task the pre-trained model is at chance on (texture)."""
    from pipeline.evaluation.stats import mean_ci

    ret = pd.read_csv(done["root"] / "reports" / "retention.csv", dtype={"level": str})
    assert set(ret["task"]) == {*ZS_TASKS, "mean"}
    for m in METHODS:
        for lv in LEVELS:
            name = parse_level(lv).name
            per_task = {}
            for t, (pre, _, _) in ZS_TASKS.items():
                deltas = [model_metrics("synthetic", m, lv, s)[f"zs/{t}/acc"] - pre for s in SEEDS]
                per_task[t] = deltas
                row = ret[(ret["method"] == m) & (ret["level"] == name) & (ret["task"] == t)].iloc[0]
                mean, ci = mean_ci(deltas)
                assert row["delta_mean"] == pytest.approx(mean) and row["delta_ci"] == pytest.approx(ci)
                assert row["delta_mean"] < 0 and row["seeds"] == len(SEEDS)
            mean_row = ret[(ret["method"] == m) & (ret["level"] == name) & (ret["task"] == "mean")].iloc[0]
            per_seed = [np.mean([per_task[t][i] for t in INFORMATIVE]) for i in range(len(SEEDS))]
            assert mean_row["delta_mean"] == pytest.approx(np.mean(per_seed))
            assert mean_row["delta_ci"] == pytest.approx(mean_ci(per_seed)[1])
            key = f"{m}/{level_key(parse_level(lv))}/zs_delta"
            assert done["flat"][key] == pytest.approx(np.mean(per_seed))
            assert done["flat"][f"{key}/synthetic/colour"] == pytest.approx(np.mean(per_task["synthetic/colour"]))
    md = (done["root"] / report.SUMMARY_MD).read_text()
    section = md.split("## Zero-shot retention: change from the pre-trained model")[1].split("\n## ")[0]
    assert "| synthetic/texture" in section and "**no** (p = " in section
    assert "**No signal** from synthetic/texture" in section and "left out of the mean" in section
    assert "Δ synthetic/heldout-shapes" in section and "mean Δ at α*" in section
    ft1 = ret[(ret["method"] == "ft") & (ret["level"] == "1") & (ret["task"] == "synthetic/colour")].iloc[0]
    assert f"{ft1['delta_mean']:+.3f} ± {ft1['delta_ci']:.3f}" in section
    assert "(retention.png)" in section
    assert (done["root"] / report.PLOTS["retention"]).read_bytes()[:8] == PNG_MAGIC


def test_the_trade_off_of_every_trial(done):
    """Per trial: seeds that chose it, mean val score, mean change in retention (informative tasks)."""
    from pipeline.evaluation.stats import mean_ci

    trials = pd.read_csv(done["root"] / "reports" / "trials.csv", dtype={"level": str})
    assert len(trials) == len(METHODS) * len(LEVELS) * 2
    for m in METHODS:
        names = [n for n, _ in default_trials(METHODS)[m]]
        for lv in LEVELS:
            name = parse_level(lv).name
            for i, t in enumerate(names):
                row = trials[(trials["method"] == m) & (trials["level"] == name) & (trials["trial"] == t)].iloc[0]
                assert row["chosen"] == sum(chosen_trial(m, lv, s) == t for s in SEEDS)
                deltas = [np.mean([model_metrics("synthetic", m, lv, s)[f"zs/{z}/acc"] - 0.02 * i - ZS_TASKS[z][0]
                                   for z in INFORMATIVE]) for s in SEEDS]
                mean, ci = mean_ci(deltas)
                assert row["delta_mean"] == pytest.approx(mean) and row["delta_ci"] == pytest.approx(ci)
                scores = [trial_scores("synthetic", m, lv, s, names, names.index(chosen_trial(m, lv, s)))[t]
                          for s in SEEDS]
                assert row["val_score"] == pytest.approx(np.mean(scores))
    md = (done["root"] / report.SUMMARY_MD).read_text()
    assert "### What the selection traded" in md and "validation score on `id_val`" in md
