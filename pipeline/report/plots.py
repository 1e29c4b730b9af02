"""The report's plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from pipeline.report.files import _write_atomic
from pipeline.report.inputs import ZEROSHOT, Headline


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#843c39", "#7b4173", "#3182bd")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "H", "d", "8", "x")
ZS_COLOUR = "#222222"


def method_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method: its place in the method registry, so the same in every
    plot and every report (a name outside the registry gets a stable spare)."""
    if method == ZEROSHOT:
        return ZS_COLOUR, "*"
    from pipeline.evaluation.soups import parse_row
    from pipeline.methods import METHODS

    soup = parse_row(method)
    if soup:  # a method's soup: the method's colour, a letter for a marker (U, G) and a dotted line
        return method_style(soup[0])[0], {"uniform": "$U$", "greedy": "$G$"}.get(soup[1], "x")

    names = sorted(m for m in METHODS if m != ZEROSHOT)
    i = names.index(method) if method in names else sum(map(ord, method))
    return _COLOURS[i % len(_COLOURS)], _MARKERS[i % len(_MARKERS)]


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


def _fine(summary: pd.DataFrame) -> pd.DataFrame:
    """The fine-tuned rows (every level but zero-shot)."""
    return summary[~((summary["method"] == ZEROSHOT) & (summary["level"] == "0"))]


def _seed_note(summary: pd.DataFrame) -> str:
    n = _fine(summary)["seeds"]
    if n.empty:
        return ""
    lo, hi = int(n.min()), int(n.max())
    if hi <= 1:
        return "one seed per point (no interval)"
    return (f"mean ± 95% CI over {lo} seeds" if lo == hi else f"mean ± 95% CI over {lo}–{hi} seeds")


def _level_ticks(summary: pd.DataFrame) -> list[tuple[float, str]]:
    """(training examples, label) of every level, for the x axis (mean over methods)."""
    fine = _fine(summary)
    ticks = fine.groupby("level_label", sort=False)["n_train_mean"].mean()
    return sorted((float(x), f"{lab}\n({x:.0f})") for lab, x in ticks.items() if x > 0)


def _level_axis(ax, summary: pd.DataFrame) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = _level_ticks(summary)
    ax.set_xscale("log")
    xs = [x for x, _ in ticks]
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(xs, [lab for _, lab in ticks])
    if xs:
        ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
    ax.set_xlabel("training examples (log scale): level (examples)")


def _dodge(methods: list[str]) -> dict[str, float]:
    """Multiplicative x offsets so that error bars of different methods do not overlap."""
    n = len(methods)
    return {m: 2 ** (0.07 * (i - (n - 1) / 2)) for i, m in enumerate(methods)}


def _methods(summary: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(_fine(summary)["method"]))


def _zs_value(summary: pd.DataFrame, col: str) -> float:
    z = summary.loc[(summary["method"] == ZEROSHOT) & (summary["level"] == "0"), f"{col}_mean"]
    return float(z.iloc[0]) if len(z) else math.nan


def _lines_vs_shots(ax, summary: pd.DataFrame, col: str, ref: float | None, ref_label: str) -> None:
    """One line per method against the training examples of each level; the 95 % CI as a band
    and error bars (when there are several seeds)."""
    fine = _fine(summary)
    methods = _methods(summary)
    dodge = _dodge(methods)
    for m in methods:
        g = fine[fine["method"] == m].sort_values("n_train_mean")
        y = g[f"{col}_mean"].to_numpy(float)
        if np.all(np.isnan(y)):
            continue
        x = g["n_train_mean"].to_numpy(float) * dodge[m]
        ci = g[f"{col}_ci"].to_numpy(float)
        has_ci = bool(np.isfinite(ci).any())
        colour, marker = method_style(m)
        ax.errorbar(x, y, yerr=np.nan_to_num(ci) if has_ci else None, color=colour,
                    marker=marker, markersize=6.5, linewidth=2, capsize=3.5, elinewidth=1.2,
                    linestyle=":" if "+" in m else "-", label=m, zorder=3)  # "+": a soup row
        if has_ci:
            ax.fill_between(x, y - np.nan_to_num(ci), y + np.nan_to_num(ci), color=colour, alpha=0.13,
                            linewidth=0, zorder=2)
    if ref is not None and math.isfinite(ref):
        ax.axhline(ref, color=ZS_COLOUR, linestyle="--", linewidth=1.4, label=ref_label, zorder=2)
    _level_axis(ax, summary)


