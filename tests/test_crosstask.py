"""The cross-task predictor (pipeline/report/crosstask.py, `python -m pipeline crosstask`): the
least-squares fit and R², the experiments read from `dvc exp show --json` (the nesting DVC 3
prints), the choice of comparable experiments, and the files written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.report.crosstask import (Experiment, Point, collect, experiments, least_squares, least_squares_fit,
                                       level_key, markdown, write)


# ---------------------------------------------------------------------------------------------
# the fit


def test_least_squares_matches_polyfit_and_the_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = 0.4 - 1.7 * x + rng.normal(scale=0.5, size=12)
    slope, intercept, r2, p = least_squares(x, y)
    b, a = np.polyfit(x, y, 1)
    assert slope == pytest.approx(b) and intercept == pytest.approx(a)
    residual = y - (a + b * x)
    assert r2 == pytest.approx(1 - (residual ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert r2 == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    assert 0 < p < 1e-3  # a strong slope over 12 points


def test_least_squares_on_exact_lines_and_degenerate_inputs():
    slope, intercept, r2, _ = least_squares([0.0, 1.0, 2.0, 4.0], [1.0, 3.0, 5.0, 9.0])
    assert (slope, intercept) == (pytest.approx(2.0), pytest.approx(1.0)) and r2 == pytest.approx(1.0)
    two = least_squares([1.0, 3.0], [2.0, 0.0])
    assert two[:2] == (pytest.approx(-1.0), pytest.approx(3.0)) and math.isnan(two[3])  # no p from 2 points
    assert all(math.isnan(v) for v in least_squares([1.0], [2.0]))
    assert all(math.isnan(v) for v in least_squares([2.0, 2.0, 2.0], [0.0, 1.0, 2.0]))  # no slope
    flat = least_squares([0.0, 1.0, 2.0], [0.5, 0.5, 0.5])
    assert flat[:2] == (0.0, 0.5) and math.isnan(flat[2])


def test_a_fit_uses_the_points_that_have_the_score():
    points = [Point("a", "e1", {"iimm": 0.1, "transfer/gbc": -3.0}, {"id": 0.2, "ood": 0.0}),
              Point("b", "e2", {"iimm": 0.3}, {"id": 0.6, "ood": -0.1}),
              Point("c", "e3", {"iimm": 0.5, "transfer/gbc": -1.0}, {"id": 1.0, "ood": -0.2})]
    fit = least_squares_fit(points, "iimm", "id")
    assert fit.n == 3 and fit.slope == pytest.approx(2.0) and fit.intercept == pytest.approx(0.0)
    assert least_squares_fit(points, "transfer/gbc", "ood").n == 2


# ---------------------------------------------------------------------------------------------
# inputs


def _rev(rev: str, name: str | None, label: str | None, n_train: int = 200) -> dict:
    synthetic = {"n_train": n_train} if label is None else {"n_train": n_train, "label": label}
    return {"rev": rev, "name": name, "error": None, "data": {
        "rev": rev, "metrics": {},
        "params": {"params.yaml": {"data": {"dataset": {"name": "synthetic"}, "seed": 0,
                                            "prepare": {"synthetic": synthetic}}}}}}


def _exp(rev: str, name: str, label: str, state: str = "success", n_train: int = 200) -> dict:
    return {"revs": [_rev(rev, name, label, n_train)], "name": name, "executor": {"state": state}}


SHA = "1f2e3d4c5b6a79880000111122223333aaaabbbb"
EXP_SHOW = [
    {**_rev("workspace", None, None, n_train=4000), "experiments": None},
    {**_rev(SHA, "main", None, n_train=4000), "experiments": [
        _exp("a" * 40, "xt-shape", "shape"),
        _exp("b" * 40, "xt-colour", "colour"),
        _exp("c" * 40, "xt-size", "size"),
        _exp("d" * 40, "xt-colour-again", "colour"),
        _exp("e" * 40, "xt-texture", "texture", state="failed"),
        _exp("f" * 40, "xt-queued", "texture", state="queued"),
        _exp("0" * 40, "xt-other", "texture", n_train=100),
    ]},
]


def _report(iimm: float, d_id: float, d_ood: float, transfer: bool = True) -> dict:
    zero_id, zero_ood = 0.3, 0.25
    out = {"zeroshot/id": zero_id, "zeroshot/ood": zero_ood, "zeroshot/iimm": iimm,
           "ft/k1/id": zero_id + d_id / 2, "ft/k1/ood": zero_ood, "ft/k1/n_train": 8.0,
           "ft/k16/id": zero_id + d_id, "ft/k16/ood": zero_ood + d_ood, "ft/k16/n_train": 128.0,
           "lp/k16/id": 0.9}
    if transfer:
        out.update({"zeroshot/transfer/h_score": 10 * iimm, "zeroshot/transfer/logme": 1.0 - iimm})
    return out


REPORTS = {"workspace": _report(0.9, 0.5, 0.1), "a" * 40: _report(0.2, 0.3, -0.05),
           "b" * 40: _report(0.4, 0.5, -0.10, transfer=False), "c" * 40: _report(0.6, 0.7, -0.15),
           "d" * 40: _report(0.0, 0.0, 0.0), "0" * 40: _report(0.1, 0.1, 0.1)}


def _read(e: Experiment) -> dict | None:
    return REPORTS.get(e.rev)


def test_experiments_of_dvc_exp_show_are_the_finished_revisions_in_order():
    exps = experiments(EXP_SHOW)
    assert [e.name for e in exps] == ["workspace", "main", "xt-shape", "xt-colour", "xt-size", "xt-colour-again",
                                      "xt-other"]
    assert [e.task for e in exps] == ["synthetic", "synthetic", "synthetic/shape", "synthetic/colour",
                                      "synthetic/size", "synthetic/colour", "synthetic/texture"]
    assert exps[2].params["prepare.synthetic.n_train"] == 200 and exps[2].rev == "a" * 40
    assert exps[2].settings == exps[3].settings != exps[0].settings  # the label is not a setting
    assert experiments([{"rev": "workspace", "error": {"type": "x"}, "data": None}]) == []
    nameless = experiments([{**_rev(SHA, None, None)}])
    assert nameless[0].name == SHA[:7]


def test_collect_keeps_one_comparable_experiment_per_task():
    result = collect(experiments(EXP_SHOW), _read)
    assert result.level == "k16"  # the method's largest level by default
    assert [p.task for p in result.points] == ["synthetic/shape", "synthetic/colour", "synthetic/size"]
    colour = result.points[1]
    assert colour.experiment == "xt-colour" and colour.scores == {"iimm": 0.4}  # no transfer scores in it
    assert colour.changes == {"id": pytest.approx(0.5), "ood": pytest.approx(-0.10)}
    why = dict(result.skipped)
    assert set(why) == {"workspace", "main", "xt-colour-again", "xt-other"}
    assert "other settings" in why["workspace"] and "other settings" in why["xt-other"]
    assert "no metrics/report.json" in why["main"]
    assert "already given by xt-colour" in why["xt-colour-again"]
    assert result.scores == ["iimm", "transfer/h_score", "transfer/logme"]
    fits = {(f.score, f.change): f for f in result.fits}
    assert fits[("iimm", "id")].slope == pytest.approx(1.0) and fits[("iimm", "id")].r2 == pytest.approx(1.0)
    assert fits[("iimm", "ood")].slope == pytest.approx(-0.25) and fits[("iimm", "ood")].n == 3
    assert fits[("transfer/h_score", "id")].n == 2 and fits[("transfer/h_score", "id")].slope == pytest.approx(0.1)


def test_collect_at_another_level_and_method():
    at_k1 = collect(experiments(EXP_SHOW), _read, level="k1")
    assert [p.changes["ood"] for p in at_k1.points] == [0.0, 0.0, 0.0]
    assert at_k1.points[2].changes["id"] == pytest.approx(0.35)
    lp = collect(experiments(EXP_SHOW), _read, method="lp", level="k16")
    assert [p.changes for p in lp.points] == [{"id": pytest.approx(0.6)}] * 3  # lp has no OOD figure here
    missing = collect(experiments(EXP_SHOW), _read, method="dive")
    why = dict(missing.skipped)
    assert not missing.points and all(why[n] == "its report has no dive results" for n in ("xt-shape", "xt-size"))


def test_level_key_is_the_report_key():
    assert level_key("16") == "k16" and level_key("25%") == "25%"
    with pytest.raises(ValueError, match="--level"):
        level_key("0")


# ---------------------------------------------------------------------------------------------
# outputs


def test_write_the_plot_and_tables(tmp_path):
    result = collect(experiments(EXP_SHOW), _read)
    files = write(result, tmp_path / "out")
    png = tmp_path / "out" / "crosstask.png"
    assert png in files and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads((tmp_path / "out" / "crosstask.json").read_text())
    assert data["method"] == "ft" and data["level"] == "k16" and len(data["points"]) == 3
    fit = next(f for f in data["fits"] if f["score"] == "iimm" and f["change"] == "id")
    assert fit["r2"] == pytest.approx(1.0) and fit["n"] == 3
    h = next(f for f in data["fits"] if f["score"] == "transfer/h_score" and f["change"] == "id")
    assert h["p_value"] is None  # NaN as null: strict JSON
    md = (tmp_path / "out" / "crosstask.md").read_text()
    assert "| iimm | Δ ID | 1 | 0.1 | 1 | " in md  # Δ ID = 0.1 + IIMM in REPORTS
    assert "Not in any report: transfer/gbc, transfer/transrate." in md
    assert "- xt-colour-again: task synthetic/colour already given by xt-colour" in md
    assert markdown(result) == md


def test_the_command_reads_dvc_exp_show_and_writes_the_files(tmp_path, monkeypatch):
    import subprocess

    from typer.testing import CliRunner

    import pipeline.report.crosstask as crosstask
    from pipeline import cli

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(EXP_SHOW), stderr="")

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    monkeypatch.setattr(crosstask, "read_report", _read)
    runner = CliRunner()
    done = runner.invoke(cli.app, ["crosstask", "--level", "16", "--out", str(tmp_path / "xt")])
    assert done.exit_code == 0, done.output
    assert calls and calls[0][-3:] == ["exp", "show", "--json"]
    assert (tmp_path / "xt" / "crosstask.png").is_file() and "| iimm | Δ ID | 1 | 0.1 | 1 |" in done.output
    bad = runner.invoke(cli.app, ["crosstask", "--level", "0"])
    assert bad.exit_code != 0 and "--level" in bad.output
    lone = runner.invoke(cli.app, ["crosstask", "--method", "dive", "--out", str(tmp_path / "none")])
    assert lone.exit_code == 1 and not (tmp_path / "none").exists()
