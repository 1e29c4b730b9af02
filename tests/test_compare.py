"""The answer with significance (pipeline/report/compare.py, `python -m pipeline compare`): the
paired tests over seeds and the rank tests over tasks agree with scipy computed directly on
hand-built tables (Holm's correction and the Nemenyi p-values recomputed here from their
definitions), the plain-language lines, the command on a small multi-experiment set (the
`dvc exp show` nesting of tests/test_crosstask.py), its MLflow run and the UI's links."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from pipeline.report import compare as cmp
from tests.test_crosstask import EXP_SHOW


def holm_by_hand(p):
    """Holm (1979): sort ascending, multiply the i-th smallest (0-based) by m − i, running
    maximum, at most 1."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (len(p) - i) * p[j]))
        adjusted[j] = running
    return adjusted


SEEDS = (0, 1, 2, 3)
# seed × method (one level): dive best, ft close to it, lp clearly below, zeroshot flat
TABLE = {"ft": [0.61, 0.66, 0.60, 0.65], "lp": [0.52, 0.55, 0.50, 0.53], "dive": [0.63, 0.655, 0.62, 0.67],
         "flyp": [0.60, 0.64, 0.61, 0.62]}
ZS_OOD, ZS_ID = 0.50, 0.58


def make_runs(table=TABLE, level="16", zs_ood=ZS_OOD, shift_id=0.1, dataset="synthetic", levels=None):
    rows = [{"dataset": dataset, "method": "zeroshot", "level": "0", "seed": pd.NA, "selected_ood": zs_ood,
             "selected_id": ZS_ID, "ood": 0.0, "id": 0.0}]
    for lv in levels or [level]:
        for m, values in table.items():
            for s, v in zip(SEEDS, values):
                # `ood`/`id` (α = 1, not the selected α) are decoys: compare must never read them
                rows.append({"dataset": dataset, "method": m, "level": lv, "seed": s, "selected_ood": v,
                             "selected_id": v + shift_id, "ood": 1.0 - v, "id": 1.0 - v})
    runs = pd.DataFrame(rows)
    runs["seed"] = runs["seed"].astype("Int64")
    return runs


# ---------------------------------------------------------------------------------------------
# paired over seeds


def test_paired_tests_equal_scipy_with_holm():
    tests = cmp.paired_tests(make_runs(), "ood")
    vs_best = tests[tests["reference"] == "best"].set_index("method")
    assert set(vs_best["ref_method"]) == {"dive"}  # the highest mean
    others = ["ft", "lp", "flyp"]
    raw = [stats.ttest_rel(TABLE[m], TABLE["dive"]).pvalue for m in others]
    for m, p, adjusted in zip(others, raw, holm_by_hand(raw)):
        assert vs_best.loc[m, "p"] == pytest.approx(p, rel=1e-12)
        assert vs_best.loc[m, "p_holm"] == pytest.approx(adjusted, rel=1e-12)
        assert vs_best.loc[m, "diff"] == pytest.approx(np.mean(np.subtract(TABLE[m], TABLE["dive"])))
        assert vs_best.loc[m, "seeds"] == 4 and vs_best.loc[m, "significant"] == (adjusted < 0.05)
    assert math.isnan(vs_best.loc["dive", "p"]) and not vs_best.loc["dive", "significant"]
    assert vs_best.loc["lp", "significant"] and not vs_best.loc["ft", "significant"]
    # against zero-shot: one value, so the paired test is the one-sample test of the differences
    vs_zero = tests[tests["reference"] == "zero-shot"].set_index("method")
    methods = list(TABLE)
    raw = [stats.ttest_1samp(np.subtract(TABLE[m], ZS_OOD), 0.0).pvalue for m in methods]
    for m, p, adjusted in zip(methods, raw, holm_by_hand(raw)):
        assert vs_zero.loc[m, "p"] == pytest.approx(p, rel=1e-9)
        assert vs_zero.loc[m, "p_holm"] == pytest.approx(adjusted, rel=1e-9)
        assert vs_zero.loc[m, "ref_mean"] == ZS_OOD
    assert vs_zero["significant"].to_dict() == {"ft": True, "lp": False, "dive": True, "flyp": True}


