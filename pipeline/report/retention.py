"""Zero-shot retention in the report: the change from the pre-trained model on every retention
task and on average, mean ± 95 % CI over seeds, a table and a figure.

The pre-trained model is one deterministic value per task, so the interval of a change is the
interval of the fine-tuned accuracies over seeds. A task on which the pre-trained model is
not above its best constant guess (the share of its most frequent class; one-sided exact
binomial test at the 1 % level) can show no forgetting: the report flags it and leaves it out of
the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.levels import Level, parse_level
from pipeline.report.inputs import ZEROSHOT, RunInput, level_key
from pipeline.evaluation.stats import mean_ci

MEAN = "mean"  # the task column of the average over informative tasks
ALPHA_NOTE = "α*"
SIGNIFICANCE = 0.01


@dataclass(frozen=True)
class TaskInfo:
    name: str
    n_samples: int
    n_classes: int
    majority: float  # accuracy of the best constant guess
    pretrained: float  # the pre-trained model's zero-shot accuracy
    p_value: float  # P(accuracy >= pretrained | the model guesses at `majority`)

    @property
    def informative(self) -> bool:
        return self.p_value < SIGNIFICANCE


def task_infos(records: list[dict], embed: dict[str, float]) -> list[TaskInfo]:
    """The prepared tasks (`data/prepared/retention.json`) with the pre-trained accuracy."""
    from scipy.stats import binomtest

    out = []
    for r in records:
        acc = embed.get(f"zs/{r['name']}/acc", math.nan)
        n = int(r["n_samples"])
        if math.isfinite(acc) and n:
            p = float(binomtest(int(round(acc * n)), n, min(max(r["majority"], 1e-12), 1 - 1e-12),
                                alternative="greater").pvalue)
        else:
            p = math.nan
        out.append(TaskInfo(r["name"], n, int(r["n_classes"]), float(r["majority"]), acc, p))
    return out


def retention_long(inputs: list[RunInput], infos: list[TaskInfo], n_train: dict) -> pd.DataFrame:
    """One row per fine-tuned run × task (and the mean over informative tasks): method, level,
    seed, task, n_train, acc, delta, delta_selected (at the chosen WiSE-FT α)."""
    rows = []
    informative = [t.name for t in infos if t.informative]
    for run in inputs:
        if run.seed is None or not any(k.startswith("zs/") for k in run.metrics):
            continue  # the zero-shot level, or a model without text tower (retention does not apply)
        per = []
        for t in infos:
            acc = run.metrics.get(f"zs/{t.name}/acc", math.nan)
            sel = run.metrics.get(f"selected/zs/{t.name}/acc", math.nan)
            per.append((t.name, acc, acc - t.pretrained, sel - t.pretrained))
        use = [p for p in per if p[0] in informative]
        if use:
            per.append((MEAN, float(np.mean([p[1] for p in use])), float(np.mean([p[2] for p in use])),
                        float(np.mean([p[3] for p in use]))))
        for task, acc, d, ds in per:
            rows.append({"method": run.method, "level": run.level.name, "seed": run.seed, "task": task,
                         "n_train": n_train.get((run.method, run.level.name, run.seed), math.nan),
                         "acc": acc, "delta": d, "delta_selected": ds})
    return pd.DataFrame(rows, columns=["method", "level", "seed", "task", "n_train", "acc", "delta",
                                       "delta_selected"])


def retention_summary(long: pd.DataFrame, methods: list[str], levels: list[Level]) -> pd.DataFrame:
    """Per method × level × task: `<v>_mean`, `<v>_ci` for acc, delta and delta_selected, seeds,
    n_train_mean, level_label; methods and levels in the report's order."""
    rows = []
    order = {lv.name: i for i, lv in enumerate(sorted(levels, key=lambda lv: lv.sort_key))}
    labels = {lv.name: lv.label for lv in levels}
    for (method, level, task), g in long.groupby(["method", "level", "task"], sort=False):
        row = {"method": method, "level": level, "task": task, "seeds": len(g),
               "level_label": labels.get(level) or parse_level(level).label,
               "n_train_mean": float(g["n_train"].mean())}
        for v in ("acc", "delta", "delta_selected"):
            row[f"{v}_mean"], row[f"{v}_ci"] = mean_ci(g[v].tolist())
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    rank = {m: i for i, m in enumerate(methods)}
    df["_r"] = [(rank.get(m, len(rank)), order.get(lv, len(order))) for m, lv in zip(df["method"], df["level"])]
    return df.sort_values("_r", kind="stable").drop(columns="_r").reset_index(drop=True)


