"""The experiments leaderboard (`python -m pipeline leaderboard`) from `dvc exp show --json`
(the nesting DVC 3 prints: the workspace, then each commit with its experiments)."""

from __future__ import annotations

from pipeline.report.leaderboard import entries, render


def _rev(name, metrics, selection):
    return {"rev": name, "name": name, "data": {
        "rev": name, "metrics": {f"metrics/methods/{m}.json": {"data": v} for m, v in metrics.items()},
        "params": {"params.yaml": {"data": {"evaluate": {"selection": selection}, "seed": 0}}}}}


EXP_SHOW = [
    {**_rev("workspace", {"lp": {"k=4/id": 0.6, "k=4/ood": 0.30, "k=16/ood": 0.40},
                          "dive": {"k=4/id": 0.7, "k=4/ood": 0.45, "k=16/ood": 0.55}}, "id_val"),
     "experiments": None},
    {**_rev("1f2e3d4c5b6a79880000111122223333aaaabbbb", {"lp": {"k=4/ood": 0.1}}, "id_val"),
     "experiments": [{"revs": [_rev("exp-oracle", {"dive": {"k=4/ood": 0.50, "k=16/ood": 0.60}}, "oracle")],
                      "name": "exp-oracle"}]},
]


def test_rows_per_experiment_and_method():
    rows = entries(EXP_SHOW)
    found = {(r.experiment, r.method): r.values for r in rows}
    assert found[("workspace", "dive")] == {"k=4": 0.45, "k=16": 0.55}
    assert found[("exp-oracle", "dive")] == {"k=4": 0.50, "k=16": 0.60}
    assert found[("1f2e3d4", "lp")] == {"k=4": 0.1}  # a commit's long hash is shortened
    assert {r.values.get("k=4") for r in entries(EXP_SHOW, "id")} >= {0.6, 0.7}


def test_the_table_is_sorted_by_the_mean_and_fits():
    text = render(entries(EXP_SHOW), width=80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    header, first, second = lines[1].split(), lines[2].split(), lines[3].split()
    assert header[:5] == ["experiment", "method", "k=4", "k=16", "mean"] and header[-1] == "selection"
    assert first[:2] == ["exp-oracle", "dive"] and first[4] == "0.550" and first[-1] == "oracle"
    assert second[:2] == ["workspace", "dive"]
    assert lines[-1].split()[:2] == ["1f2e3d4", "lp"] and "-" in lines[-1].split()  # no k=16 there


def test_no_metrics_says_what_to_run():
    assert "run `dvc repro`" in render(entries([{"rev": "workspace", "data": {"metrics": {}, "params": {}}}]))