def test_wilcoxon_equals_scipy_and_cannot_reject_with_few_seeds():
    tests = cmp.paired_tests(make_runs(), "ood", test="wilcoxon")
    vs_best = tests[tests["reference"] == "best"].set_index("method")
    raw = [stats.wilcoxon(TABLE[m], TABLE["dive"]).pvalue for m in ("ft", "lp", "flyp")]
    assert list(vs_best.loc[["ft", "lp", "flyp"], "p"]) == pytest.approx(raw)
    assert min(raw) >= 2 / 2 ** 4  # 4 seeds: the exact p is at least 0.125
    assert not vs_best["significant"].any()
    with pytest.raises(ValueError, match="allowed values are t, wilcoxon"):
        cmp.paired_tests(make_runs(), "ood", test="sign")


def test_the_tests_read_only_the_selected_figures():
    """`selected_ood` / `selected_id`: the test figures of the trial and α chosen on validation
    data. The α = 1 columns (`ood`, `id`) are decoys here (reversed order of methods)."""
    assert cmp.FIGURES == {"ood": "selected_ood", "id": "selected_id"}
    runs = make_runs()
    base = cmp.paired_tests(runs, "ood")
    scrambled = runs.assign(ood=np.random.default_rng(0).random(len(runs)), id=0.0)
    pd.testing.assert_frame_equal(base, cmp.paired_tests(scrambled, "ood"))
    assert set(base.loc[base["reference"] == "best", "ref_method"]) == {"dive"}
    ids = cmp.paired_tests(runs, "id").set_index(["reference", "method"])
    assert ids.loc[("zero-shot", "ft"), "diff"] == pytest.approx(np.mean(TABLE["ft"]) + 0.1 - ZS_ID)


def test_pairs_are_the_seeds_both_have_and_one_seed_tests_nothing():
    table = {"ft": [0.58, 0.69, math.nan, 0.64], "lp": [0.5, 0.55, 0.52, 0.53], "dive": [0.62, 0.71, 0.6, 0.66]}
    tests = cmp.paired_tests(make_runs(table), "ood").set_index(["reference", "method"])
    assert tests.loc[("best", "ft"), "seeds"] == 3
    assert tests.loc[("best", "ft"), "p"] == pytest.approx(
        stats.ttest_rel([0.58, 0.69, 0.64], [0.62, 0.71, 0.66]).pvalue)
    one = make_runs({m: v[:1] for m, v in TABLE.items()})
    lone = cmp.paired_tests(one, "ood")
    assert lone["p"].isna().all() and not lone["significant"].any()
    assert cmp.summary_lines(lone) == ["**k=16** (1 seed) — no paired test: it needs 2 or more seeds per method "
                                       "(sample.seeds)."]


def test_equal_and_constant_differences():
    assert cmp.paired_p([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]) == 1.0
    assert cmp.paired_p([0.5, 0.6, 0.7], [0.4, 0.5, 0.6]) == pytest.approx(0.0, abs=1e-12)
    assert cmp.paired_p([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]) == stats.ttest_rel([1, 2, 3], [0.5, 1.5, 2.5]).pvalue
    assert math.isnan(cmp.paired_p([0.5], [0.4]))


def test_a_line_per_level_in_plain_language():
    runs = pd.concat([make_runs(), make_runs(level="1").iloc[1:]], ignore_index=True)
    tests = pd.concat([cmp.paired_tests(runs, v) for v in ("ood", "id")], ignore_index=True)
    lines = cmp.summary_lines(tests)
    assert [line.split(" ")[0] for line in lines] == ["**k=1**", "**k=16**"]  # levels in order
    assert lines[1].startswith("**k=16** (4 seeds) — OOD: best dive (0.644); indistinguishable from it: ft, flyp; "
                               "below it: lp; beat zero-shot (0.500): ft, dive, flyp. ID: best dive")