def trial_tradeoff(records: list[dict], infos: list[TaskInfo], levels: list[Level]) -> pd.DataFrame:
    """Per method × level × trial (from the selection records): how often it was chosen, its
    mean validation score, and its change in zero-shot retention (mean over informative
    tasks; mean ± CI over seeds): what the protocol traded, since it selects on the task only."""
    pre = {t.name: t.pretrained for t in infos if t.informative}
    labels = {lv.name: lv.label for lv in levels}
    rows = []
    for r in records:
        for trial in r["trials"]:
            chosen = sum(c["trial"] == trial for c in r["seeds"].values())
            scores = [c["scores"].get(trial) for c in r["seeds"].values()]
            deltas = []
            for c in r["seeds"].values():
                acc = (c.get("retention") or {}).get(trial, {})
                d = [acc[f"zs/{t}/acc"] - p for t, p in pre.items() if f"zs/{t}/acc" in acc]
                if pre and len(d) == len(pre):
                    deltas.append(float(np.mean(d)))
            mean, ci = mean_ci(deltas)
            rows.append({"method": r["method"], "level": r["level"], "level_label": labels.get(r["level"], r["level"]),
                         "trial": trial, "chosen": chosen, "seeds": len(r["seeds"]),
                         "val_score": float(np.mean([s for s in scores if s is not None])) if any(
                             s is not None for s in scores) else math.nan,
                         "delta_mean": mean, "delta_ci": ci, "n": len(deltas)})
    return pd.DataFrame(rows, columns=["method", "level", "level_label", "trial", "chosen", "seeds", "val_score",
                                       "delta_mean", "delta_ci", "n"])


def _signed(mean: float, ci: float, seeds: int) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    s = f"{mean:+.3f}"
    if seeds > 1 and ci is not None and not pd.isna(ci):
        s += f" ± {ci:.3f}"
    return s


def retention_flat(summary: pd.DataFrame) -> dict[str, float]:
    """`<method>/<level>/zs_delta` (mean over informative tasks) and
    `<method>/<level>/zs_delta/<task>` for `dvc metrics` and the summary MLflow run."""
    out = {}
    for _, r in summary.iterrows():
        lv = level_key(parse_level(r["level"]))
        key = f"{r['method']}/{lv}/zs_delta" + ("" if r["task"] == MEAN else f"/{r['task']}")
        if math.isfinite(r["delta_mean"]):
            out[key] = float(r["delta_mean"])
    return out


