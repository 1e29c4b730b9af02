"""The report's view of the search (`finetune.search`): per method and level the space, how many
trials, the validation score against each searched hyper-parameter (a sensitivity plot per
method, log x-axis where the space is log-uniform), the value each seed chose, and whether the
choice sits at the edge of the *space* (`pipeline.core.search.edge`; computed by the selection
stage into each record's `edges`).

Reads only the selection records (`runs/select/<method>/<level>.json`): each holds the trials'
origin (which search drew each), the searches' spaces, every trial's hyper-parameters and, per
seed, every trial's validation score on the protocol's split (never a test split)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from pipeline import artifacts as paths
from pipeline.report.files import _write_atomic

SEARCH_CSV = paths.REPORTS / "search.csv"  # every trial × seed: search, values, validation score, chosen


def plot_file(method: str) -> Path:
    return paths.REPORTS / f"search_{method}.png"


def old_plots() -> list[Path]:
    """Sensitivity plots of an earlier report (removed before a new one is written)."""
    return sorted(paths.REPORTS.glob("search_*.png")) if paths.REPORTS.is_dir() else []


def _searched(record: dict) -> list[tuple[str, str]]:
    """(hyper-parameter, kind) of every dimension of the record's searches, in space order;
    kind 'loguniform' wins when two searches of the method disagree (log axis)."""
    out: dict[str, str] = {}
    for s in record.get("searches", {}).values():
        for key, dim in s["space"].items():
            if out.get(key) != "loguniform":
                out[key] = dim["kind"]
    return list(out.items())


def search_long(records: list[dict]) -> pd.DataFrame:
    """One row per method × level × seed × trial: its search ('' = hand-written), every searched
    hyper-parameter's value, the validation score, and whether the seed chose it."""
    rows = []
    for r in records:
        keys = [k for k, _ in _searched(r)]
        for seed, cell in r["seeds"].items():
            for trial in r["trials"]:
                hp = r.get("hparams", {}).get(trial, {})
                score = cell.get("scores", {}).get(trial)
                rows.append({"method": r["method"], "level": r["level"], "seed": int(seed), "trial": trial,
                             "search": (r.get("origin") or {}).get(trial) or "",
                             **{f"hp/{k}": hp.get(k) for k in keys},
                             "score": math.nan if score is None else float(score),
                             "chosen": cell["trial"] == trial})
    return pd.DataFrame(rows)


def _how(search: dict) -> str:
    return "grid" if search["sampler"] == "grid" else f"{search['sampler']}, n = {search['n']}"


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def search_markdown(records: list[dict], level_label, plots: dict[str, Path], table) -> list[str]:
    """The summary.md section: per method the spaces (with sampler and draws), per level the
    number of trials, the value each seed chose and the edges; the sensitivity plot. `table`:
    the markdown table builder (`tables._md_table`)."""
    with_search = [r for r in records if r.get("searches")]
    if not with_search:
        return []
    out = ["## Search", "",
           "Each method's search space (`finetune.search`), how many trials it gave, and per level the value each "
           "seed's selection chose (validation data only). An edge means the chosen value lies at the edge of the "
           "*space*: the first or last value of a grid list, the smallest or largest numeric choice, or a drawn "
           "value in the outer 1/(2n) of its range in the distribution's scale (log for loguniform), n the number "
           "of draws; an edge another search of the method reaches past is none.", ""]
    for method in dict.fromkeys(r["method"] for r in with_search):
        rs = [r for r in with_search if r["method"] == method]
        spaces = {}
        for r in rs:
            spaces.update(r["searches"])
        out.append(f"**{method}**: " + "; ".join(f"`{name}` {s['text']} ({_how(s)})" for name, s in spaces.items())
                   + f", {len(rs[0]['trials'])} trials")
        out.append("")
        keys = [k for k, _ in _searched(rs[0])]
        rows = []
        for r in rs:
            for seed, cell in r["seeds"].items():
                hp = r.get("hparams", {}).get(cell["trial"], {})
                rows.append([r["method"], level_label(r["level"]), seed, cell["trial"],
                             *(_value(hp.get(k, "–")) for k in keys),
                             "–" if cell.get("score") is None else f"{cell['score']:.3f}",
                             "; ".join(cell.get("edges", [])) or "–"])
        out += [table(["method", "level", "seed", "chosen trial", *keys, "val score", "edge of the space"], rows,
                      ["l", "l", "r", "l", *["r"] * len(keys), "r", "l"]), ""]
        if method in plots:
            out += [f"![search {method}]({plots[method].name})", ""]
    return out