def test_power_note_equals_the_noncentral_t():
    """The effect size found with 80 % power, recomputed from the noncentral t distribution."""
    def power(d, n):
        t = stats.t.ppf(0.975, n - 1)
        nc = d * math.sqrt(n)
        return stats.nct.sf(t, n - 1, nc) + stats.nct.cdf(-t, n - 1, nc)

    for n in (3, 5):
        d = optimize.brentq(lambda x: power(x, n) - 0.8, 0.5, 4)  # (scipy's nct tail is NaN far out)
        note = cmp.power_note(n)
        assert f"a difference of {d:.1f} such standard deviations with 80% power" in note
        assert f"{stats.t.ppf(0.975, n - 1) / math.sqrt(n):.2f}× the standard deviation" in note
    assert "no paired test" in cmp.power_note(1)


# ---------------------------------------------------------------------------------------------
# ranks over tasks


RANKED = pd.DataFrame(  # tasks × methods (higher is better); ties in task d
    {"ft": [0.70, 0.61, 0.80, 0.50, 0.66, 0.71], "lp": [0.65, 0.60, 0.72, 0.50, 0.60, 0.69],
     "dive": [0.72, 0.64, 0.79, 0.52, 0.70, 0.74], "zero-shot": [0.50, 0.58, 0.60, 0.45, 0.55, 0.52]},
    index=[f"task{i}" for i in range(6)])


def test_rank_test_equals_scipy_and_the_nemenyi_definition():
    result = cmp.rank_test(RANKED, "ood")
    n, k = RANKED.shape
    ranks = np.mean([stats.rankdata(-row) for row in RANKED.to_numpy()], axis=0)
    assert dict(result.ranks) == pytest.approx(dict(zip(RANKED.columns, ranks)))
    assert list(result.ranks.index) == ["dive", "ft", "lp", "zero-shot"]  # best first
    chi2, p = stats.friedmanchisquare(*RANKED.T.to_numpy())
    assert (result.friedman_stat, result.friedman_p) == (pytest.approx(chi2), pytest.approx(p))
    se = math.sqrt(k * (k + 1) / (6 * n))
    for a, ra in zip(RANKED.columns, ranks):
        for b, rb in zip(RANKED.columns, ranks):
            want = 1.0 if a == b else stats.studentized_range.sf(abs(ra - rb) / se * math.sqrt(2), k, np.inf)
            assert result.nemenyi.loc[a, b] == pytest.approx(want)
    # Demšar's critical difference: q_0.05 (k = 4, ∞ df) / √2 = 2.569
    assert result.cd == pytest.approx(2.569 * se, rel=1e-3)
    for a, ra in zip(RANKED.columns, ranks):  # the CD and the p-values say the same thing
        for b, rb in zip(RANKED.columns, ranks):
            if a != b:
                assert (abs(ra - rb) > result.cd) == (result.nemenyi.loc[a, b] < 0.05)
    assert result.indistinguishable_from_best() == ["ft", "lp"]
    md = "\n".join(cmp.rank_markdown(result))
    assert f"Friedman χ² = {chi2:.2f}" in md and "| dive | 1.17 | – |" in md


