"""The `report` stage: every configured run -> tables, plots, DVC metrics and a summary MLflow run.

Reads the zero-shot level (k = 0) from `data/embed/metrics.json` and every method × k × seed of
params.yaml from `runs/evaluate/<method>/k<K>_seed<S>/metrics.json`; a configured run whose
file is missing is an error (naming the file and the `dvc repro` target that makes it), never
silently skipped. Writes under `reports/`:

- `runs.csv` — one row per run (zero-shot: method `zeroshot`, shots 0, blank seed);
- `summary.csv`, `summary.md` — mean and std over seeds per method × shots;
- PNG plots (see `PLOTS`), `metrics/shots.csv` (long format, for `dvc plots`) and `metrics/report.json`
  (flat means, for `dvc metrics show`);
- `summary.json` last: the marker of a finished report (removed first when the stage starts).

The headline metric is the dataset's official one (`DatasetSpec.metric`): ID on the last ID
split (e.g. `id_test`), OOD on the last OOD split (e.g. `test`). Datasets without an ID split
(waterbirds) get no ID columns and no ID plots. "zs" is the mean zero-shot accuracy over the
retention tasks; "rsa_*" is the representational similarity to the pre-trained model (1 for the
zero-shot model by definition).

IIMM (the pre-trained model's inter-intra modal measure on a task) predicts how much
fine-tuning changes performance *across tasks*. The IIMM-vs-change plot therefore needs more
than one dataset: besides the current one, the report reads the summary runs that the report
stage logged to MLflow for other datasets (same architecture and pre-trained weights). With a
single dataset no such plot is written and summary.md says why.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths, tracking
from pipeline.config import Params
from pipeline.data.datasets import DatasetSpec, get_spec

# ---------------------------------------------------------------------------------------------
# where the report writes (everything under paths.REPORTS)

RUNS_CSV = paths.REPORTS / "runs.csv"
SUMMARY_CSV = paths.REPORTS / "summary.csv"
SUMMARY_MD = paths.REPORTS / "summary.md"
METRICS_JSON = paths.REPORT_METRICS  # `dvc metrics show` (outside reports/: DVC outs may not nest)
SUMMARY_JSON = paths.REPORTS / "summary.json"  # written last: the report is complete
SHOTS_CSV = paths.REPORT_PLOT_DATA  # `dvc plots show`: method, shots, metric, value
PLOTS: dict[str, Path] = {
    name: paths.REPORTS / f"{name}.png"
    for name in ("id_vs_shots", "ood_vs_shots", "id_vs_ood", "zs_retention_vs_shots",
                 "rsa_vs_shots", "iimm_vs_change")
}
OUTPUTS: tuple[Path, ...] = (RUNS_CSV, SUMMARY_CSV, SUMMARY_MD, METRICS_JSON, SHOTS_CSV,
                             *PLOTS.values())

EVAL_METRICS = "metrics.json"  # the evaluate stage's file name in paths.evaluate_dir
ZEROSHOT = "zeroshot"
REPORT_KEY = "report"  # the MLflow run key (and run name) of the summary run

# runs.csv / read_runs columns; `VALUES` are the per-run numbers aggregated over seeds
KEYS = ("dataset", "method", "shots", "seed")
VALUES = ("id", "ood", "zs", "rsa_image", "rsa_text", "selected_alpha", "selected_id",
          "selected_ood", "trainable_share", "wall_time_s")
COLUMNS = KEYS + VALUES
ID_COLUMNS = ("id", "selected_id")  # dropped for datasets without an ID split
SHOTS_METRICS = ("id", "ood", "zs", "rsa_image", "rsa_text", "selected_id", "selected_ood")

_ZS_TASK = re.compile(r"^zs/(.+)/acc$")
_WISE = re.compile(r"^wise/([^/]+)/(.+)$")
_FLAT = re.compile(r"^(?P<method>[^/]+)/k(?P<k>\d+)/(?P<col>[a-z_]+)$")


# ---------------------------------------------------------------------------------------------
# inputs


class MissingInputsError(FileNotFoundError):
    """Configured runs whose metrics.json is absent; the message lists them and their targets."""

    def __init__(self, missing: list[tuple[Path, str]]):
        self.missing = [p for p, _ in missing]
        lines = "\n".join(f"  - {p}  (made by `dvc repro {target}`)" for p, target in missing)
        super().__init__(
            f"report: {len(missing)} input file(s) missing. The report covers every run that "
            f"params.yaml configures (finetune.methods × sample.shots × sample.seeds) and skips "
            f"none:\n{lines}\nRun `dvc repro` (or the targets above) first, or remove those runs "
            f"from params.yaml."
        )


@dataclass(frozen=True)
class Headline:
    """The dataset's headline keys: `<split>/<metric>` for ID (None without ID split) and OOD."""

    metric: str
    id: str | None
    ood: str
    select_split: str

    @classmethod
    def of(cls, spec: DatasetSpec) -> "Headline":
        return cls(metric=spec.metric,
                   id=f"{spec.id_splits[-1]}/{spec.metric}" if spec.id_splits else None,
                   ood=f"{spec.ood_splits[-1]}/{spec.metric}", select_split=spec.select_split)


