"""The report stage: tables, plots, DVC metrics and the MLflow summary run from fake inputs.

The inputs are well-formed stand-ins for what `embed` and `evaluate` write: the zero-shot
level in data/embed/metrics.json and, per method × k × seed, runs/evaluate/.../metrics.json
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

METHODS = ("ft", "flyp")
SHOTS = (1, 4)
SEEDS = (0, 1)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# the headline keys of each dataset (DatasetSpec: last ID split, last OOD split, metric)
HEAD = {
    "synthetic": {"id": "id_test/acc_avg", "ood": "test/acc_avg", "select": "id_val/acc_avg",
                  "zs": ("synthetic/colour", "synthetic/texture")},
    "waterbirds": {"id": None, "ood": "test/acc_wg", "select": "val/acc_wg", "zs": ()},
}


def zeroshot_metrics(dataset: str) -> dict[str, float]:
    h = HEAD[dataset]
    m = {h["ood"]: 0.46, h["select"]: 0.5, "iimm": 0.31 if dataset == "synthetic" else 0.42,
         "iimm/s_intra": 0.4, "iimm/s_inter": 0.22, "silhouette/modality": 0.8,
         "silhouette/class": 0.05, "test/acc_worst_domain": 0.3}
    if h["id"]:
        m[h["id"]] = 0.55
    for i, t in enumerate(h["zs"]):
        m[f"zs/{t}/acc"] = 0.7 - 0.1 * i
    return m


def model_metrics(dataset: str, method: str, k: int, seed: int, alpha: float = 1.0) -> dict[str, float]:
    """A deterministic, plausible fine-tuned model: ID rises with k, retention and RSA fall;
    alpha interpolates from the zero-shot numbers (alpha = 0) to the fine-tuned ones."""
    h = HEAD[dataset]
    zs = zeroshot_metrics(dataset)
    lk = math.log2(k) + 1
    gain = {"zeroshot": 0.0, "ft": 0.08, "flyp": 0.07, "lp": 0.05, "lpft": 0.075, "dive": 0.065}[method] * lk + 0.01 * seed
    bump = 4 * alpha * (1 - alpha) * 0.04  # WiSE-FT: the middle of the curve beats both ends
    m = {h["ood"]: zs[h["ood"]] + alpha * (0.3 * gain) + bump,
         h["select"]: zs[h["select"]] + alpha * (0.3 * gain) + bump,
         "rsa/image": 1 - alpha * {"ft": 0.12, "dive": 0.01}.get(method, 0.08) * lk - 0.005 * seed,
         "rsa/text": 1 - alpha * {"ft": 0.02, "dive": 0.005}.get(method, 0.1) * lk}
    if h["id"]:
        m[h["id"]] = zs[h["id"]] + alpha * gain + bump / 2
    for t in h["zs"]:
        m[f"zs/{t}/acc"] = zs[f"zs/{t}/acc"] - alpha * {"ft": 0.05, "dive": 0.004}.get(method, 0.03) * lk - 0.01 * seed
    return m


def eval_metrics(dataset: str, method: str, k: int, seed: int, wise: bool) -> dict[str, float]:
    h = HEAD[dataset]
    base = model_metrics(dataset, method, k, seed)
    out = dict(base)
    alphas = ALPHAS if wise else (1.0,)
    per = {a: model_metrics(dataset, method, k, seed, a) for a in alphas}
    if wise:
        for a, m in per.items():
            out.update({f"wise/{a:g}/{key}": v for key, v in m.items()})
    best = max(alphas, key=lambda a: (per[a][h["select"]], a))
    out["selected/alpha"] = best
    out.update({f"selected/{key}": v for key, v in per[best].items()})
    out["train/trainable_params"] = 1000.0 if method == "ft" else 2000.0
    out["train/trainable_share"] = 0.5 if method == "ft" else 1.0
    out["train/wall_time_s"] = 10.0 * k + seed
    return out


def write_inputs(root: Path, dataset: str = "synthetic", methods=METHODS, shots=SHOTS,
                 seeds=SEEDS, wise_methods=("ft",)) -> Path:
    """params.yaml plus every input file of the report under `root`; returns params.yaml."""
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    base["dataset"]["name"] = dataset
    base["finetune"]["methods"] = list(methods)
    base["sample"] = {"shots": list(shots), "seeds": list(seeds)}
    pfile = root / "params.yaml"
    pfile.write_text(yaml.safe_dump(base))
    (root / paths.EMBED).mkdir(parents=True, exist_ok=True)
    (root / paths.EMBED_METRICS).write_text(json.dumps(zeroshot_metrics(dataset)))
    sel_split = HEAD[dataset]["select"].split("/")[0]
    for m in methods:
        for k in shots:
            for s in seeds:
                d = root / paths.evaluate_dir(m, k, s)
                d.mkdir(parents=True, exist_ok=True)
                met = eval_metrics(dataset, m, k, s, wise=m in wise_methods)
                (d / "metrics.json").write_text(json.dumps(met))
                (d / "selection.json").write_text(json.dumps({
                    "split": sel_split, "metric": HEAD[dataset]["ood"].split("/")[1],
                    "alpha": met["selected/alpha"], "alphas": list(ALPHAS if m in wise_methods else (1.0,)),
                    "headline": HEAD[dataset]["ood"].split("/")[1]}))
    return pfile


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One full report of synthetic: 2 methods × 2 shots × 2 seeds (ft with a WiSE-FT sweep)."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        params = load_params(write_inputs(root))
        flat = report.run(report.ReportConfig.of(params))
        yield {"root": root, "params": params, "flat": flat,
               "uri": f"sqlite:///{root / 'mlflow.db'}"}


def test_runs_csv_one_row_per_run(done):
    runs = pd.read_csv(done["root"] / report.RUNS_CSV)
    assert list(runs.columns) == list(report.columns())
    assert len(runs) == 1 + len(METHODS) * len(SHOTS) * len(SEEDS)
    z = runs[runs["method"] == "zeroshot"]
    assert len(z) == 1 and z["shots"].iloc[0] == 0 and pd.isna(z["seed"].iloc[0])
    zm = zeroshot_metrics("synthetic")
    assert z["id"].iloc[0] == pytest.approx(zm["id_test/acc_avg"])
    assert z["ood"].iloc[0] == pytest.approx(zm["test/acc_avg"])
    assert z["zs"].iloc[0] == pytest.approx((0.7 + 0.6) / 2)
    assert z["rsa_image"].iloc[0] == 1.0 and z["rsa_text"].iloc[0] == 1.0
    for m in METHODS:
        for k in SHOTS:
            for s in SEEDS:
                r = runs[(runs["method"] == m) & (runs["shots"] == k) & (runs["seed"] == s)]
                assert len(r) == 1
                r = r.iloc[0]
                e = eval_metrics("synthetic", m, k, s, wise=m == "ft")
                assert r["id"] == pytest.approx(e["id_test/acc_avg"])
                assert r["ood"] == pytest.approx(e["test/acc_avg"])
                assert r["zs"] == pytest.approx(np.mean([e["zs/synthetic/colour/acc"],
                                                         e["zs/synthetic/texture/acc"]]))
                assert r["rsa_image"] == pytest.approx(e["rsa/image"])
                assert r["rsa_text"] == pytest.approx(e["rsa/text"])
                assert r["selected_alpha"] == pytest.approx(e["selected/alpha"])
                assert r["selected_id"] == pytest.approx(e["selected/id_test/acc_avg"])
                assert r["selected_ood"] == pytest.approx(e["selected/test/acc_avg"])
                assert r["trainable_share"] == pytest.approx(e["train/trainable_share"])
                assert r["wall_time_s"] == pytest.approx(e["train/wall_time_s"])
    # the sweep mattered: ft picks an interior α, flyp (no sweep) reports α = 1
    assert set(runs.loc[runs["method"] == "flyp", "selected_alpha"]) == {1.0}
    assert (runs.loc[runs["method"] == "ft", "selected_alpha"] < 1.0).all()


def test_read_runs_matches_csv(done, monkeypatch):
    monkeypatch.chdir(done["root"])
    df = report.read_runs(report.ReportConfig.of(done["params"]))
    csv = pd.read_csv(done["root"] / report.RUNS_CSV)
    assert len(df) == len(csv)
    np.testing.assert_allclose(df["ood"].to_numpy(float), csv["ood"].to_numpy(float))


def test_summary_mean_and_std_over_seeds(done):
    summ = pd.read_csv(done["root"] / report.SUMMARY_CSV)
    assert len(summ) == 1 + len(METHODS) * len(SHOTS)
    assert list(summ["method"]) == ["zeroshot", "ft", "ft", "flyp", "flyp"]  # params order
    z = summ[summ["method"] == "zeroshot"].iloc[0]
    assert z["shots"] == 0 and z["seeds"] == 1 and z["id_std"] == 0.0
    for m in METHODS:
        for k in SHOTS:
            r = summ[(summ["method"] == m) & (summ["shots"] == k)].iloc[0]
            assert r["seeds"] == len(SEEDS)
            for col, key in (("id", "id_test/acc_avg"), ("ood", "test/acc_avg"),
                             ("rsa_image", "rsa/image"), ("wall_time_s", "train/wall_time_s")):
                vals = [eval_metrics("synthetic", m, k, s, wise=m == "ft")[key] for s in SEEDS]
                assert r[f"{col}_mean"] == pytest.approx(np.mean(vals))
                assert r[f"{col}_std"] == pytest.approx(np.std(vals, ddof=1))
                assert r[f"{col}_std"] > 0


def test_summary_markdown(done):
    md = (done["root"] / report.SUMMARY_MD).read_text()
    assert md.startswith("# Report: synthetic")
    assert "| method" in md and "| zero-shot" in md and " ± " in md
    assert "`id_test/acc_avg`" in md and "`test/acc_avg`" in md
    for name in ("id_vs_shots", "ood_vs_shots", "id_vs_ood", "zs_retention_vs_shots", "rsa_vs_shots"):
        assert f"({name}.png)" in md
    # one dataset: no IIMM plot, and the summary says why
    assert "No `iimm_vs_change.png`" in md and "across tasks" in md
    # every table row has the same number of cells as its header
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count("|") for ln in lines}) == 1


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
    for name in ("id_vs_shots", "ood_vs_shots", "id_vs_ood", "zs_retention_vs_shots", "rsa_vs_shots"):
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
    for m in METHODS:
        for k in SHOTS:
            for col in ("id", "ood", "zs", "rsa_image", "rsa_text", "selected_alpha",
                        "selected_id", "selected_ood"):
                assert f"{m}/k{k}/{col}" in flat
            vals = [eval_metrics("synthetic", m, k, s, wise=m == "ft")["test/acc_avg"] for s in SEEDS]
            assert flat[f"{m}/k{k}/ood"] == pytest.approx(np.mean(vals))
    assert all(math.isfinite(v) for v in flat.values())
    long = pd.read_csv(root / report.SHOTS_CSV)
    assert list(long.columns) == ["method", "shots", "metric", "value"]
    row = long[(long["method"] == "ft") & (long["shots"] == 4) & (long["metric"] == "id")]
    assert row["value"].iloc[0] == pytest.approx(flat["ft/k4/id"])
    assert set(long.loc[long["method"] == "zeroshot", "shots"]) == {0}
    done_marker = json.loads((root / report.SUMMARY_JSON).read_text())
    assert done_marker["runs"] == 9 and done_marker["mlflow_run_id"]


def test_mlflow_summary_run(done):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(done["uri"])
    exp = client.get_experiment_by_name("synthetic")
    found = client.search_runs([exp.experiment_id], filter_string="tags.level = 'report'")
    assert len(found) == 1
    run = found[0]
    assert run.info.run_name == "report"
    for key, v in done["flat"].items():
        assert run.data.metrics[key] == pytest.approx(v)
    assert run.data.params["dataset"] == "synthetic"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.md", "summary.csv", "runs.csv", "id_vs_ood.png", "rsa_vs_shots.png"} <= names


def test_second_dataset_adds_iimm_plot_and_no_id(done, tmp_path, monkeypatch):
    """waterbirds has no ID split; with synthetic's report run in the same MLflow store,
    two tasks are present and the IIMM plot appears."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", done["uri"])
    params = load_params(write_inputs(tmp_path, dataset="waterbirds", seeds=(0,)))
    flat = report.run(report.ReportConfig.of(params))
    runs = pd.read_csv(report.RUNS_CSV)
    assert "id" not in runs.columns and "selected_id" not in runs.columns
    assert runs.loc[runs["method"] == "ft", "ood"].notna().all()
    assert not any(k.endswith("/id") for k in flat)
    assert not report.PLOTS["id_vs_shots"].exists() and not report.PLOTS["id_vs_ood"].exists()
    assert not report.PLOTS["zs_retention_vs_shots"].exists()  # waterbirds: no retention tasks
    summ = pd.read_csv(report.SUMMARY_CSV)
    assert (summ["ood_std"] == 0).all()  # one seed: std 0
    _check_png(report.PLOTS["iimm_vs_change"])
    _check_png(report.PLOTS["ood_vs_shots"])
    md = report.SUMMARY_MD.read_text()
    assert "no ID split" in md and "(iimm_vs_change.png)" in md and " ± " not in md