def test_the_cd_bar_sits_above_the_rank_axis_labels(tmp_path):
    """The diagram's CD bar and its label are drawn clear of the rank axis's tick labels (where
    scikit-posthocs puts them they overlap), the bar as long as the critical difference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    result = cmp.rank_test(RANKED, "ood")
    cmp.cd_diagram(result, tmp_path / "cd.png")
    assert (tmp_path / "cd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = cmp.cd_figure(result)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    (ax,) = fig.axes
    ticks_top = max(t.get_window_extent(renderer).y1 for t in ax.get_xticklabels() if t.get_text())
    bars = [line for line in ax.lines if len(line.get_xdata()) == 2
            and abs(np.ptp(line.get_xdata()) - result.cd) < 1e-9 and np.ptp(line.get_ydata()) == 0]
    assert len(bars) == 1
    bar_y = ax.transData.transform((0, bars[0].get_ydata()[0]))[1]
    (label,) = [t for t in ax.texts if t.get_text().startswith("CD = ")]
    assert bar_y > ticks_top and label.get_window_extent(renderer).y0 > ticks_top


def test_a_method_missing_from_a_task_is_left_out_and_too_little_is_refused():
    table = RANKED.copy()
    table.loc["task2", "lp"] = math.nan
    result = cmp.rank_test(table, "ood")
    assert "lp" not in result.ranks and result.left_out == {"lp": ["task2"]}
    assert "Left out (missing from a task): lp (task2)." in "\n".join(cmp.rank_markdown(result))
    with pytest.raises(ValueError, match="2 or more tasks and 3 or more methods"):
        cmp.rank_test(RANKED.iloc[:1], "ood")
    with pytest.raises(ValueError, match="have 6 task\\(s\\) and 2 method"):
        cmp.rank_test(RANKED[["ft", "lp"]], "ood")


def test_task_table_has_a_task_per_experiment_and_level_with_zero_shot():
    per = {"synthetic/shape": make_runs(levels=["1", "16"]), "synthetic/size": make_runs(levels=["16"])}
    table = cmp.task_table(per, "ood")
    assert list(table.index) == ["synthetic/shape @ k=1", "synthetic/shape @ k=16", "synthetic/size @ k=16"]
    assert list(table.columns) == [*TABLE, "zero-shot"]
    assert table.loc["synthetic/size @ k=16", "ft"] == pytest.approx(np.mean(TABLE["ft"]))
    assert (table["zero-shot"] == ZS_OOD).all()
    assert list(cmp.task_table(per, "ood", level="16").index) == ["synthetic/shape @ k=16", "synthetic/size @ k=16"]
    assert "zero-shot" not in cmp.task_table(per, "ood", zero_shot=False)


# ---------------------------------------------------------------------------------------------
# the command on a multi-experiment set


def _runs_of(rev: str) -> pd.DataFrame | None:
    """reports/runs.csv per revision of EXP_SHOW: every synthetic task but the baselines."""
    if rev in ("workspace",) or not rev.isalnum() or len(rev) != 40 or rev[0] == "1":
        return None
    rng = np.random.default_rng(int(rev[0], 16))
    table = {m: list(np.asarray(v) + rng.normal(0, 0.01, len(v))) for m, v in TABLE.items()}
    return make_runs(table, levels=["1", "16"], zs_ood=ZS_OOD + rng.normal(0, 0.01))


@pytest.fixture
def command(tmp_path, monkeypatch):
    from pipeline import cli
    from pipeline.core import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(tracking, "_CLIENTS", {})
    calls = []
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):  # `dvc exp show` answers EXP_SHOW; anything else (MLflow's, git) runs
        if "exp" not in cmd:
            return real_run(cmd, **kwargs)
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(EXP_SHOW), stderr="")

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    monkeypatch.setattr(cmp, "read_runs_csv", lambda e: _runs_of(e.rev))
    return {"calls": calls, "root": tmp_path}


@pytest.mark.slow
def test_the_command_ranks_the_experiments_and_logs_the_answer(command, monkeypatch):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from pipeline import cli
    from pipeline.core import tracking

    out = command["root"] / "cmp"
    done = CliRunner().invoke(cli.app, ["compare", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert command["calls"][0][-3:] == ["exp", "show", "--json"]
    # one experiment per task: xt-colour-again repeats colour; failed and queued ones are not read
    assert "Experiments, one per task: synthetic/shape, synthetic/colour, synthetic/size, synthetic/texture" in done.output
    md = (out / "compare.md").read_text()
    assert "- xt-colour-again: task synthetic/colour already given by xt-colour" in md
    assert "OOD over 8 tasks, 5 methods" in md and "## synthetic/size: per level, paired over seeds" in md
    for name in ("cd_ood.png", "cd_id.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ranks = pd.read_csv(out / "ranks_ood.csv")
    assert len(ranks) == 9 and ranks["task"].iloc[-1] == "average rank"  # 8 tasks + the average
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["task"]) == {"synthetic/shape", "synthetic/colour", "synthetic/size", "synthetic/texture"}
    # the MLflow run carries the answer, and the UI's first link opens it
    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name("compare")
    (run,) = client.search_runs([exp.experiment_id])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"compare.md", "cd_ood.png", "cd_id.png", "paired.csv", "ranks_ood.csv", "nemenyi_id.csv"} <= names
    assert run.data.metrics["rank/ood/dive"] == pytest.approx(float(ranks.loc[8, "dive"]))
    assert run.data.params["post_hoc"] == "nemenyi" and run.data.params["correction"] == "holm"
    tracking.log_run("synthetic", "report", "report", {}, {tracking.RUN_KIND: "report"}, {"m": 1.0})
    pages = tracking.answer_pages("http://127.0.0.1:5000")
    first, second = list(pages.items())[:2]
    assert first == ("across experiments: ranks, CD diagrams",
                     f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/artifacts/compare.md")
    assert second[0] == "synthetic report: tests per level" and second[1].endswith("/artifacts/summary.md")
    # `python -m pipeline ui` prints them first (the server itself is not started here)
    monkeypatch.setattr(cli, "_run_group", lambda cmd: 0)
    shown = CliRunner().invoke(cli.app, ["ui"]).output.splitlines()
    assert shown[1] == "The answer:" and shown[2] == f"  {first[0]}: {first[1]}" and shown[3] == f"  {second[0]}: {second[1]}"
    assert shown[4] == "Experiments:" and any(line.startswith("  compare: http://") for line in shown)
    # again: the run is replaced, not added
    assert CliRunner().invoke(cli.app, ["compare", "--out", str(out), "--level", "16"]).exit_code == 0
    (again,) = client.search_runs([exp.experiment_id])
    assert again.data.params["level"] == "16" and again.data.metrics["tasks/ood"] == 4


def test_bad_options_and_no_experiments(command, monkeypatch):
    from typer.testing import CliRunner

    from pipeline import cli

    runner = CliRunner()
    bad = runner.invoke(cli.app, ["compare", "--test", "sign"])
    assert bad.exit_code != 0 and "allowed values are t, wilcoxon" in bad.output
    bad = runner.invoke(cli.app, ["compare", "--level", "0"])
    assert bad.exit_code != 0 and "--level" in bad.output
    bad = runner.invoke(cli.app, ["compare", "--methods", "ft,lora", "--out", str(command["root"] / "none")])
    assert bad.exit_code != 0 and "lora: in no experiment's runs" in bad.output
    monkeypatch.setattr(cmp, "read_runs_csv", lambda e: None)
    none = runner.invoke(cli.app, ["compare", "--out", str(command["root"] / "none")])
    assert none.exit_code == 1 and "no experiment with reports/runs.csv" in none.output
    assert not (command["root"] / "none").exists()


def test_read_runs_csv_of_the_workspace(tmp_path):
    from pipeline.report.crosstask import Experiment

    assert cmp.read_runs_csv(Experiment("workspace", "workspace", {}), tmp_path) is None
    (tmp_path / "reports").mkdir()
    make_runs().to_csv(tmp_path / "reports" / "runs.csv", index=False)
    runs = cmp.read_runs_csv(Experiment("workspace", "workspace", {}), tmp_path)
    assert runs["seed"].dtype == "Int64" and runs["level"].tolist()[:2] == ["0", "16"]
    pd.testing.assert_frame_equal(cmp.paired_tests(runs, "ood"), cmp.paired_tests(make_runs(), "ood"))
