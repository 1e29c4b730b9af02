"""Aggregation over seeds and the Markdown tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

import numpy as np

from pipeline.core.levels import ZERO_SHOT, Level, parse_level
from pipeline.evaluation.measures import MEASURES, report_columns, text_columns
from pipeline.evaluation.soups import parse_row
from pipeline.report.families import family_tables
from pipeline.report.files import METRICS_JSON, SHOTS_CSV
from pipeline.report.inputs import ZEROSHOT, Headline, ReportConfig, level_key, shots_metrics, values
from pipeline.report.plots import _zs_value
from pipeline.evaluation.stats import mean_ci


def summarize(runs: pd.DataFrame, methods: list[str] | None = None,
              levels: list[Level] | None = None) -> pd.DataFrame:
    """Mean, std and 95 % CI half-width (Student t over seeds: `stats.mean_ci`) per dataset ×
    method × level: columns `<value>_mean`, `<value>_std`, `<value>_ci` (NaN for one seed),
    `seeds`, `level_label`; zero-shot first, then `methods` order, levels by kind and size."""
    present = [c for c in values() if c in runs.columns]
    order = list(methods or dict.fromkeys(runs.loc[runs["seed"].notna(), "method"]))
    by_name = {lv.name: lv for lv in (levels or [])}
    rows = []
    for (dataset, method, level), g in runs.groupby(["dataset", "method", "level"], sort=False):
        zero = g["seed"].isna().all()
        lv = ZERO_SHOT if zero else by_name.get(level) or parse_level(level)
        row: dict[str, Any] = {"dataset": dataset, "method": method, "level": level,
                               "level_kind": lv.kind, "level_label": lv.label, "seeds": len(g),
                               "_sort": (-1, 0.0) if zero else lv.sort_key}
        for c in present:
            col = g[c].astype(float)
            n = int(col.notna().sum())
            mean, ci = mean_ci(col.tolist())
            row[f"{c}_mean"] = mean
            row[f"{c}_std"] = (float(col.std(ddof=1)) if n > 1 else 0.0) if n else math.nan
            row[f"{c}_ci"] = ci
        rows.append(row)
    df = pd.DataFrame(rows)
    rank = {m: i for i, m in enumerate(order)}
    df["_rank"] = [-1 if s[0] == -1 else rank.get(m, len(rank)) for m, s in zip(df["method"], df["_sort"])]
    df = df.sort_values(["dataset", "_rank", "_sort"], kind="stable")
    return df.drop(columns=["_rank", "_sort"]).reset_index(drop=True)


def _level_key(row) -> str:
    return level_key(ZERO_SHOT if row["level"] == "0" and row["method"] == ZEROSHOT
                     else parse_level(row["level"]))


def flat_metrics(summary: pd.DataFrame, embed: dict[str, float]) -> dict[str, float]:
    """`zeroshot/<value>` and `<method>/<level>/<value>` (`ft/k16/id`, `ft/25%/id`; means over
    seeds) plus the zero-shot task measures (`zeroshot/iimm`, ...); NaNs left out (DVC reads
    strict JSON)."""
    out: dict[str, float] = {}
    present = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    for _, r in summary.iterrows():
        zero = r["method"] == ZEROSHOT and r["level"] == "0"
        prefix = ZEROSHOT if zero else f"{r['method']}/{_level_key(r)}"
        for c in present:
            if zero and c in ("selected_alpha", "trainable_share", "wall_time_s", "selection_score",
                              "n_train", "train_steps"):
                continue
            v = r[f"{c}_mean"]
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out[f"{prefix}/{c}"] = float(v)
    for key in (key for m in MEASURES.values() for key in m.summary_keys):
        if key in embed and math.isfinite(embed[key]):
            out[f"{ZEROSHOT}/{key}"] = float(embed[key])
    return out


def shots_long(summary: pd.DataFrame) -> pd.DataFrame:
    """Long format for `dvc plots`: method, level, n_train (training examples), metric, value
    (mean over seeds), ci (95 % half-width; empty for one seed)."""
    rows = []
    for _, r in summary.iterrows():
        for c in shots_metrics():
            v = r.get(f"{c}_mean", math.nan)
            if v is not None and not pd.isna(v):
                ci = r.get(f"{c}_ci", math.nan)
                rows.append({"method": r["method"], "level": r["level_label"],
                             "n_train": float(r["n_train_mean"]), "metric": c, "value": float(v),
                             "ci": None if pd.isna(ci) else float(ci)})
    return pd.DataFrame(rows, columns=["method", "level", "n_train", "metric", "value", "ci"])


def level_curves(summary: pd.DataFrame, methods: list[str], zeroshot: str,
                 no_zero: Iterable[str] = ()) -> dict[str, list[tuple[int, float]]]:
    """Each method's mean ID / OOD (at α = 1 and at the selected α) against the level's
    training-set size, the zero-shot model at 0: `curve/<method>/<value>` -> [(n_train, mean)],
    what the report run logs with the size as the step, so MLflow's own charts draw metric vs
    level. Methods in `no_zero` (no text tower: no zero-shot level) start at their first level."""
    zero = summary[(summary["method"] == zeroshot) & (summary["level"] == "0")]
    out: dict[str, list[tuple[int, float]]] = {}
    for m in methods:
        rows = summary[summary["method"] == m]
        for col in ("id", "ood", "selected_id", "selected_ood"):
            if f"{col}_mean" not in summary:
                continue
            points = [(0, float(zero[f"{col}_mean"].iloc[0]))] if len(zero) and m not in no_zero else []
            points += [(int(round(float(r["n_train_mean"]))), float(r[f"{col}_mean"])) for _, r in rows.iterrows()]
            points = [(n, v) for n, v in points if not math.isnan(v)]
            if points:
                out[f"curve/{m}/{col}"] = points
    return out


def method_headlines(summary: pd.DataFrame, methods: list[str], zeroshot: str) -> dict[str, dict[str, float]]:
    """One small table per method for `dvc metrics show` (a row per method, a column per level
    and value): the mean ID and OOD at the selected α, over seeds; the zero-shot model as its
    own row. The full set of means and intervals is `metrics/report.json` and reports/."""
    out: dict[str, dict[str, float]] = {}
    for m in [zeroshot, *methods]:
        rows = summary[summary["method"] == m] if m != zeroshot else summary[
            (summary["method"] == zeroshot) & (summary["level"] == "0")]
        table: dict[str, float] = {}
        for _, r in rows.iterrows():
            for col, name in (("selected_id", "id"), ("selected_ood", "ood")):
                v = r.get(f"{col}_mean", math.nan)
                if v is not None and not pd.isna(v):
                    table[f"{r['level_label'].replace('zero-shot', 'k=0')}/{name}"] = round(float(v), 4)
        if table:
            out[m] = table
    return out


def selection_table(records: list[dict]) -> pd.DataFrame:
    """Per method × level: the protocol, how many trials, which trial each seed chose (with
    counts), the chosen trials' mean validation score, and any edge of the search list."""
    rows = []
    for r in records:
        chosen = [c["trial"] for c in r["seeds"].values()]
        counts = {t: chosen.count(t) for t in dict.fromkeys(chosen)}
        scores = [c["score"] for c in r["seeds"].values() if c.get("score") is not None]
        edges = sorted({e for c in r["seeds"].values() for e in c.get("edges", [])})
        rows.append({"method": r["method"], "level": r["level"], "protocol": r["protocol"],
                     "split": r.get("split") or "", "trials": len(r["trials"]),
                     "chosen": ", ".join(f"{t} ×{n}" for t, n in counts.items()),
                     "val_score": float(np.mean(scores)) if scores else math.nan,
                     "edges": "; ".join(edges)})
    return pd.DataFrame(rows, columns=["method", "level", "protocol", "split", "trials", "chosen",
                                       "val_score", "edges"])