@dataclass
class RunInput:
    method: str
    shots: int
    seed: int | None  # None: the zero-shot level
    metrics: dict[str, float]
    source: Path


def stage_target(method: str, k: int, seed: int) -> str:
    """The dvc.yaml matrix entry that writes this run's metrics (`evaluate@ft-4-0`)."""
    return f"evaluate@{method}-{k}-{seed}"


def expected_inputs(params: Params) -> list[tuple[str, int, int | None, Path, str]]:
    """(method, k, seed, metrics file, dvc target) for the zero-shot level and every run."""
    out: list[tuple[str, int, int | None, Path, str]] = [
        (ZEROSHOT, 0, None, paths.EMBED_METRICS, "embed")]
    for method in params.finetune.methods:
        for k in params.sample.shots:
            for seed in params.sample.seeds:
                out.append((method, k, seed, paths.evaluate_dir(method, k, seed) / EVAL_METRICS,
                            stage_target(method, k, seed)))
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-run the stage that writes it") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


def load_inputs(params: Params) -> list[RunInput]:
    """Every input the report needs, or MissingInputsError listing all absent files."""
    expected = expected_inputs(params)
    missing = [(p, target) for _, _, _, p, target in expected if not p.is_file()]
    if missing:
        raise MissingInputsError(missing)
    runs = []
    for method, k, seed, path, _ in expected:
        metrics = {key: float(v) for key, v in _read_json(path).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        runs.append(RunInput(method, k, seed, metrics, path))
    return runs


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _row(dataset: str, run: RunInput, head: Headline) -> dict[str, Any]:
    m = run.metrics
    zero = run.shots == 0  # the k = 0 level (the zeroshot *method* at k > 0 is a plain run)

    def need(key: str) -> float:
        if key not in m:
            raise ValueError(
                f"{run.source}: no {key!r} (the headline metric of this dataset); the file was "
                f"written for another dataset or by an older pipeline: re-run its stage")
        return m[key]

    ood = need(head.ood)
    idv = need(head.id) if head.id else math.nan
    row = {
        "dataset": dataset, "method": run.method, "shots": run.shots, "seed": run.seed,
        "id": idv, "ood": ood,
        "zs": _mean([v for key, v in m.items() if _ZS_TASK.match(key)]),
        "rsa_image": 1.0 if zero else m.get("rsa/image", math.nan),
        "rsa_text": 1.0 if zero else m.get("rsa/text", math.nan),
        "selected_alpha": math.nan if zero else m.get("selected/alpha", math.nan),
        "selected_id": idv if zero else (m.get(f"selected/{head.id}", math.nan) if head.id else math.nan),
        "selected_ood": ood if zero else m.get(f"selected/{head.ood}", math.nan),
        "trainable_share": 0.0 if zero else m.get("train/trainable_share", math.nan),
        "wall_time_s": 0.0 if zero else m.get("train/wall_time_s", math.nan),
    }
    return row


def runs_frame(runs: list[RunInput], dataset: str, head: Headline) -> pd.DataFrame:
    df = pd.DataFrame([_row(dataset, r, head) for r in runs], columns=list(COLUMNS))
    df["shots"] = df["shots"].astype(int)
    df["seed"] = df["seed"].astype("Int64")
    if head.id is None:
        df = df.drop(columns=list(ID_COLUMNS))
    return df


def read_runs(params: Params) -> pd.DataFrame:
    """One row per run (zero-shot first, as method `zeroshot`, shots 0, seed <NA>), columns
    `COLUMNS` (without `id`/`selected_id` for datasets that have no ID split)."""
    spec = get_spec(params.dataset.name)
    return runs_frame(load_inputs(params), spec.name, Headline.of(spec))


def wise_curves(runs: list[RunInput], head: Headline) -> pd.DataFrame:
    """WiSE-FT sweeps: method, shots, alpha, id, ood (means over seeds; id NaN without ID)."""
    rows = []
    for r in runs:
        points: dict[float, dict[str, float]] = {}
        for key, v in r.metrics.items():
            hit = _WISE.match(key)
            if not hit:
                continue
            try:
                alpha = float(hit.group(1))
            except ValueError:
                continue
            if hit.group(2) == head.ood:
                points.setdefault(alpha, {})["ood"] = v
            elif head.id and hit.group(2) == head.id:
                points.setdefault(alpha, {})["id"] = v
        for alpha, p in points.items():
            if "ood" in p:
                rows.append({"method": r.method, "shots": r.shots, "seed": r.seed, "alpha": alpha,
                             "id": p.get("id", math.nan), "ood": p["ood"]})
    if not rows:
        return pd.DataFrame(columns=["method", "shots", "alpha", "id", "ood", "n"])
    df = pd.DataFrame(rows)
    agg = df.groupby(["method", "shots", "alpha"], sort=True).agg(
        id=("id", "mean"), ood=("ood", "mean"), n=("ood", "size")).reset_index()
    return agg


# ---------------------------------------------------------------------------------------------
# aggregation


def summarize(runs: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds per dataset × method × shots: columns `<value>_mean`,
    `<value>_std` (std 0 for a single seed) and `seeds`; zero-shot first, then `methods` order."""
    values = [c for c in VALUES if c in runs.columns]
    order = list(methods or dict.fromkeys(runs.loc[runs["shots"] > 0, "method"]))
    rows = []
    for (dataset, method, shots), g in runs.groupby(["dataset", "method", "shots"], sort=False):
        row: dict[str, Any] = {"dataset": dataset, "method": method, "shots": int(shots),
                               "seeds": len(g)}
        for c in values:
            col = g[c].astype(float)
            n = int(col.notna().sum())
            row[f"{c}_mean"] = float(col.mean()) if n else math.nan
            row[f"{c}_std"] = (float(col.std(ddof=1)) if n > 1 else 0.0) if n else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    rank = {m: i for i, m in enumerate(order)}
    df["_rank"] = [-1 if k == 0 else rank.get(m, len(rank)) for m, k in zip(df["method"], df["shots"])]
    return df.sort_values(["dataset", "_rank", "shots"]).drop(columns="_rank").reset_index(drop=True)


def flat_metrics(summary: pd.DataFrame, embed: dict[str, float]) -> dict[str, float]:
    """`zeroshot/<value>` and `<method>/k<K>/<value>` (means over seeds) plus the zero-shot
    task measures (`zeroshot/iimm`, ...); NaNs left out (DVC reads strict JSON)."""
    out: dict[str, float] = {}
    values = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    for _, r in summary.iterrows():
        zero = int(r["shots"]) == 0
        prefix = ZEROSHOT if zero else f"{r['method']}/k{int(r['shots'])}"
        for c in values:
            if zero and c in ("selected_alpha", "trainable_share", "wall_time_s"):
                continue
            v = r[f"{c}_mean"]
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out[f"{prefix}/{c}"] = float(v)
    for key in ("iimm", "iimm/s_intra", "iimm/s_inter", "iimm_ensemble", "iimm_ensemble/s_inter",
                "silhouette/modality", "silhouette/class"):
        if key in embed and math.isfinite(embed[key]):
            out[f"{ZEROSHOT}/{key}"] = float(embed[key])
    return out


def shots_long(summary: pd.DataFrame) -> pd.DataFrame:
    """Long format for `dvc plots`: method, shots, metric, value (mean over seeds)."""
    rows = []
    for _, r in summary.iterrows():
        for c in SHOTS_METRICS:
            v = r.get(f"{c}_mean", math.nan)
            if v is not None and not pd.isna(v):
                rows.append({"method": r["method"], "shots": int(r["shots"]), "metric": c,
                             "value": float(v)})
    return pd.DataFrame(rows, columns=["method", "shots", "metric", "value"])


def task_points(dataset: str, flat: dict[str, float]) -> list[dict[str, Any]]:
    """Per method, the change after fine-tuning at its largest k (mean over seeds) against the
    pre-trained model's IIMM on this task: dataset, method, shots, iimm, d_id, d_ood, d_zs."""
    if "zeroshot/iimm" not in flat:
        return []
    best: dict[str, int] = {}
    for key in flat:
        hit = _FLAT.match(key)
        if hit:
            best[hit.group("method")] = max(best.get(hit.group("method"), 0), int(hit.group("k")))
    points = []
    for method, k in sorted(best.items()):
        p: dict[str, Any] = {"dataset": dataset, "method": method, "shots": k,
                             "iimm": flat["zeroshot/iimm"]}
        for c in ("id", "ood", "zs"):
            a, b = flat.get(f"{method}/k{k}/{c}"), flat.get(f"{ZEROSHOT}/{c}")
            p[f"d_{c}"] = a - b if a is not None and b is not None else math.nan
        points.append(p)
    return points


def other_datasets(params: Params) -> tuple[list[dict[str, Any]], str | None]:
    """Task points of other datasets from their report runs in MLflow (same arch and weights).

    Returns (points, note): note explains a failure to read the store (never raised: the
    cross-task plot is a bonus, the report of this dataset does not depend on it)."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking.tracking_uri())
        exps = [e.experiment_id for e in client.search_experiments()]
        if not exps:
            return [], None
        found = client.search_runs(exps, filter_string=f"tags.{tracking.RUN_KEY} = '{REPORT_KEY}'",
                                   order_by=["attributes.start_time DESC"])
    except Exception as err:  # noqa: BLE001 — an unreadable store only costs the bonus plot
        return [], f"could not read other datasets' report runs from MLflow ({type(err).__name__}: {err})"
    latest: dict[str, Any] = {}
    for run in found:
        p = run.data.params
        ds = p.get("dataset")
        if (not ds or ds == params.dataset.name or ds in latest
                or p.get("arch") != params.model.arch or p.get("pretrained") != params.model.pretrained):
            continue
        latest[ds] = run
    points = []
    for ds, run in sorted(latest.items()):
        points += task_points(ds, dict(run.data.metrics))
    return points, None


# ---------------------------------------------------------------------------------------------
# plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend state)

_FIXED_COLOURS = {"ft": "#1f77b4", "flyp": "#ff7f0e", "lp": "#2ca02c", "lpft": "#9467bd",
                  "dive": "#d62728"}
_SPARE_COLOURS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79",
                  "#637939", "#843c39", "#7b4173", "#3182bd")
_FIXED_MARKERS = {"ft": "o", "flyp": "s", "lp": "^", "lpft": "v", "dive": "D"}
_SPARE_MARKERS = ("P", "X", "h", "<", ">", "p", "H", "d", "8", "x")
ZS_COLOUR = "#222222"


def method_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method: the same in every plot and every report."""
    if method == ZEROSHOT:
        return ZS_COLOUR, "*"
    if method in _FIXED_COLOURS:
        return _FIXED_COLOURS[method], _FIXED_MARKERS[method]
    from pipeline.methods import METHODS

    others = sorted(m for m in METHODS if m not in _FIXED_COLOURS and m != ZEROSHOT)
    i = others.index(method) if method in others else sum(map(ord, method))
    return _SPARE_COLOURS[i % len(_SPARE_COLOURS)], _SPARE_MARKERS[i % len(_SPARE_MARKERS)]


_RC = {
    "font.size": 10, "axes.titlesize": 11.5, "axes.titleweight": "bold", "axes.labelsize": 10.5,
    "legend.fontsize": 9, "xtick.labelsize": 9.5, "ytick.labelsize": 9.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linestyle": "-", "figure.dpi": 100, "savefig.dpi": 150,
}


def _figure(width: float = 7.0, height: float = 4.6, ncols: int = 1):
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context(_RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: Path) -> None:
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", facecolor="white"))


def _seed_note(summary: pd.DataFrame) -> str:
    n = summary.loc[summary["shots"] > 0, "seeds"]
    if n.empty:
        return ""
    lo, hi = int(n.min()), int(n.max())
    if hi <= 1:
        return "one seed per point"
    return f"mean ± std over {lo} seeds" if lo == hi else f"mean ± std over {lo}–{hi} seeds"


def _shots_axis(ax, shots: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(shots))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(shots, [str(s) for s in shots])
    lo, hi = min(shots), max(shots)
    ax.set_xlim(lo / 1.45, hi * 1.45)
    ax.set_xlabel("shots per class (k)")


def _dodge(methods: list[str]) -> dict[str, float]:
    """Multiplicative x offsets so that error bars of different methods do not overlap."""
    n = len(methods)
    return {m: 2 ** (0.07 * (i - (n - 1) / 2)) for i, m in enumerate(methods)}


def _methods(summary: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(summary.loc[summary["shots"] > 0, "method"]))


def _zs_value(summary: pd.DataFrame, col: str) -> float:
    z = summary.loc[summary["shots"] == 0, f"{col}_mean"]
    return float(z.iloc[0]) if len(z) else math.nan


def _lines_vs_shots(ax, summary: pd.DataFrame, col: str, ref: float | None, ref_label: str) -> None:
    methods = _methods(summary)
    shots = sorted(int(s) for s in summary.loc[summary["shots"] > 0, "shots"].unique())
    dodge = _dodge(methods)
    for m in methods:
        g = summary[summary["method"] == m].sort_values("shots")
        y = g[f"{col}_mean"].to_numpy(float)
        if np.all(np.isnan(y)):
            continue
        err = g[f"{col}_std"].to_numpy(float) if (g["seeds"] > 1).any() else None
        colour, marker = method_style(m)
        ax.errorbar(g["shots"].to_numpy(float) * dodge[m], y, yerr=err, color=colour,
                    marker=marker, markersize=6.5, linewidth=2, capsize=3.5, elinewidth=1.2,
                    label=m, zorder=3)
    if ref is not None and math.isfinite(ref):
        ax.axhline(ref, color=ZS_COLOUR, linestyle="--", linewidth=1.4, label=ref_label, zorder=2)
    _shots_axis(ax, shots)


def _legend_right(ax, title: str = "", handles=None) -> None:
    """Legend outside the axes on the right: it never hides a data point."""
    kw = {"handles": handles} if handles is not None else {}
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, borderaxespad=0.0,
              title=title or None, alignment="left", **kw)


def plot_vs_shots(summary: pd.DataFrame, col: str, ylabel: str, title: str, path: Path) -> None:
    """One line per method against k (error bars: std over seeds); zero-shot dashed."""
    fig, (ax,) = _figure(width=8.4)
    _lines_vs_shots(ax, summary, col, _zs_value(summary, col), "zero-shot (k = 0)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    _legend_right(ax, _seed_note(summary))
    _save(fig, path)


def plot_rsa(summary: pd.DataFrame, path: Path) -> None:
    fig, axes = _figure(width=11.6, height=4.6, ncols=2)
    for ax, col, name in zip(axes, ("rsa_image", "rsa_text"), ("image", "text")):
        _lines_vs_shots(ax, summary, col, 1.0, "zero-shot model (≡ 1)")
        ax.set_title(f"RSA of the {name} encoder", loc="left")
        ax.set_ylabel(f"RSA to the pre-trained model ({name})")
    lows = [(summary[f"{c}_mean"] - summary[f"{c}_std"].fillna(0)).min()
            for c in ("rsa_image", "rsa_text")]
    low = float(np.nanmin(lows)) if np.isfinite(lows).any() else 0.0
    pad = 0.06 * (1.0 - low) + 0.01
    for ax in axes:  # one y range for both panels: image and text drift compare at a glance
        ax.set_ylim(max(-1.0, low - pad), 1.0 + pad)
    _legend_right(axes[1], _seed_note(summary))
    fig.suptitle("Representation drift: RSA of the reference-set geometry to the pre-trained "
                 "model (1 = unchanged)", fontsize=11, fontweight="bold", x=0.01, ha="left")
    _save(fig, path)


def _k_size(k: int, shots: list[int]) -> float:
    """Marker area grows with k (log scale): small for the fewest shots, large for the most."""
    lo, hi = math.log2(min(shots)), math.log2(max(shots))
    t = 0.5 if hi == lo else (math.log2(k) - lo) / (hi - lo)
    return 7.0 + 6.0 * t  # marker size in points


def plot_id_vs_ood(summary: pd.DataFrame, wise: pd.DataFrame, head: Headline, path: Path) -> None:
    """Every method × k (mean ± std; bigger marker = more shots), the zero-shot point, and the
    WiSE-FT α curve (zero-shot at α = 0 to the fine-tuned model at α = 1) of the largest k."""
    from matplotlib.lines import Line2D

    fig, (ax,) = _figure(width=9.6, height=5.8)
    methods = _methods(summary)
    shots = sorted(int(s) for s in summary.loc[summary["shots"] > 0, "shots"].unique())
    zid, zood = _zs_value(summary, "id"), _zs_value(summary, "ood")
    several = bool((summary["seeds"] > 1).any())
    handles: list = [Line2D([], [], marker="*", markersize=15, color=ZS_COLOUR, linestyle="none",
                            markeredgecolor="white", label="zero-shot (k = 0)")]
    any_wise = any_sel = False
    for m in methods:
        g = summary[summary["method"] == m].sort_values("shots")
        colour, marker = method_style(m)
        # the path zero-shot -> k1 -> k2 ... (faint), then the points (size = k)
        ax.plot([zid, *g["id_mean"]], [zood, *g["ood_mean"]], color=colour, alpha=0.45,
                linewidth=1.3, zorder=2)
        for _, r in g.iterrows():
            ax.errorbar([r["id_mean"]], [r["ood_mean"]],
                        xerr=[r["id_std"]] if several else None,
                        yerr=[r["ood_std"]] if several else None,
                        color=colour, marker=marker, markersize=_k_size(int(r["shots"]), shots),
                        markeredgecolor="white", markeredgewidth=0.8, linestyle="none",
                        capsize=2.5, elinewidth=1, alpha=0.95, zorder=4)
        handles.append(Line2D([], [], color=colour, marker=marker, markersize=7, linewidth=1.3,
                              label=m))
        w = wise[wise["method"] == m] if len(wise) else wise
        k = int(w["shots"].max()) if len(w) else 0
        w = w[w["shots"] == k].sort_values("alpha") if len(w) else w
        if len(w) > 1:
            ax.plot(w["id"], w["ood"], color=colour, linestyle=(0, (4, 2)), linewidth=1.7,
                    marker="o", markersize=3, zorder=3)
            any_wise = True
            top = g[g["shots"] == k]
            if len(top) and top["selected_alpha_mean"].notna().all() and top["selected_alpha_mean"].iloc[0] < 1:
                ax.plot(top["selected_id_mean"], top["selected_ood_mean"], marker="o",
                        markersize=11, markerfacecolor="none", markeredgecolor=colour,
                        markeredgewidth=1.8, linestyle="none", zorder=5)
                any_sel = True
    ax.plot([zid], [zood], marker="*", markersize=18, color=ZS_COLOUR, markeredgecolor="white",
            linestyle="none", zorder=6)
    if any_wise:
        handles.append(Line2D([], [], color="#555555", linestyle=(0, (4, 2)), linewidth=1.7,
                              marker="o", markersize=3,
                              label=f"WiSE-FT α = 0 → 1 (k = {max(shots)})"))
    if any_sel:
        handles.append(Line2D([], [], marker="o", markersize=11, markerfacecolor="none",
                              markeredgecolor="#555555", markeredgewidth=1.8, linestyle="none",
                              label=f"α chosen on {head.select_split}"))
    handles.append(Line2D([], [], color="#555555", alpha=0.45, linewidth=1.3,
                          label="path zero-shot → k"))
    for k in shots:
        handles.append(Line2D([], [], marker="o", color="#888888", linestyle="none",
                              markersize=_k_size(k, shots), markeredgecolor="white",
                              label=f"k = {k}"))
    ax.set_xlabel(f"ID: {head.id}")
    ax.set_ylabel(f"OOD: {head.ood}")
    ax.set_title(f"ID vs OOD {head.metric}: every method and shot count", loc="left")
    ax.margins(0.06)
    _legend_right(ax, _seed_note(summary).replace("mean ± std", "points: mean ± std"), handles)
    _save(fig, path)


def plot_iimm(points: pd.DataFrame, head_by_dataset: dict[str, str], path: Path,
              methods: list[str] | None = None) -> None:
    """IIMM of the pre-trained model (x) against the change after fine-tuning (y): one point
    per task (dataset) and method, at the method's largest k; a least-squares line per method
    from 3 tasks on. Panels: ID, OOD, zero-shot retention, each where 2 or more tasks have it."""
    panels = [(c, t) for c, t in (("d_id", "ID"), ("d_ood", "OOD"), ("d_zs", "zero-shot retention"))
              if points.loc[points[c].notna(), "dataset"].nunique() >= 2]
    order = list(methods or []) + sorted(set(points["method"]) - set(methods or []))
    order = [m for m in order if m in set(points["method"])]
    fig, axes = _figure(width=4.6 * len(panels) + 2.0, height=4.8, ncols=len(panels))
    for ax, (col, name) in zip(axes, panels):
        have = points[points[col].notna()]
        tasks = have.groupby("dataset")["iimm"].first().sort_values()
        for x in tasks:  # each task is a vertical line, named on the top axis
            ax.axvline(x, color="#bbbbbb", linewidth=0.8, zorder=1)
        top = ax.secondary_xaxis("top")
        top.set_xticks(list(tasks.to_numpy(float)), list(tasks.index), fontsize=8.5,
                       color="#444444")
        top.tick_params(length=0)
        for m in order:
            g = have[have["method"] == m]
            if g.empty:
                continue
            colour, marker = method_style(m)
            ax.scatter(g["iimm"], g[col], color=colour, marker=marker, s=60, label=m, zorder=3,
                       edgecolors="white", linewidths=0.7)
            if g["iimm"].nunique() >= 3:
                slope, icpt = np.polyfit(g["iimm"], g[col], 1)
                xs = np.linspace(g["iimm"].min(), g["iimm"].max(), 2)
                ax.plot(xs, slope * xs + icpt, color=colour, linestyle="--", linewidth=1.2,
                        zorder=2)
        ax.axhline(0.0, color=ZS_COLOUR, linewidth=1.0, linestyle="--", zorder=1)
        ax.grid(axis="x", visible=False)
        span = tasks.max() - tasks.min()
        ax.set_xlim(tasks.min() - 0.12 * span, tasks.max() + 0.12 * span)
        ax.set_xlabel("IIMM of the pre-trained model on the task")
        ax.set_ylabel(f"Δ {name} (fine-tuned − zero-shot)")
        ax.set_title(f"{name} change", loc="left")
    _legend_right(axes[-1], "method (at its largest k)")
    metrics = "\n".join(f"{d}: {m}" for d, m in sorted(head_by_dataset.items()))
    axes[-1].text(1.02, 0.0, f"Δ in each task's\nheadline metric:\n{metrics}",
                  transform=axes[-1].transAxes, fontsize=8, color="#555555", va="bottom",
                  ha="left")
    fig.suptitle("Does IIMM predict the change after fine-tuning? One point per task and method",
                 fontsize=11, fontweight="bold", x=0.01, ha="left")
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# tables


def _fmt(mean: float, std: float, seeds: int, digits: int = 3, scale: float = 1.0,
         unit: str = "") -> str:
    if mean is None or pd.isna(mean):
        return "–"
    s = f"{mean * scale:.{digits}f}"
    if seeds > 1 and std is not None and not pd.isna(std):
        s += f" ± {std * scale:.{digits}f}"
    return s + unit


def _share(share: float) -> str:
    return "–" if share is None or pd.isna(share) else f"{100 * share:.3g} %"


def _md_table(header: list[str], rows: list[list[str]], align: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def cell(text: str, i: int) -> str:
        return text.rjust(widths[i]) if align[i] == "r" else text.ljust(widths[i])

    lines = ["| " + " | ".join(cell(h, i) for i, h in enumerate(header)) + " |",
             "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else ("-" * w)
                               for w, a in zip(widths, align)) + " |"]
    lines += ["| " + " | ".join(cell(c, i) for i, c in enumerate(r)) + " |" for r in rows]
    return "\n".join(lines)


def summary_markdown(params: Params, summary: pd.DataFrame, head: Headline, embed: dict,
                     plots: list[Path], notes: list[str], tasks: list[str]) -> str:
    has_id = head.id is not None
    seeds = list(params.sample.seeds)
    out = [f"# Report: {params.dataset.name}", ""]
    out.append(f"Model `{params.model.arch}` (weights `{params.model.pretrained}`); methods "
               f"{', '.join(params.finetune.methods)}; k = {', '.join(map(str, params.sample.shots))} "
               f"shots per class; seeds {', '.join(map(str, seeds))}.")
    out.append("")
    desc = [f"- **Headline metric** `{head.metric}`: "
            + (f"ID = `{head.id}`, " if has_id else "no ID split (no ID columns), ")
            + f"OOD = `{head.ood}`. Zero-shot is the k = 0 row."]
    desc.append("- **ZS ret.** = mean zero-shot accuracy on the retention tasks "
                + (f"({', '.join(tasks)})" if tasks else "(none for this dataset)")
                + "; **RSA** = similarity of the reference-set geometry to the pre-trained model "
                  "(1 = unchanged).")
    desc.append(f"- **α\\*** = WiSE-FT mixing weight chosen on `{head.select_split}` "
                "(1 = the fine-tuned model; methods without WiSE-FT always report 1).")
    if len(seeds) > 1:
        desc.append(f"- Cells are mean ± std over {len(seeds)} seeds (sample std).")
    if "iimm" in embed:
        desc.append(f"- IIMM of the pre-trained model on this task: {embed['iimm']:.3f}.")
    out += desc + [""]

    fine = summary[summary["shots"] > 0]
    if len(fine):
        kmax = int(fine["shots"].max())
        top = fine[fine["shots"] == kmax]
        hl = []
        for col, name in (("id", "ID"), ("ood", "OOD"), ("selected_ood", "OOD at α*"),
                          ("zs", "ZS retention")):
            c = f"{col}_mean"
            if c not in top or top[c].isna().all():
                continue
            best = top.loc[top[c].idxmax()]
            zs = _zs_value(summary, col)
            delta = f" ({best[c] - zs:+.3f} vs zero-shot)" if math.isfinite(zs) else ""
            hl.append(f"- best {name}: **{best['method']}** {best[c]:.3f}{delta}")
        if hl:
            out += [f"## At k = {kmax}", "", *hl, ""]

    rows1, rows2 = [], []
    for _, r in summary.iterrows():
        n = int(r["seeds"])
        k = int(r["shots"])
        name = "zero-shot" if k == 0 else r["method"]
        perf = [name, str(k), str(n)]
        if has_id:
            perf.append(_fmt(r["id_mean"], r["id_std"], n))
        perf += [_fmt(r["ood_mean"], r["ood_std"], n), _fmt(r["zs_mean"], r["zs_std"], n),
                 _fmt(r["rsa_image_mean"], r["rsa_image_std"], n),
                 _fmt(r["rsa_text_mean"], r["rsa_text_std"], n)]
        rows1.append(perf)
        if k > 0:
            sel = [name, str(k), _fmt(r["selected_alpha_mean"], r["selected_alpha_std"], n, 2)]
            if has_id:
                sel.append(_fmt(r["selected_id_mean"], r["selected_id_std"], n))
            sel += [_fmt(r["selected_ood_mean"], r["selected_ood_std"], n),
                    _share(r["trainable_share_mean"]),
                    _fmt(r["wall_time_s_mean"], r["wall_time_s_std"], 1, 1)]
            rows2.append(sel)
    h1 = ["method", "k", "seeds", *(["ID"] if has_id else []), "OOD", "ZS ret.", "RSA image",
          "RSA text"]
    if summary["zs_mean"].isna().all():  # no retention tasks: no empty column
        i = h1.index("ZS ret.")
        h1.pop(i)
        rows1 = [r[:i] + r[i + 1:] for r in rows1]
    out += ["## Results", "", _md_table(h1, rows1, ["l", "r", "r"] + ["r"] * (len(h1) - 3)), ""]
    if rows2:
        h2 = ["method", "k", "α*", *(["ID at α*"] if has_id else []), "OOD at α*", "trainable",
              "train time (s)"]
        out += ["## WiSE-FT selection and cost", "",
                _md_table(h2, rows2, ["l", "r"] + ["r"] * (len(h2) - 2)), ""]
    if plots:
        out += ["## Plots", ""]
        out += [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots]
        out.append("")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out += ["Files: `runs.csv` (every run), `summary.csv` (these tables, unrounded), "
            f"`{METRICS_JSON}` (`dvc metrics show`), `{SHOTS_CSV}` (`dvc plots`).", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# writing


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text))


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    _write_atomic(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.10g"))


def run(params: Params) -> dict[str, float]:
    """Write every report file, log the summary MLflow run; returns the flat metrics."""
    spec = get_spec(params.dataset.name)
    head = Headline.of(spec)
    inputs = load_inputs(params)  # before touching reports/: missing inputs change nothing

    SUMMARY_JSON.unlink(missing_ok=True)  # from here on the report is unfinished
    for p in OUTPUTS:
        p.unlink(missing_ok=True)
    paths.REPORTS.mkdir(parents=True, exist_ok=True)

    methods = list(params.finetune.methods)
    runs = runs_frame(inputs, spec.name, head)
    summary = summarize(runs, methods)
    embed = inputs[0].metrics
    flat = flat_metrics(summary, embed)
    wise = wise_curves(inputs, head)
    tasks = sorted(_ZS_TASK.match(k).group(1) for k in embed if _ZS_TASK.match(k))
    notes: list[str] = []

    _write_csv(RUNS_CSV, runs)
    _write_csv(SUMMARY_CSV, summary)
    _write_csv(SHOTS_CSV, shots_long(summary))

    plots: list[Path] = []
    if head.id:
        plot_vs_shots(summary, "id", f"ID: {head.id}",
                      f"In-distribution ({head.id}) vs shots", PLOTS["id_vs_shots"])
        plots.append(PLOTS["id_vs_shots"])
    else:
        notes.append(f"{spec.name} has no ID split: no ID columns, no `id_vs_shots.png`, "
                     "no `id_vs_ood.png`.")
    plot_vs_shots(summary, "ood", f"OOD: {head.ood}",
                  f"Out-of-distribution ({head.ood}) vs shots", PLOTS["ood_vs_shots"])
    plots.append(PLOTS["ood_vs_shots"])
    if head.id:
        plot_id_vs_ood(summary, wise, head, PLOTS["id_vs_ood"])
        plots.append(PLOTS["id_vs_ood"])
    if summary["zs_mean"].notna().any():
        n = len(tasks)
        plot_vs_shots(summary, "zs", f"mean zero-shot accuracy ({n} task{'s' * (n != 1)})",
                      "Zero-shot retention on held-out tasks vs shots"
                      + (f"\n({', '.join(tasks)})" if tasks else ""),
                      PLOTS["zs_retention_vs_shots"])
        plots.append(PLOTS["zs_retention_vs_shots"])
    else:
        notes.append(f"{spec.name} defines no zero-shot retention tasks: no "
                     "`zs_retention_vs_shots.png`.")
    if summary.loc[summary["shots"] > 0, ["rsa_image_mean", "rsa_text_mean"]].notna().any().any():
        plot_rsa(summary, PLOTS["rsa_vs_shots"])
        plots.append(PLOTS["rsa_vs_shots"])
    else:
        notes.append("No RSA values in the evaluate metrics: no `rsa_vs_shots.png`.")

    others, store_note = other_datasets(params)
    if store_note:
        notes.append(store_note)
    points = task_points(spec.name, flat) + others
    n_tasks = len({p["dataset"] for p in points})
    if n_tasks > 1:
        heads = {spec.name: spec.metric}
        for d in {p["dataset"] for p in others}:
            try:
                heads[d] = get_spec(d).metric
            except ValueError:
                heads[d] = "?"
        plot_iimm(pd.DataFrame(points), heads, PLOTS["iimm_vs_change"], methods)
        plots.append(PLOTS["iimm_vs_change"])
        notes.append(f"`iimm_vs_change.png` puts {n_tasks} tasks side by side: "
                     f"{', '.join(sorted({p['dataset'] for p in points}))}; the other datasets' "
                     "points come from their report runs in the MLflow store (same model and "
                     "pre-trained weights).")
    else:
        notes.append(
            "No `iimm_vs_change.png`: IIMM (the pre-trained model's inter-intra modal measure on "
            "a task) predicts how much fine-tuning changes performance *across tasks*, so one "
            "task gives one point per method and no trend. Run the pipeline on another dataset "
            "with the same model (e.g. `dvc exp run -S dataset.name=...`, same MLflow store) and "
            "the report puts the tasks side by side.")

    md = summary_markdown(params, summary, head, embed, plots, notes, tasks)
    _write_text(METRICS_JSON, json.dumps(flat, indent=1, sort_keys=True) + "\n")
    _write_text(SUMMARY_MD, md)

    run_params = {
        "dataset": spec.name, "arch": params.model.arch, "pretrained": params.model.pretrained,
        "methods": ",".join(methods), "shots": ",".join(map(str, params.sample.shots)),
        "seeds": ",".join(map(str, params.sample.seeds)), "metric": head.metric,
        "id_key": head.id or "", "ood_key": head.ood, "select_split": head.select_split,
        "git_commit": tracking.git_commit(),
    }
    run_id = tracking.log_run(
        experiment=spec.name, key=REPORT_KEY, run_name=REPORT_KEY, params=run_params,
        tags={"level": "report", "dataset": spec.name}, metrics=flat,
        artifacts=[SUMMARY_MD, SUMMARY_CSV, RUNS_CSV, *plots])

    _write_text(SUMMARY_JSON, json.dumps({
        "dataset": spec.name, "runs": len(runs), "headline": {"metric": head.metric, "id": head.id,
                                                             "ood": head.ood},
        "files": [str(p) for p in (RUNS_CSV, SUMMARY_CSV, SUMMARY_MD, METRICS_JSON, SHOTS_CSV,
                                   *plots)],
        "notes": notes, "mlflow_run_id": run_id,
    }, indent=1) + "\n")
    return flat
