"""Aggregation over seeds and the Markdown tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.evaluation.measures import MEASURES, report_columns
from pipeline.report.files import METRICS_JSON, SHOTS_CSV
from pipeline.report.inputs import ZEROSHOT, Headline, ReportConfig, shots_metrics, values
from pipeline.report.plots import _zs_value


def summarize(runs: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds per dataset × method × shots: columns `<value>_mean`,
    `<value>_std` (std 0 for a single seed) and `seeds`; zero-shot first, then `methods` order."""
    present = [c for c in values() if c in runs.columns]
    order = list(methods or dict.fromkeys(runs.loc[runs["shots"] > 0, "method"]))
    rows = []
    for (dataset, method, shots), g in runs.groupby(["dataset", "method", "shots"], sort=False):
        row: dict[str, Any] = {"dataset": dataset, "method": method, "shots": int(shots),
                               "seeds": len(g)}
        for c in present:
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
    present = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    for _, r in summary.iterrows():
        zero = int(r["shots"]) == 0
        prefix = ZEROSHOT if zero else f"{r['method']}/k{int(r['shots'])}"
        for c in present:
            if zero and c in ("selected_alpha", "trainable_share", "wall_time_s"):
                continue
            v = r[f"{c}_mean"]
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out[f"{prefix}/{c}"] = float(v)
    for key in (key for m in MEASURES.values() for key in m.summary_keys):
        if key in embed and math.isfinite(embed[key]):
            out[f"{ZEROSHOT}/{key}"] = float(embed[key])
    return out


def shots_long(summary: pd.DataFrame) -> pd.DataFrame:
    """Long format for `dvc plots`: method, shots, metric, value (mean over seeds)."""
    rows = []
    for _, r in summary.iterrows():
        for c in shots_metrics():
            v = r.get(f"{c}_mean", math.nan)
            if v is not None and not pd.isna(v):
                rows.append({"method": r["method"], "shots": int(r["shots"]), "metric": c,
                             "value": float(v)})
    return pd.DataFrame(rows, columns=["method", "shots", "metric", "value"])



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


def summary_markdown(cfg: ReportConfig, summary: pd.DataFrame, head: Headline, embed: dict,
                     plots: list[Path], notes: list[str], tasks: list[str]) -> str:
    has_id = head.id is not None
    seeds = list(cfg.seeds)
    out = [f"# Report: {cfg.dataset}", ""]
    out.append(f"Model `{cfg.arch}` (weights `{cfg.pretrained}`); methods "
               f"{', '.join(cfg.methods)}; k = {', '.join(map(str, cfg.shots))} "
               f"shots per class; seeds {', '.join(map(str, seeds))}.")
    out.append("")
    desc = [f"- **Headline metric** `{head.metric}`: "
            + (f"ID = `{head.id}`, " if has_id else "no ID split (no ID columns), ")
            + f"OOD = `{head.ood}`. Zero-shot is the k = 0 row."]
    desc += [f"- **{c.label}** = {c.description}." for c in report_columns() if c.description]
    desc.append("- Retention tasks: " + (", ".join(tasks) if tasks else "none for this dataset") + ".")
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
                          *((c.name, c.label) for c in report_columns() if c.highlight)):
            c = f"{col}_mean"
            if c not in top or top[c].isna().all():
                continue
            best = top.loc[top[c].idxmax()]
            zs = _zs_value(summary, col)
            delta = f" ({best[c] - zs:+.3f} vs zero-shot)" if math.isfinite(zs) else ""
            hl.append(f"- best {name}: **{best['method']}** {best[c]:.3f}{delta}")
        if hl:
            out += [f"## At k = {kmax}", "", *hl, ""]

    # every registered measure's columns, but none that is empty (e.g. no retention tasks)
    columns = [c for c in report_columns() if f"{c.name}_mean" in summary
               and summary[f"{c.name}_mean"].notna().any()]
    rows1, rows2 = [], []
    for _, r in summary.iterrows():
        n = int(r["seeds"])
        k = int(r["shots"])
        name = "zero-shot" if k == 0 else r["method"]
        perf = [name, str(k), str(n)]
        if has_id:
            perf.append(_fmt(r["id_mean"], r["id_std"], n))
        perf.append(_fmt(r["ood_mean"], r["ood_std"], n))
        perf += [_fmt(r[f"{c.name}_mean"], r[f"{c.name}_std"], n) for c in columns]
        rows1.append(perf)
        if k > 0:
            sel = [name, str(k), _fmt(r["selected_alpha_mean"], r["selected_alpha_std"], n, 2)]
            if has_id:
                sel.append(_fmt(r["selected_id_mean"], r["selected_id_std"], n))
            sel += [_fmt(r["selected_ood_mean"], r["selected_ood_std"], n),
                    _share(r["trainable_share_mean"]),
                    _fmt(r["wall_time_s_mean"], r["wall_time_s_std"], 1, 1)]
            rows2.append(sel)
    h1 = ["method", "k", "seeds", *(["ID"] if has_id else []), "OOD", *(c.label for c in columns)]
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


