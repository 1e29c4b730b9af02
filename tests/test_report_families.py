"""The report with many methods: rows grouped by the family each method declares, one panel per
family in the figures against the level, soups as rows of their own after their method, and a
summary MLflow run with a few headline numbers per row (the full tables as artifacts). Fake
inputs as in test_report.py (its writers), plus the soups' files evaluate writes."""

from __future__ import annotations

import json
import math
import struct

import pandas as pd
import pytest
import yaml

import pipeline  # noqa: F401  (offline environment setup)
from pipeline import artifacts as paths, report
from pipeline.config import load_params
from pipeline.core.levels import parse_level
from pipeline.report import families
from tests.test_report import LEVELS, SEEDS, default_trials, eval_metrics, write_inputs

METHODS = ("ft", "lp", "flyp")  # robust, probe, robust: the report puts flyp before lp
SOUP_GAIN = {"uniform": 0.011, "greedy": 0.017}  # each soup's OOD above its method's


def write_soups(root, methods=("ft", "lp")) -> None:
    """The soup folders evaluate writes (runs/evaluate/<m>/<level>/seed<S>/<kind>_soup/)."""
    for m in methods:
        names = [n for n, _ in default_trials([m])[m]]
        for level in LEVELS:
            lv = parse_level(level)
            for s in SEEDS:
                for kind, gain in SOUP_GAIN.items():
                    met = eval_metrics("synthetic", m, level, s, wise=m == "ft", score=0.5)
                    met = {k: v + gain if k.endswith("test/acc_avg") else v for k, v in met.items()}
                    met["soup/ingredients"] = 2
                    d = root / paths.soup_dir(m, kind, lv.name, s)
                    d.mkdir(parents=True)
                    (d / paths.EVAL_METRICS).write_text(json.dumps(met))
                    (d / paths.EVAL_SELECTION).write_text(json.dumps({
                        "soup": kind, "method": m, "protocol": "id_val", "split": "id_val", "trial": "+".join(names),
                        "ingredients": names, "order": names, "greedy": [], "alpha": met["selected/alpha"],
                        "level": lv.name, "seed": s}))


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        pfile = write_inputs(root, methods=METHODS)
        raw = yaml.safe_load(pfile.read_text())
        raw["evaluate"]["soups"] = ["uniform", "greedy"]
        pfile.write_text(yaml.safe_dump(raw, sort_keys=False))
        write_soups(root, ("ft", "lp", "flyp"))
        params = load_params(pfile)
        flat = report.run(report.ReportConfig.of(params))
        yield {"root": root, "flat": flat, "uri": f"sqlite:///{root / 'mlflow.db'}"}


ROWS = ["ft", "ft+uniform_soup", "ft+greedy_soup", "flyp", "flyp+uniform_soup", "flyp+greedy_soup",
        "lp", "lp+uniform_soup", "lp+greedy_soup"]


def test_rows_grouped_by_family_soups_after_their_method():
    assert families.ordered(["ft", "lp", "flyp", "ft+greedy_soup"]) == ["ft", "flyp", "ft+greedy_soup", "lp"]
    assert families.group(["lp", "vision_ft", "ft", "vision_lp+uniform_soup"]) == {
        "probe": ["lp"], "vision-only": ["vision_ft", "vision_lp+uniform_soup"], "robust": ["ft"]}
    assert families.family_of("flyp+greedy_soup") == "robust"
    cfg = report.ReportConfig(dataset="synthetic", arch="a", pretrained="b", methods=("ft", "lp"), levels=(), seeds=(),
                              soups={"ft": ("uniform", "greedy")})
    assert cfg.rows == ("ft", "ft+uniform_soup", "ft+greedy_soup", "lp")


def test_soup_rows_in_runs_and_summary(done):
    root = done["root"]
    runs = pd.read_csv(root / "reports/runs.csv", dtype={"level": str})
    assert list(dict.fromkeys(runs.loc[runs["method"] != "zeroshot", "method"])) == ROWS
    for row in ROWS:
        assert len(runs[runs["method"] == row]) == len(LEVELS) * len(SEEDS), row
    ft = runs[(runs["method"] == "ft") & (runs["level"] == "4")].set_index("seed")["ood"]
    soup = runs[(runs["method"] == "ft+greedy_soup") & (runs["level"] == "4")]
    assert soup["trial"].iloc[0] == "ft-lr3e-5+ft-lr1e-4"
    assert (soup.set_index("seed")["ood"] - ft).tolist() == pytest.approx([SOUP_GAIN["greedy"]] * len(SEEDS))
    assert done["flat"]["ft+uniform_soup/k4/ood"] == pytest.approx(done["flat"]["ft/k4/ood"] + SOUP_GAIN["uniform"])
    assert json.loads((root / "metrics/methods/lp+greedy_soup.json").read_text())