def _legend_right(ax, title: str = "", handles=None) -> None:
    """Legend outside the axes on the right: it never hides a data point."""
    kw = {"handles": handles} if handles is not None else {}
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, borderaxespad=0.0,
              title=title or None, alignment="left", **kw)


def plot_vs_shots(summary: pd.DataFrame, col: str, ylabel: str, title: str, path: Path) -> None:
    """One line per method against the level's training examples (bands: 95 % CI over seeds);
    zero-shot dashed."""
    fig, (ax,) = _figure(width=8.4)
    _lines_vs_shots(ax, summary, col, _zs_value(summary, col), "zero-shot")
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    _legend_right(ax, _seed_note(summary))
    _save(fig, path)


def plot_panels(summary: pd.DataFrame, columns: list[str], plot, path: Path) -> None:
    """A registered measure's figure (`measures.Plot`): one panel per column against k, one y
    range for all panels so they compare at a glance; the pre-trained model as a dashed line
    (the plot's constant `reference`, else the k = 0 row)."""
    if len(columns) == 1:
        plot_vs_shots(summary, columns[0], plot.ylabels[0], plot.title, path)
        return
    fig, axes = _figure(width=5.8 * len(columns), height=4.6, ncols=len(columns))
    for ax, col, ylabel in zip(axes, columns, plot.ylabels):
        if plot.reference is not None:
            _lines_vs_shots(ax, summary, col, plot.reference, f"zero-shot model (≡ {plot.reference:g})")
        else:
            _lines_vs_shots(ax, summary, col, _zs_value(summary, col), "zero-shot")
        ax.set_ylabel(ylabel)
    lows = [(summary[f"{c}_mean"] - summary[f"{c}_ci"].fillna(0)).min() for c in columns]
    highs = [(summary[f"{c}_mean"] + summary[f"{c}_ci"].fillna(0)).max() for c in columns]
    if np.isfinite(lows).any() and np.isfinite(highs).any():
        low, high = float(np.nanmin(lows)), float(np.nanmax(highs))
        if plot.reference is not None:
            high = max(high, plot.reference)
        pad = 0.06 * (high - low) + 0.01
        for ax in axes:
            ax.set_ylim(low - pad, high + pad)
    _legend_right(axes[-1], _seed_note(summary))
    fig.suptitle(plot.title, fontsize=11, fontweight="bold", x=0.01, ha="left")
    _save(fig, path)


def _k_size(n: float, sizes: list[float]) -> float:
    """Marker size grows with the training examples (log scale)."""
    lo, hi = math.log(min(sizes)), math.log(max(sizes))
    t = 0.5 if hi == lo else (math.log(n) - lo) / (hi - lo)
    return 7.0 + 6.0 * t  # marker size in points