def test_missing_run_names_file_and_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_inputs(tmp_path, shots=(4,), seeds=(0, 1)))
    gone = paths.evaluate_dir("flyp", 4, 1) / "metrics.json"
    gone.unlink()
    paths.EMBED_METRICS.unlink()
    paths.REPORTS.mkdir()
    report.SUMMARY_JSON.write_text("{}")  # a finished report from an earlier run
    with pytest.raises(FileNotFoundError) as err:
        report.run(report.ReportConfig.of(params))
    msg = str(err.value)
    assert str(gone) in msg and "dvc repro evaluate@flyp-4-1" in msg
    assert str(paths.EMBED_METRICS) in msg and "dvc repro embed" in msg
    assert isinstance(err.value, report.MissingInputsError)
    assert err.value.missing == [paths.EMBED_METRICS, gone]
    with pytest.raises(FileNotFoundError):
        report.read_runs(report.ReportConfig.of(params))


def test_crash_leaves_no_finished_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_inputs(tmp_path, methods=("ft",), shots=(1,), seeds=(0,)))
    paths.REPORTS.mkdir()
    report.SUMMARY_JSON.write_text("{}")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot_panels", boom)
    with pytest.raises(RuntimeError):
        report.run(report.ReportConfig.of(params))
    assert not report.SUMMARY_JSON.exists() and not report.SUMMARY_MD.exists()


