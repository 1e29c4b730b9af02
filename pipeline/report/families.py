"""A report that stays readable with twenty methods: rows grouped by the family each method
declares (`Method.family`: robust, peft, probe, vision-only, ...; the report names no method),
one panel per family in the figures against the level, and a summary MLflow run that logs a few
headline numbers per row while the full tables go in as artifacts.

A soup row (`ft+greedy_soup`, `pipeline.evaluation.soups`) belongs to its method's family and
follows its method. Families appear in the order of their first method in `finetune.methods`;
within a family, params.yaml's order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from pipeline.evaluation.soups import base_method
from pipeline.report.inputs import ZEROSHOT

OTHER = "other"  # a method that declares no family (Method.family's default)


def family_of(row: str) -> str:
    """The family of a report row (a method's, or its soup's: the method's)."""
    from pipeline.methods import METHODS

    method = base_method(row)
    return getattr(METHODS[method], "family", OTHER) if method in METHODS else OTHER


def group(rows: Iterable[str]) -> dict[str, list[str]]:
    """{family: its rows}, families in order of first appearance, rows in the given order."""
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(family_of(r), []).append(r)
    return out


def ordered(rows: Iterable[str]) -> list[str]:
    """The rows, family by family (the report's order)."""
    return [r for rows_ in group(rows).values() for r in rows_]


def family_tables(header: list[str], rows: list[tuple[str, list[str]]], align: list[str], md_table,
                  zero_row: list[str] | None = None) -> list[str]:
    """Markdown: one table per family (`### <family>`) when the rows span several, else one.
    `rows`: (report row, cells); `zero_row`: the zero-shot model's cells, first in every table
    (the reference each family is read against)."""
    groups: dict[str, list[list[str]]] = {}
    for name, cells in rows:
        groups.setdefault(family_of(name), []).append(cells)
    lead = [zero_row] if zero_row else []
    if len(groups) <= 1:
        return [md_table(header, lead + [c for cells in groups.values() for c in cells], align), ""]
    out: list[str] = []
    for fam, cells in groups.items():
        out += [f"### {fam}", "", md_table(header, lead + cells, align), ""]
    return out


# ---------------------------------------------------------------------------------------------
# figures


def plot_vs_shots_by_family(summary: pd.DataFrame, col: str, ylabel: str, title: str, path: Path) -> None:
    """`plot_vs_shots` with one panel per family (one y range for all: they compare at a
    glance), each method with its 95 % CI band and bars, zero-shot dashed in every panel; a
    single family gives the one-panel figure."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    from pipeline.report import plots

    fine = plots._fine(summary)
    groups = group(plots._methods(summary))
    if len(groups) <= 1:
        plots.plot_vs_shots(summary, col, ylabel, title, path)
        return
    zero = summary[(summary["method"] == ZEROSHOT) & (summary["level"] == "0")]
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    with rc_context(plots._RC):
        fig = Figure(figsize=(5.6 * ncols, 4.2 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    zs = plots._zs_value(summary, col)
    for ax, (fam, rows) in zip(axes, groups.items()):
        part = pd.concat([zero, fine[fine["method"].isin(rows)]])
        plots._lines_vs_shots(ax, part, col, zs, "zero-shot")
        ax.set_title(fam, loc="left")
        ax.set_ylabel(ylabel)
        ax.legend(loc="best", fontsize=8, frameon=False)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    lows = (fine[f"{col}_mean"] - fine[f"{col}_ci"].fillna(0)).to_numpy(float)
    highs = (fine[f"{col}_mean"] + fine[f"{col}_ci"].fillna(0)).to_numpy(float)
    bounds = [v for v in (*lows, *highs, zs) if np.isfinite(v)]
    if bounds:
        pad = 0.06 * (max(bounds) - min(bounds)) + 0.01
        for ax in axes[: len(groups)]:
            ax.set_ylim(min(bounds) - pad, max(bounds) + pad)
    fig.suptitle(f"{title} — {plots._seed_note(summary)}", fontsize=11, fontweight="bold", x=0.01, ha="left")
    plots._save(fig, path)


# ---------------------------------------------------------------------------------------------
# MLflow: a few headline numbers per row, the full tables as artifacts

HEADLINE_ZEROSHOT = ("id", "ood", "zs", "iimm")  # the zero-shot model's numbers in the run
HEADLINE_CURVES = ("selected_id", "selected_ood")  # per row, against the training examples


def mlflow_name(row: str) -> str:
    """A row's name in MLflow metric keys, which allow no '+' (nor '%'): `ft+greedy_soup` is
    `ft.greedy_soup` there."""
    return row.replace("+", ".").replace("%", "pct")


def headline_metrics(flat: dict[str, float], curves: dict[str, list[tuple[int, float]]],
                     rows: list[str]) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """What the report's MLflow run logs as metrics: the zero-shot model's headline numbers
    (`zeroshot/<value>`), and per row the ID and OOD at the chosen trial and α against the
    training examples (`curve/<row>/selected_ood`, step = examples: the run's table shows the
    largest level, its chart every level), plus `rows`. About two per row; every mean and
    interval is in the run's tables (`report_tables`)."""
    metrics = {f"{ZEROSHOT}/{c}": flat[f"{ZEROSHOT}/{c}"] for c in HEADLINE_ZEROSHOT if f"{ZEROSHOT}/{c}" in flat}
    metrics["rows"] = float(len(rows))
    keep = {f"curve/{r}/{c}": f"curve/{mlflow_name(r)}/{c}" for r in rows for c in HEADLINE_CURVES}
    return metrics, {keep[k]: v for k, v in curves.items() if k in keep}


def report_tables(summary: pd.DataFrame, flat: dict[str, float]) -> dict[str, pd.DataFrame]:
    """The report's full tables as MLflow tables (`mlflow.log_table`, the run's Artifacts /
    Evaluation views): every mean, std and CI per row and level with its family
    (`summary_table.json`), and every flat mean (`report_metrics.json`: what
    `metrics/report.json` holds, and what another dataset's report reads back)."""
    table = summary.copy()
    table.insert(1, "family", ["zero-shot" if (m == ZEROSHOT and lv == "0") else family_of(m)
                               for m, lv in zip(table["method"], table["level"])])
    table = table.astype({c: float for c in table.columns if c.endswith(("_mean", "_std", "_ci"))})
    flat_df = pd.DataFrame({"key": list(flat), "value": [float(v) for v in flat.values()]})
    return {"summary_table.json": table, "report_metrics.json": flat_df}


def log_tables(run_id: str, tables: dict[str, pd.DataFrame]) -> None:
    """Each table into the run as an MLflow table (a JSON artifact the UI shows as a table)."""
    from mlflow.tracking import MlflowClient

    from pipeline.core import tracking

    client = MlflowClient(tracking.tracking_uri())
    for name, df in tables.items():
        client.log_table(run_id, data=df, artifact_file=name)