def retention_markdown(summary: pd.DataFrame, infos: list[TaskInfo], hint: str, plot: Path | None,
                       table, tradeoff: pd.DataFrame | None = None, split: str = "") -> list[str]:
    """The report's retention section (`table`: the report's Markdown table writer)."""
    out = ["## Zero-shot retention: change from the pre-trained model", ""]
    if not infos:
        return out + [hint, ""]
    out += ["Zero-shot accuracy on tasks the models are never trained on, with their own prompts and "
            "each model's own text tower. Each cell is the fine-tuned accuracy minus the pre-trained "
            "model's, mean ± 95 % CI over seeds (at α = 1, the fine-tuned model; the last column at the "
            "WiSE-FT α chosen by the protocol). Negative = forgotten.", ""]
    rows = [[t.name, str(t.n_samples), str(t.n_classes), f"{t.majority:.3f}",
             "–" if not math.isfinite(t.pretrained) else f"{t.pretrained:.3f}",
             "yes" if t.informative else f"**no** (p = {t.p_value:.2g})"] for t in infos]
    out += [table(["task", "images", "classes", "best constant guess", "pre-trained", "above the guess"],
                  rows, ["l", "r", "r", "r", "r", "l"]), ""]
    flagged = [t.name for t in infos if not t.informative]
    if flagged:
        out += [f"**No signal** from {', '.join(flagged)}: the pre-trained model is not above the best "
                f"constant guess there (one-sided exact binomial test, {SIGNIFICANCE:.0%} level), so it has "
                "nothing to forget; left out of the mean.", ""]
    if summary.empty:
        return out
    tasks = [t.name for t in infos]
    has_mean = (summary["task"] == MEAN).any()
    header = ["method", "level", *(f"Δ {t}" for t in tasks)] + (["mean Δ", f"mean Δ at {ALPHA_NOTE}"] if has_mean else [])
    body = []
    for (method, level), g in summary.groupby(["method", "level"], sort=False):
        by = {r["task"]: r for _, r in g.iterrows()}
        label = g["level_label"].iloc[0]
        cells = [method, label]
        for t in tasks:
            r = by.get(t)
            cells.append("–" if r is None else _signed(r["delta_mean"], r["delta_ci"], int(r["seeds"])))
        if has_mean:
            r = by.get(MEAN)
            cells += ["–", "–"] if r is None else [
                f"**{_signed(r['delta_mean'], r['delta_ci'], int(r['seeds']))}**",
                _signed(r["delta_selected_mean"], r["delta_selected_ci"], int(r["seeds"]))]
        body.append(cells)
    out += [table(header, body, ["l", "l"] + ["r"] * (len(header) - 2)), ""]
    if plot is not None:
        out += [f"![zero-shot retention]({plot.name})", ""]
    if tradeoff is not None and len(tradeoff) and (tradeoff["n"] > 0).any():
        rows = [[r["method"], r["level_label"], r["trial"], f"{r['chosen']}/{r['seeds']}",
                 "–" if pd.isna(r["val_score"]) else f"{r['val_score']:.3f}",
                 _signed(r["delta_mean"], r["delta_ci"], int(r["n"]))] for _, r in tradeoff.iterrows()]
        out += ["### What the selection traded", "",
                f"Every trial of the search (fine-tuned model, α = 1): how many seeds chose it, its mean "
                f"validation score{f' on `{split}`' if split else ''} (what the protocol maximises) and its "
                "mean change in retention over the informative tasks (what the protocol does not see).", "",
                table(["method", "level", "trial", "chosen", "val score", "mean Δ retention"], rows,
                      ["l", "l", "l", "r", "r", "r"]), ""]
    return out


def plot_retention(summary: pd.DataFrame, infos: list[TaskInfo], path: Path) -> None:
    """One panel per task (and the mean): the change from the pre-trained model against the
    training examples, one line per method with its 95 % CI band; 0 dashed."""
    from pipeline.report.plots import _figure, _legend_right, _lines_vs_shots, _save, _seed_note

    panels = [t.name for t in infos] + ([MEAN] if (summary["task"] == MEAN).any() else [])
    fig, axes = _figure(width=4.6 * len(panels) + 1.6, height=4.4, ncols=len(panels))
    lows, highs = [], []
    for ax, task in zip(axes, panels):
        g = summary[summary["task"] == task].rename(columns={"delta_mean": "d_mean", "delta_ci": "d_ci"})
        _lines_vs_shots(ax, g, "d", 0.0, "pre-trained (Δ = 0)")
        info = next((t for t in infos if t.name == task), None)
        title = "mean over tasks" if task == MEAN else task
        if info is not None and not info.informative:
            title += " (no signal)"
        ax.set_title(title, loc="left", fontsize=10)
        if ax is axes[0]:
            ax.set_ylabel("Δ zero-shot accuracy vs pre-trained")
        lows.append((g["d_mean"] - g["d_ci"].fillna(0)).min())
        highs.append((g["d_mean"] + g["d_ci"].fillna(0)).max())
    low, high = min(float(np.nanmin(lows)), 0.0), max(float(np.nanmax(highs)), 0.0)
    pad = 0.08 * (high - low) + 0.005
    for ax in axes:
        ax.set_ylim(low - pad, high + pad)
    _legend_right(axes[-1], _seed_note(summary.assign(method=summary["method"])))
    fig.suptitle("Zero-shot retention on tasks never trained on: change from the pre-trained model",
                 fontsize=11, fontweight="bold", x=0.01, ha="left")
    _save(fig, path)


__all__ = ["TaskInfo", "task_infos", "trial_tradeoff", "retention_long", "retention_summary", "retention_flat",
           "retention_markdown", "plot_retention", "MEAN", "ZEROSHOT"]