def plot_id_vs_ood(summary: pd.DataFrame, wise: pd.DataFrame, head: Headline, path: Path,
                   protocol: str = "", no_zero: Iterable[str] = ()) -> None:
    """Every method × level (mean ± 95 % CI; bigger marker = more training examples), the
    zero-shot point, and the WiSE-FT α curve (zero-shot at α = 0 to the fine-tuned model at
    α = 1) of the largest level. Methods in `no_zero` (no text tower: no zero-shot level) have
    no path from the zero-shot point."""
    from matplotlib.lines import Line2D

    fig, (ax,) = _figure(width=9.6, height=5.8)
    fine = _fine(summary)
    methods = _methods(summary)
    ticks = _level_ticks(summary)
    sizes = [x for x, _ in ticks] or [1.0]
    zid, zood = _zs_value(summary, "id"), _zs_value(summary, "ood")
    several = bool((fine["seeds"] > 1).any())
    handles: list = [Line2D([], [], marker="*", markersize=15, color=ZS_COLOUR, linestyle="none",
                            markeredgecolor="white", label="zero-shot")]
    any_wise = any_sel = False
    top_label = ""
    for m in methods:
        g = fine[fine["method"] == m].sort_values("n_train_mean")
        colour, marker = method_style(m)
        # the path zero-shot -> smallest level -> ... (faint), then the points (size = examples)
        start = ([], []) if m in no_zero else ([zid], [zood])
        ax.plot([*start[0], *g["id_mean"]], [*start[1], *g["ood_mean"]], color=colour, alpha=0.45,
                linewidth=1.3, zorder=2)
        for _, r in g.iterrows():
            ax.errorbar([r["id_mean"]], [r["ood_mean"]],
                        xerr=[np.nan_to_num(r["id_ci"])] if several else None,
                        yerr=[np.nan_to_num(r["ood_ci"])] if several else None,
                        color=colour, marker=marker, markersize=_k_size(max(r["n_train_mean"], 1.0), sizes),
                        markeredgecolor="white", markeredgewidth=0.8, linestyle="none",
                        capsize=2.5, elinewidth=1, alpha=0.95, zorder=4)
        handles.append(Line2D([], [], color=colour, marker=marker, markersize=7, linewidth=1.3,
                              label=m))
        if not len(g):
            continue
        top = g.iloc[[-1]]  # the largest level
        level = top["level"].iloc[0]
        top_label = top["level_label"].iloc[0]
        w = wise[(wise["method"] == m) & (wise["level"] == level)].sort_values("alpha") if len(wise) else wise
        if len(w) > 1:
            ax.plot(w["id"], w["ood"], color=colour, linestyle=(0, (4, 2)), linewidth=1.7,
                    marker="o", markersize=3, zorder=3)
            any_wise = True
            if top["selected_alpha_mean"].notna().all() and top["selected_alpha_mean"].iloc[0] < 1:
                ax.plot(top["selected_id_mean"], top["selected_ood_mean"], marker="o",
                        markersize=11, markerfacecolor="none", markeredgecolor=colour,
                        markeredgewidth=1.8, linestyle="none", zorder=5)
                any_sel = True
    ax.plot([zid], [zood], marker="*", markersize=18, color=ZS_COLOUR, markeredgecolor="white",
            linestyle="none", zorder=6)
    if any_wise:
        handles.append(Line2D([], [], color="#555555", linestyle=(0, (4, 2)), linewidth=1.7,
                              marker="o", markersize=3, label=f"WiSE-FT α = 0 → 1 ({top_label})"))
    if any_sel:
        handles.append(Line2D([], [], marker="o", markersize=11, markerfacecolor="none",
                              markeredgecolor="#555555", markeredgewidth=1.8, linestyle="none",
                              label=f"α chosen by {protocol or 'the protocol'} (mean)"))
    handles.append(Line2D([], [], color="#555555", alpha=0.45, linewidth=1.3,
                          label="path zero-shot → more data"))
    for x, lab in ticks:
        handles.append(Line2D([], [], marker="o", color="#888888", linestyle="none",
                              markersize=_k_size(x, sizes), markeredgecolor="white",
                              label=lab.replace("\n", " ")))
    ax.set_xlabel(f"ID: {head.id}")
    ax.set_ylabel(f"OOD: {head.ood}")
    ax.set_title(f"ID vs OOD {head.metric}: every method and level", loc="left")
    ax.margins(0.06)
    _legend_right(ax, _seed_note(summary).replace("mean ± 95% CI", "points: mean ± 95% CI"), handles)
    _save(fig, path)


def plot_iimm(points: pd.DataFrame, head_by_dataset: dict[str, str], path: Path,
              methods: list[str] | None = None) -> None:
    """IIMM of the pre-trained model (x) against the change after fine-tuning (y): one point
    per task (dataset) and method, at the method's largest level; a least-squares line per method
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
    _legend_right(axes[-1], "method (at its largest level)")
    metrics = "\n".join(f"{d}: {m}" for d, m in sorted(head_by_dataset.items()))
    axes[-1].text(1.02, 0.0, f"Δ in each task's\nheadline metric:\n{metrics}",
                  transform=axes[-1].transAxes, fontsize=8, color="#555555", va="bottom",
                  ha="left")
    fig.suptitle("Does IIMM predict the change after fine-tuning? One point per task and method",
                 fontsize=11, fontweight="bold", x=0.01, ha="left")
    _save(fig, path)