def _fmt(mean: float, ci: float, seeds: int, digits: int = 3, scale: float = 1.0,
         unit: str = "") -> str:
    """`0.512 ± 0.031`: the mean and its 95 % CI half-width (just the mean for one seed)."""
    if mean is None or pd.isna(mean):
        return "–"
    s = f"{mean * scale:.{digits}f}"
    if seeds > 1 and ci is not None and not pd.isna(ci):
        s += f" ± {ci * scale:.{digits}f}"
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
                     plots: list[Path], notes: list[str], tasks: list[str],
                     selection: pd.DataFrame | None = None, retention: list[str] | None = None,
                     text_free: Iterable[str] = (), significance: list[str] | None = None,
                     search: list[str] | None = None) -> str:
    """summary.md. `text_free`: methods without a text tower (vision-only baselines), whose
    cells of text-tower measures (retention, RSA) read "n/a" instead of a number;
    `significance`: the section of `compare.report_section`, right after the results table;
    `search`: the section of `search.search_report`, after the selection table."""
    text_free = set(text_free)
    no_text_cols = text_columns()
    has_id = head.id is not None
    seeds = list(cfg.seeds)
    n_trials = sum(len(t) for t in cfg.trials.values())
    out = [f"# Report: {cfg.dataset}", ""]
    out.append(f"Model `{cfg.arch}` (weights `{cfg.pretrained}`); methods {', '.join(cfg.methods)}; "
               f"levels {', '.join(lv.label for lv in cfg.levels)}; seeds {', '.join(map(str, seeds))}; "
               f"{n_trials} trials, selected per method, level and seed by `{cfg.selection}`.")
    out.append("")
    desc = [f"- **Headline metric** `{head.metric}`: "
            + (f"ID = `{head.id}`, " if has_id else "no ID split (no ID columns), ")
            + f"OOD = `{head.ood}` (test splits, never used for any choice). Zero-shot is the first row."]
    desc.append(f"- Each cell is the trial chosen on validation data by the protocol "
                f"(`evaluate.selection: {cfg.selection}`; see the selection table), then averaged over seeds.")
    desc += [f"- **{c.label}** = {c.description}." for c in report_columns() if c.description]
    desc.append("- Retention tasks: " + (", ".join(tasks) + " (changes from the pre-trained model: the retention section)"
                                         if tasks else "none (the retention section says how to add one)") + ".")
    desc.append("- **α\*** = WiSE-FT mixing weight chosen by the same protocol "
                "(1 = the fine-tuned model; methods without WiSE-FT always report 1).")
    soup_rows = [m for m in dict.fromkeys(summary["method"]) if parse_row(m)]
    if soup_rows:
        desc.append(f"- **Model soups** ({', '.join(soup_rows)}): the weights of every trial of the method "
                    "(uniform), or of the trials a greedy pass keeps on the selection's validation data "
                    "(best trial first, each next one kept if the soup's score does not fall), averaged "
                    "at each level and seed; `evaluate.soups`.")
    if len(seeds) > 1:
        desc.append(f"- Cells are mean ± 95 % confidence interval over {len(seeds)} seeds "
                    f"(Student t, {len(seeds) - 1} degrees of freedom); each seed draws its own sample and trains with its own seed.")
    else:
        desc.append("- One seed: no interval. A result needs several seeds (`sample.seeds`).")
    if "iimm" in embed:
        desc.append(f"- IIMM of the pre-trained model on this task: {embed['iimm']:.3f}.")
    transfer = [f"`{k}` {embed[k]:.3f}" for k in MEASURES["transfer"].summary_keys if k in embed]
    if transfer:
        desc.append("- Transferability scores of the pre-trained features on the same train subsample "
                    "(higher = easier to transfer; `pipeline/evaluation/transfer.py`): " + ", ".join(transfer) + ".")
    out += desc + [""]

    fine = summary[summary["seeds"].notna() & (summary["level"] != "0")]
    if len(fine):
        top_n = fine["n_train_mean"].max()
        top = fine[fine["n_train_mean"] == top_n]
        label = top["level_label"].iloc[0]
        hl = []
        for col, name in (("id", "ID"), ("ood", "OOD"), ("selected_ood", "OOD at α*"),
                          *((c.name, c.label) for c in report_columns() if c.highlight)):
            c = f"{col}_mean"
            if c not in top or top[c].isna().all():
                continue
            best = top.loc[top[c].idxmax()]
            zs = _zs_value(summary, col)
            delta = f" ({best[c] - zs:+.3f} vs zero-shot)" if math.isfinite(zs) else ""
            hl.append(f"- best {name}: **{best['method']}** {_fmt(best[c], best[f'{col}_ci'], int(best['seeds']))}{delta}")
        if hl:
            out += [f"## At the largest level ({label}, {top_n:.0f} training examples)", "", *hl, ""]

    # every registered measure's columns, but none that is empty (e.g. no retention tasks)
    columns = [c for c in report_columns() if f"{c.name}_mean" in summary
               and summary[f"{c.name}_mean"].notna().any()]
    rows1, rows2, zero_cells = [], [], None  # rows: (report row, cells), grouped by family below
    for _, r in summary.iterrows():
        n = int(r["seeds"])
        zero = r["level"] == "0" and r["method"] == ZEROSHOT
        name = "zero-shot" if zero else r["method"]
        perf = [name, r["level_label"], f"{r['n_train_mean']:.0f}", str(n)]
        if has_id:
            perf.append(_fmt(r["id_mean"], r["id_ci"], n))
        perf.append(_fmt(r["ood_mean"], r["ood_ci"], n))
        perf += ["n/a" if r["method"] in text_free and c.name in no_text_cols and not zero
                 else _fmt(r[f"{c.name}_mean"], r[f"{c.name}_ci"], n) for c in columns]
        if zero:
            zero_cells = perf
        else:
            rows1.append((r["method"], perf))
        if not zero:
            sel = [name, r["level_label"], _fmt(r["selected_alpha_mean"], r["selected_alpha_ci"], n, 2)]
            if has_id:
                sel.append(_fmt(r["selected_id_mean"], r["selected_id_ci"], n))
            sel += [_fmt(r["selected_ood_mean"], r["selected_ood_ci"], n),
                    _share(r["trainable_share_mean"]), f"{r['train_steps_mean']:.0f}",
                    _fmt(r["wall_time_s_mean"], r["wall_time_s_ci"], 1, 1)]
            rows2.append((r["method"], sel))
    h1 = ["method", "level", "examples", "seeds", *(["ID"] if has_id else []), "OOD", *(c.label for c in columns)]
    out += ["## Results", "", *family_tables(h1, rows1, ["l", "l", "r", "r"] + ["r"] * (len(h1) - 4), _md_table,
                                             zero_cells)]
    if text_free & set(summary["method"]):
        listed = [m for m in dict.fromkeys(summary["method"]) if m in text_free]
        verb = "fine-tunes" if len(listed) == 1 else "fine-tune"
        out += [f"**n/a**: {', '.join(listed)} {verb} a vision-only model (`vision.arch`), which has no text tower: it has "
                "no zero-shot level (its curves start at its smallest level; the zero-shot row is the CLIP's), and "
                "zero-shot retention and RSA do not apply to it.", ""]
    out += significance or []
    out += retention or []
    if selection is not None and len(selection):
        rows3, wide = [], []
        for _, r in selection.iterrows():
            lv = next((x.label for x in cfg.levels if x.name == r["level"]), r["level"])
            score = "–" if pd.isna(r["val_score"]) else f"{r['val_score']:.3f}"
            rows3.append([r["method"], lv, str(r["trials"]), r["chosen"], score, r["edges"] or "–"])
            if r["edges"]:
                wide.append(f"{r['method']} at {lv}")
        where = next(iter(selection["split"]), "") or "none"
        out += [f"## Selection (`{next(iter(selection['protocol']))}` on `{where}`)", "",
                "The trial chosen per seed (×count), from how many trials, and the chosen trials' "
                "mean validation score. An edge means the chosen value is at the edge of its search space "
                "(a drawn trial: of its `finetune.search` space, see the search section; a hand-written "
                "trial: the smallest or largest of the method's `finetune.trials`).", "",
                _md_table(["method", "level", "trials", "chosen (per seed)", "val score", "edge of the search"],
                          rows3, ["l", "l", "r", "l", "r", "l"]), ""]
        if wide:
            out += [f"**Widen the search**: the choice sits on the edge of its search space for "
                    f"{len(wide)} of {len(selection)} cells ({', '.join(wide[:6])}{', …' if len(wide) > 6 else ''}); "
                    "add a search of the method beyond that edge to `finetune.search` (the trials drawn so far "
                    "stay; moving a bound redraws the space) or values beyond it to `finetune.trials`.", ""]
    out += search or []
    if rows2:
        h2 = ["method", "level", "α*", *(["ID at α*"] if has_id else []), "OOD at α*", "trainable",
              "steps", "train time (s)"]
        out += ["## WiSE-FT selection and cost", "",
                *family_tables(h2, rows2, ["l", "l"] + ["r"] * (len(h2) - 2), _md_table)]
    if plots:
        out += ["## Plots", ""]
        out += [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots]
        out.append("")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out += ["Files: `runs.csv` (every run), `summary.csv` (these tables, unrounded), `selection.csv`, "
            f"`{METRICS_JSON}` (`dvc metrics show`), `{SHOTS_CSV}` (`dvc plots`).", ""]
    return "\n".join(out)