def test_wrong_dataset_metrics_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_inputs(tmp_path, methods=("ft",), shots=(1,), seeds=(0,)))
    f = paths.evaluate_dir("ft", 1, 0) / "metrics.json"
    f.write_text(json.dumps({"test/acc_wg": 0.5}))
    with pytest.raises(ValueError, match="ft/k1_seed0/metrics.json: no .test/acc_avg"):
        report.read_runs(report.ReportConfig.of(params))


def test_zeroshot_method_at_k_is_not_the_k0_level(tmp_path, monkeypatch):
    """`zeroshot` listed in finetune.methods gives ordinary k > 0 rows next to the k = 0 level."""
    monkeypatch.chdir(tmp_path)
    params = load_params(write_inputs(tmp_path, methods=("zeroshot", "ft"), shots=(2,), seeds=(0,)))
    runs = report.read_runs(report.ReportConfig.of(params))
    summ = report.summarize(runs, list(params.finetune.methods))
    assert list(zip(summ["method"], summ["shots"])) == [("zeroshot", 0), ("zeroshot", 2), ("ft", 2)]
    flat = report.flat_metrics(summ, zeroshot_metrics("synthetic"))
    assert flat["zeroshot/id"] == pytest.approx(0.55)
    assert "zeroshot/k2/id" in flat and "zeroshot/k2/selected_alpha" in flat