def test_summary_tables_one_per_family(done):
    md = (done["root"] / "reports/summary.md").read_text()
    results = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    robust, probe = results.split("### robust", 1)[1].split("### probe")
    for section, rows in ((robust, ROWS[:6]), (probe, ROWS[6:])):
        names = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
        names = [n for n in names if n not in ("method", "zero-shot") and not n.startswith("-")]
        assert list(dict.fromkeys(names)) == rows, section
        assert "| zero-shot" in section  # the reference row heads every family's table
    assert "**Model soups**" in md and "ft+greedy_soup" in md
    cost = md.split("## WiSE-FT selection and cost", 1)[1]
    assert "### robust" in cost and "### probe" in cost


def _png_width(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


def test_one_panel_per_family(done, tmp_path):
    """Two families: two panels side by side (wider than the one-panel figure of one family)."""
    from pipeline.report.plots import plot_vs_shots

    summary = pd.read_csv(done["root"] / "reports/summary.csv", dtype={"level": str})
    one = tmp_path / "one.png"
    plot_vs_shots(summary, "ood", "OOD", "t", one)
    two = done["root"] / "reports/ood_vs_shots.png"
    assert _png_width(two) > 1.2 * _png_width(one)
    only_robust = summary[summary["method"].isin(["zeroshot", "ft", "flyp"])]
    single = tmp_path / "single.png"
    families.plot_vs_shots_by_family(only_robust, "ood", "OOD", "t", single)
    assert _png_width(single) == _png_width(one)


def test_mlflow_run_logs_headlines_and_the_tables(done):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(done["uri"])
    exp = client.get_experiment_by_name("synthetic")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.level = 'report'")
    m = run.data.metrics
    # MLflow names allow no '+': a soup row is `ft.greedy_soup` there
    want = {f"curve/{r.replace('+', '.')}/{c}" for r in ROWS for c in ("selected_id", "selected_ood")}
    assert {k for k in m if k.startswith("curve/")} == want
    assert len(m) == 2 * len(ROWS) + 5 and m["rows"] == len(ROWS)
    history = client.get_metric_history(run.info.run_id, "curve/ft.greedy_soup/selected_ood")
    last = max(history, key=lambda h: h.step)
    assert last.value == pytest.approx(done["flat"]["ft+greedy_soup/25%/selected_ood"])
    assert not math.isnan(last.value)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "summary_table.json", "report_metrics.json", "summary.csv", "runs.csv"} <= names
    assert run.data.params["rows"] == ",".join(ROWS) and run.data.params["methods"] == "ft,lp,flyp"


def test_compare_ranks_soup_rows_and_logs_them(done, monkeypatch):
    """`compare` reads runs.csv: a soup row takes part like a method, and its rank is logged
    under an MLflow-valid name."""
    from mlflow.tracking import MlflowClient

    from pipeline.report import compare as cmp
    from pipeline.report.crosstask import Experiment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", done["uri"])
    runs = pd.read_csv(done["root"] / "reports/runs.csv", dtype={"level": str})
    other = runs.copy()
    other["dataset"] = "other"
    other.loc[other["method"] == "ft+greedy_soup", ["selected_ood", "selected_id"]] += 0.3
    exps = [Experiment("a", "a", {"dataset.name": "synthetic"}), Experiment("b", "b", {"dataset.name": "other"})]
    c = cmp.compare(exps, lambda e: runs if e.name == "a" else other, level="4")
    assert "ft+greedy_soup" in c.ranks["ood"].ranks.index
    rid = cmp.log(c, [], level="4")
    logged = MlflowClient(done["uri"]).get_run(rid).data.metrics
    assert logged["rank/ood/ft.greedy_soup"] == pytest.approx(float(c.ranks["ood"].ranks["ft+greedy_soup"]))


def test_a_soup_is_drawn_in_its_methods_colour_with_its_own_marker():
    from pipeline.report.plots import method_style

    colour, marker = method_style("dive")
    assert method_style("dive+greedy_soup")[0] == method_style("dive+uniform_soup")[0] == colour
    assert len({marker, method_style("dive+greedy_soup")[1], method_style("dive+uniform_soup")[1]}) == 3