def plot_search(records: list[dict], method: str, level_label, path: Path) -> list[str] | None:
    """Validation score against each searched hyper-parameter of `method`: one panel per
    hyper-parameter (rows) and level (columns); every trial × seed a dot, the mean over seeds a
    line through the trials in value order, each seed's choice a star. Log x for a
    log-uniform space. Returns each panel row's x scale ('log' | 'linear'); None (nothing
    written) when no numeric hyper-parameter was searched or nothing was scored (protocol `none`)."""
    from pipeline.report.plots import _RC, _save, method_style

    rs = [r for r in records if r["method"] == method and r.get("searches")]
    if not rs or not any(c.get("scores") for r in rs for c in r["seeds"].values()):
        return None
    data = search_long(rs)
    dims = [(k, kind) for k, kind in _searched(rs[0])
            if pd.to_numeric(data[f"hp/{k}"], errors="coerce").notna().all()]
    if not dims:
        return None
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    colour, _ = method_style(method)
    levels = list(dict.fromkeys(r["level"] for r in rs))
    with rc_context(_RC):
        fig = Figure(figsize=(3.4 * len(levels) + 0.6, 2.8 * len(dims) + 0.6), layout="constrained")
        axes = fig.subplots(len(dims), len(levels), squeeze=False)
        for i, (key, kind) in enumerate(dims):
            for j, level in enumerate(levels):
                ax = axes[i][j]
                d = data[data["level"] == level].copy()
                d["x"] = pd.to_numeric(d[f"hp/{key}"])
                ax.scatter(d["x"], d["score"], s=14, color=colour, alpha=0.45, linewidths=0,
                           label="trial × seed")
                mean = d.groupby("x")["score"].mean().sort_index()
                ax.plot(mean.index, mean.values, color=colour, lw=1.2, label="mean over seeds")
                chosen = d[d["chosen"]]
                ax.scatter(chosen["x"], chosen["score"], marker="*", s=110, color="#d62728", zorder=3,
                           label="chosen (per seed)")
                for s in rs[0]["searches"].values():  # the space's bounds: where "widen" points
                    dim = s["space"].get(key)
                    if dim and dim["kind"] in ("loguniform", "uniform", "int"):
                        for b in dim["values"]:
                            ax.axvline(b, color="#7f7f7f", lw=0.8, ls="--")
                if kind == "loguniform":
                    ax.set_xscale("log")
                ax.set_xlabel(key + (" (log)" if kind == "loguniform" else ""))
                if j == 0:
                    ax.set_ylabel(f"val score ({rs[0].get('score_key') or '–'})")
                ax.set_title(f"{method} at {level_label(level)}")
        axes[0][0].legend(loc="best", frameon=False)
        _save(fig, path)
    return [axes[i][0].get_xscale() for i in range(len(dims))]


def search_report(records: list[dict], level_label, table) -> tuple[list[str], list[Path], pd.DataFrame]:
    """(summary.md section, sensitivity plots written, the long table for search.csv)."""
    plots = {}
    for method in dict.fromkeys(r["method"] for r in records):
        if plot_search(records, method, level_label, plot_file(method)) is not None:
            plots[method] = plot_file(method)
    return search_markdown(records, level_label, plots, table), list(plots.values()), search_long(records)


def write_long(df: pd.DataFrame) -> None:
    _write_atomic(SEARCH_CSV, lambda tmp: df.to_csv(tmp, index=False, float_format="%.10g"))
