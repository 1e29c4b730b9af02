"""The answer with significance: which methods, at which level of data, differ for real.

Two questions, two tests (the figures are the headline ones the report already gives: the
official metric on the last ID / OOD split of the trial and WiSE-FT α that the selection
protocol chose on *validation* data, `selected_id` / `selected_ood` of `reports/runs.csv`; no
choice here ever looks at a test split, it only compares the chosen models' test figures):

**Within one experiment, per level: paired over seeds.** A seed draws the same training
sample for every method (`sample` stage: `data/samples/<level>/seed<S>.json`, shared by all
methods) and seeds the training, so the runs of two methods at one seed are a pair, and the
seed-to-seed variation of the sample cancels in their difference. Each method is compared with
the level's best (the highest mean over seeds) and with the zero-shot model (k = 0, one value:
the pair's difference is then the method's value minus that constant) by the two-sided paired
t-test (`scipy.stats.ttest_rel`), over the seeds both have. The p-values of one family (one
level, one figure, one reference) are corrected for multiple comparisons by Holm's step-down
method (`statsmodels.stats.multitest.multipletests`, `holm`), which controls the family-wise
error rate at α = 0.05 under any dependence between the tests.

Why the t-test, not Wilcoxon's signed-rank test: with n seeds the exact two-sided
signed-rank p-value is at least 2/2ⁿ (0.25 for 3 seeds, 0.0625 for 5), so below 6 seeds it can
never reject at 0.05, whatever the data. The t-test can, at the cost of assuming that the
differences over seeds are roughly normal (seed noise usually is). Its power with 3 seeds is
low all the same: `power_note` states the smallest difference, in units of the differences'
standard deviation over seeds, that it detects with 80 % power (statsmodels' `TTestPower`);
"indistinguishable from the best" then means "not shown to differ by these seeds", not
"equal". `--test wilcoxon` (`scipy.stats.wilcoxon`) is there for studies with many seeds.

**Across experiments: ranks over tasks.** A task is one experiment (a dataset, or a task of
the synthetic family) at one level; per task, each method's seed mean is ranked (1 = best,
ties share the mean rank). The Friedman test (`scipy.stats.friedmanchisquare`) asks whether
the average ranks differ at all; the Nemenyi post-hoc test (`scikit_posthocs.
posthoc_nemenyi_friedman`) compares every pair, and the critical-difference diagram
(`scikit_posthocs.critical_difference_diagram`; Demšar 2006, JMLR 7) draws the average ranks
with a bar joining the methods it cannot tell apart, and the critical difference

    CD = q_α / √2 · √(k (k + 1) / (6 N))   (q_α: the studentized range's 1 − α quantile, k methods, N tasks)

Friedman assumes independent tasks: levels of one dataset share its data (the samples of a
seed are nested), so with several levels per dataset the p-values are optimistic; ranks over
datasets at one level (`--level`) are the strict reading. The zero-shot model takes part as
`zero-shot` (its k = 0 value at every level of a dataset).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ALPHA = 0.05
FIGURES = {"ood": "selected_ood", "id": "selected_id"}  # the headline figures at the chosen trial and α
NAMES = {"ood": "OOD", "id": "ID"}
TESTS = ("t", "wilcoxon")
TEST_NAMES = {"t": "two-sided paired t-test over seeds (scipy.stats.ttest_rel)",
              "wilcoxon": "two-sided Wilcoxon signed-rank test over seeds (scipy.stats.wilcoxon)"}
ZERO = "zero-shot"  # the k = 0 model as a contender (the method `zeroshot` at k > 0 keeps its name)
BEST, ZERO_REF = "best", "zero-shot"


# ---------------------------------------------------------------------------------------------
# within one experiment: paired over seeds


def _level_order(level: str) -> tuple:
    from pipeline.core.levels import parse_level

    try:
        return parse_level(level).sort_key
    except Exception:  # noqa: BLE001 — an unknown label sorts last, by name
        return (9, 0.0)


def _level_label(level: str) -> str:
    from pipeline.core.levels import parse_level

    try:
        return parse_level(level).label
    except Exception:  # noqa: BLE001
        return str(level)


def zero_shot_value(runs: pd.DataFrame, figure: str) -> float:
    """The k = 0 model's figure (the row without a seed at level 0), NaN if absent."""
    zero = runs[runs["seed"].isna() & (runs["level"].astype(str) == "0")]
    if zero.empty or figure not in zero:
        return math.nan
    return float(zero[figure].iloc[0])


def seed_table(runs: pd.DataFrame, level: str, figure: str, methods: list[str] | None = None) -> pd.DataFrame:
    """Seeds × methods of one level's `figure` (`runs.csv` rows; methods in `methods` order or
    as listed; a method without any value at the level is left out)."""
    fine = runs[runs["seed"].notna() & (runs["level"].astype(str) == str(level))]
    if figure not in fine:
        return pd.DataFrame()
    table = fine.pivot_table(index="seed", columns="method", values=figure, aggfunc="first", dropna=False)
    order = [m for m in (methods or dict.fromkeys(fine["method"])) if m in table.columns]
    table = table[order].astype(float)
    return table.loc[:, table.notna().any()]


def paired_p(a, b, test: str = "t") -> float:
    """Two-sided p of the paired test of a against b (NaN below 2 pairs, or where the test is
    undefined: equal pairs throughout)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        return math.nan
    d = a - b
    if np.all(d == 0):
        return 1.0  # no difference at all: nothing to reject
    if np.ptp(d) == 0 and test == "t":
        return 0.0  # the same non-zero difference at every seed: t = ±∞ (scipy's answer too)
    with warnings.catch_warnings():  # nearly equal pairs: scipy warns of precision loss, the p stands
        warnings.simplefilter("ignore", RuntimeWarning)
        if test == "wilcoxon":
            return float(stats.wilcoxon(a, b, alternative="two-sided").pvalue)
        return float(stats.ttest_rel(a, b).pvalue)


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values (statsmodels); NaNs stay NaN and take no part."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=ALPHA, method="holm")[1]
    return [float(v) for v in out]


def paired_tests(runs: pd.DataFrame, value: str = "ood", methods: list[str] | None = None, test: str = "t",
                 alpha: float = ALPHA) -> pd.DataFrame:
    """Per level, each method against the level's best and against the zero-shot model.

    Columns: level, level_label, value (ood/id), reference (`best` / `zero-shot`), ref_method,
    method, seeds (the pairs), mean, ref_mean, diff (mean of method − reference), p (the raw
    two-sided p), p_holm (Holm over the level's methods against that reference), significant
    (p_holm < alpha). The best itself is not tested against itself (its row vs `best` has NaN p)."""
    figure = FIGURES[value]
    if test not in TESTS:
        raise ValueError(f"test {test!r}: allowed values are {', '.join(TESTS)}")
    rows = []
    zs = zero_shot_value(runs, figure)
    levels = sorted({str(lv) for lv in runs.loc[runs["seed"].notna(), "level"]}, key=_level_order)
    for level in levels:
        table = seed_table(runs, level, figure, methods)
        if table.empty:
            continue
        means = table.mean()
        best = str(means.idxmax())  # ties: the first listed
        for reference in (BEST, ZERO_REF):
            family = []
            for method in table.columns:
                x = table[method]
                if reference == BEST:
                    pair = pd.concat([x, table[best]], axis=1).dropna()
                    a, b = pair.iloc[:, 0].to_numpy(), pair.iloc[:, 1].to_numpy()
                    p = math.nan if method == best else paired_p(a, b, test)
                    ref_method, ref_mean = best, float(means[best])
                else:
                    if math.isnan(zs):
                        continue
                    a = x.dropna().to_numpy()
                    b = np.full(a.shape, zs)
                    p = paired_p(a, b, test)
                    ref_method, ref_mean = ZERO, zs
                family.append({"level": level, "level_label": _level_label(level), "value": value,
                               "reference": reference, "ref_method": ref_method, "method": method,
                               "seeds": int(len(a)), "mean": float(np.mean(a)) if len(a) else math.nan,
                               "ref_mean": ref_mean, "diff": float(np.mean(a - b)) if len(a) else math.nan,
                               "p": p})
            for row, adjusted in zip(family, holm([r["p"] for r in family])):
                row["p_holm"] = adjusted
                row["significant"] = bool(adjusted < alpha) if not math.isnan(adjusted) else False
            rows += family
    cols = ["level", "level_label", "value", "reference", "ref_method", "method", "seeds", "mean", "ref_mean", "diff",
            "p", "p_holm", "significant"]
    return pd.DataFrame(rows, columns=cols)


def power_note(seeds: int, alpha: float = ALPHA, power: float = 0.8) -> str:
    """What the paired t-test over `seeds` seeds can detect: the effect size (mean difference
    over the differences' standard deviation) found with `power` at `alpha`, two-sided, before
    the Holm correction (statsmodels `TTestPower`)."""
    if seeds < 2:
        return f"{seeds} seed: no paired test is possible; run more seeds (sample.seeds)."
    from statsmodels.stats.power import TTestPower

    from scipy import stats

    d = float(TTestPower().solve_power(effect_size=None, nobs=seeds, alpha=alpha, power=power,
                                       alternative="two-sided"))
    t = float(stats.t.ppf(1 - alpha / 2, seeds - 1))
    return (f"With {seeds} seeds the paired t-test rejects only where the mean difference exceeds "
            f"{t / math.sqrt(seeds):.2f}× the standard deviation of the differences over seeds "
            f"(t₀.₉₇₅,{seeds - 1} = {t:.2f}), and it finds a difference of {d:.1f} such standard deviations "
            f"with {power:.0%} power (less after Holm's correction): \"indistinguishable\" means not shown "
            f"to differ by these seeds, not equal. More seeds (sample.seeds) sharpen it.")


def summary_lines(tests: pd.DataFrame) -> list[str]:
    """One plain-language line per level: the best, the methods indistinguishable from it and
    those that beat zero-shot, for OOD (and ID where the table has it)."""
    lines = []
    for level in sorted(tests["level"].unique(), key=_level_order) if not tests.empty else []:
        at = tests[tests["level"] == level]
        parts = []
        if at["p"].isna().all():  # one seed (or none shared): nothing was tested
            seeds = int(at["seeds"].max()) if not at.empty else 0
            lines.append(f"**{at['level_label'].iloc[0]}** ({seeds} seed{'s' if seeds != 1 else ''}) — no paired "
                         "test: it needs 2 or more seeds per method (sample.seeds).")
            continue
        for value in ("ood", "id"):
            v = at[at["value"] == value]
            if v.empty:
                continue
            vs_best = v[v["reference"] == BEST]
            best = vs_best["ref_method"].iloc[0]
            same = vs_best[(vs_best["method"] != best) & ~vs_best["significant"]]["method"].tolist()
            worse = vs_best[vs_best["significant"]]["method"].tolist()
            text = (f"{NAMES[value]}: best {best} ({vs_best['ref_mean'].iloc[0]:.3f}); indistinguishable from it: "
                    f"{', '.join(same) or 'none'}; below it: {', '.join(worse) or 'none'}")
            vs_zero = v[v["reference"] == ZERO_REF]
            if not vs_zero.empty:
                beat = vs_zero[vs_zero["significant"] & (vs_zero["diff"] > 0)]["method"].tolist()
                below = vs_zero[vs_zero["significant"] & (vs_zero["diff"] < 0)]["method"].tolist()
                text += (f"; beat zero-shot ({vs_zero['ref_mean'].iloc[0]:.3f}): {', '.join(beat) or 'none'}"
                         + (f"; below zero-shot: {', '.join(below)}" if below else ""))
            parts.append(text)
        seeds = int(at["seeds"].max()) if not at.empty else 0
        lines.append(f"**{at['level_label'].iloc[0]}** ({seeds} seeds) — " + ". ".join(parts) + ".")
    return lines


# ---------------------------------------------------------------------------------------------
# across tasks: average ranks, Friedman, Nemenyi


@dataclass
class RankResult:
    """The rank analysis of one figure over tasks."""

    value: str
    table: pd.DataFrame  # tasks × methods (seed means), complete
    ranks: pd.Series  # method -> average rank (1 = best), best first
    friedman_stat: float
    friedman_p: float
    nemenyi: pd.DataFrame  # methods × methods p-values
    cd: float
    alpha: float = ALPHA
    left_out: dict[str, list[str]] = field(default_factory=dict)  # method -> tasks without it

    @property
    def n_tasks(self) -> int:
        return len(self.table)

    def indistinguishable_from_best(self) -> list[str]:
        best = self.ranks.index[0]
        return [m for m in self.ranks.index[1:] if self.nemenyi.loc[best, m] >= self.alpha]


def task_table(per_task: dict[str, pd.DataFrame], value: str, methods: list[str] | None = None,
               level: str | None = None, zero_shot: bool = True) -> pd.DataFrame:
    """Tasks × methods of seed means: for each experiment's `runs.csv` rows (`per_task`: name ->
    rows) and each of its levels (only `level` if given), a task `<name> @ <level label>`; the
    zero-shot model as the column `zero-shot` where `zero_shot`."""
    figure = FIGURES[value]
    rows = {}
    for name, runs in per_task.items():
        if figure not in runs:
            continue
        levels = sorted({str(lv) for lv in runs.loc[runs["seed"].notna(), "level"]}, key=_level_order)
        for lv in levels:
            if level is not None and lv != str(level):
                continue
            means = seed_table(runs, lv, figure, methods).mean()
            if zero_shot:
                zs = zero_shot_value(runs, figure)
                if not math.isnan(zs):
                    means[ZERO] = zs
            rows[f"{name} @ {_level_label(lv)}"] = means
    table = pd.DataFrame(rows).T
    order = [*(methods or []), *[c for c in table.columns if c not in (methods or [])]]
    return table[[c for c in order if c in table.columns]] if not table.empty else table


def rank_test(table: pd.DataFrame, value: str = "ood", alpha: float = ALPHA) -> RankResult:
    """Average ranks (1 = best: the highest figure), the Friedman test and the Nemenyi post-hoc
    over the tasks (rows) of `table`; a method missing from a task is left out (Friedman needs
    every method on every task) and listed in `left_out`. Needs 2 tasks and 3 methods."""
    import scikit_posthocs as sp
    from scipy import stats

    left_out = {m: table.index[table[m].isna()].tolist() for m in table.columns if table[m].isna().any()}
    full = table.drop(columns=list(left_out)).astype(float)
    n, k = full.shape
    if n < 2 or k < 3:
        raise ValueError(f"a rank test needs 2 or more tasks and 3 or more methods present in every task; "
                         f"have {n} task(s) and {k} method(s)" + (
                             f" (left out for missing tasks: {', '.join(left_out)})" if left_out else ""))
    ranks = full.rank(axis=1, ascending=False, method="average").mean().sort_values(kind="stable")
    stat, p = stats.friedmanchisquare(*[full[c].to_numpy() for c in full.columns])
    nemenyi = sp.posthoc_nemenyi_friedman(full.to_numpy())
    nemenyi.index, nemenyi.columns = list(full.columns), list(full.columns)
    q = float(stats.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    cd = q * math.sqrt(k * (k + 1) / (6.0 * n))
    return RankResult(value, full, ranks, float(stat), float(p), nemenyi, cd, alpha, left_out)


def cd_diagram(result: RankResult, path: Path, title: str | None = None) -> None:
    """The critical-difference diagram of `result` (scikit-posthocs), as PNG."""
    from matplotlib import rc_context

    from pipeline.report.plots import _save

    with rc_context({"savefig.dpi": 150}):
        _save(cd_figure(result, title), path)


def cd_figure(result: RankResult, title: str | None = None):
    """The critical-difference diagram of `result` (scikit-posthocs) as a matplotlib Figure."""
    import scikit_posthocs as sp
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    k = len(result.ranks)
    with rc_context({"font.size": 10}):
        fig = Figure(figsize=(8.0, 1.9 + 0.3 * k))
        ax = fig.subplots()
        # the labels sit outside the axes (left and right of the rank scale): room for them
        fig.subplots_adjust(left=0.2, right=0.8, top=1 - 0.75 / (1.9 + 0.3 * k), bottom=0.04)
        # the CD bar drawn here: scikit-posthocs puts it half a unit above the rank axis, over
        # the axis's tick labels
        sp.critical_difference_diagram(result.ranks, result.nemenyi, alpha=result.alpha, ax=ax,
                                       label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}")
        start, y = float(result.ranks.min()), 1.5
        ax.plot([start, start + result.cd], [y, y], color="k", linewidth=2)
        ax.text(start + result.cd / 2, y + 0.25, f"CD = {result.cd:.2g}", ha="center", va="bottom")
        ax.set_ylim(ax.get_ylim()[0], max(ax.get_ylim()[1], y + 0.5))
        fig.suptitle(title or (
            f"{NAMES[result.value]}: average rank over {result.n_tasks} tasks (1 = best), Friedman p = "
            f"{_p(result.friedman_p)}\nbars join methods the Nemenyi test cannot tell apart (α = {result.alpha})"),
            fontsize=9.5, x=0.02, ha="left")
    return fig


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def rank_markdown(result: RankResult) -> list[str]:
    """The average ranks, the tests and the post-hoc verdict against the best."""
    lines = [f"{NAMES[result.value]} over {result.n_tasks} tasks, {len(result.ranks)} methods: Friedman χ² = "
             f"{result.friedman_stat:.2f}, p = {_p(result.friedman_p)}; Nemenyi critical difference CD = "
             f"{result.cd:.2f} ranks (α = {result.alpha}).", "",
             "| method | average rank | Nemenyi p vs the first |", "|---|---|---|"]
    best = result.ranks.index[0]
    for m, r in result.ranks.items():
        lines.append(f"| {m} | {r:.2f} | {'–' if m == best else _p(result.nemenyi.loc[best, m])} |")
    same = result.indistinguishable_from_best()
    lines += ["", f"Ranked first: {best}; indistinguishable from it (Nemenyi): {', '.join(same) or 'none'}."]
    if result.friedman_p >= result.alpha:
        lines.append(f"The Friedman test does not reject equal ranks (p ≥ {result.alpha}): no difference between "
                     "these methods is shown over these tasks; read the post-hoc bars as descriptive.")
    if result.left_out:
        lines.append("Left out (missing from a task): " + "; ".join(
            f"{m} ({', '.join(t[:3])}{'…' if len(t) > 3 else ''})" for m, t in result.left_out.items()) + ".")
    return lines


def tests_markdown(tests: pd.DataFrame, test: str = "t") -> list[str]:
    """The paired tests as a table per figure: a row per level × method, the difference to the
    best and to zero-shot with their Holm-adjusted p."""
    out = []
    for value in ("ood", "id"):
        v = tests[tests["value"] == value]
        if v.empty:
            continue
        out += [f"{NAMES[value]} (difference in the official metric; Holm-adjusted p; * = p < {ALPHA}):", "",
                "| level | method | seeds | mean | − best | p | − zero-shot | p |", "|---|---|---|---|---|---|---|---|"]
        for level in sorted(v["level"].unique(), key=_level_order):
            at = v[v["level"] == level]
            vs_zero = at[at["reference"] == ZERO_REF].set_index("method")
            for _, r in at[at["reference"] == BEST].iterrows():
                z = vs_zero.loc[r["method"]] if r["method"] in vs_zero.index else None
                cells = [r["level_label"], r["method"], str(r["seeds"]), f"{r['mean']:.3f}",
                         "(best)" if r["method"] == r["ref_method"] else f"{r['diff']:+.3f}",
                         "" if r["method"] == r["ref_method"] else _p(r["p_holm"]) + ("*" if r["significant"] else ""),
                         "–" if z is None else f"{z['diff']:+.3f}",
                         "–" if z is None else _p(z["p_holm"]) + ("*" if z["significant"] else "")]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def within_markdown(tests: pd.DataFrame, test: str = "t") -> list[str]:
    """The within-experiment part: the test named, the power note, a line per level, the table."""
    if tests.empty:
        return ["No fine-tuned runs to compare."]
    seeds = int(tests["seeds"].max())
    lines = [f"Paired over seeds (a seed draws the same training sample for every method): each method against "
             f"the level's best and against zero-shot, {TEST_NAMES[test]}, p-values Holm-corrected over the "
             f"level's methods per reference (statsmodels), α = {ALPHA}. Figures: the official metric at the "
             "trial and WiSE-FT α the selection protocol chose on validation data.", "",
             power_note(seeds) if test == "t" else
             f"With {seeds} seeds the exact signed-rank p is at least {2 / 2 ** seeds:.3g}.", ""]
    lines += [f"- {line}" for line in summary_lines(tests)]
    return lines + [""] + tests_markdown(tests, test)


# ---------------------------------------------------------------------------------------------
# the report's section (one experiment) and `python -m pipeline compare` (many)

SECTION_TITLE = "## Which differences are real"


def report_section(runs: pd.DataFrame, methods: list[str], out_dir: Path) -> tuple[list[str], list[Path],
                                                                                     pd.DataFrame]:
    """The report's significance section for one experiment: the paired tests per level (and a
    rank diagram over its levels where there are 2 or more levels and 3 or more contenders);
    returns (Markdown lines, files written, the tests table)."""
    values = [v for v in ("ood", "id") if FIGURES[v] in runs]
    tests = pd.concat([paired_tests(runs, v, methods) for v in values], ignore_index=True)
    lines = [SECTION_TITLE, "", *within_markdown(tests)]
    files = []
    dataset = str(runs["dataset"].iloc[0]) if "dataset" in runs and len(runs) else "this dataset"
    for value in values:
        table = task_table({dataset: runs}, value, methods)
        try:
            result = rank_test(table, value)
        except ValueError as err:
            lines += [f"No {NAMES[value]} rank diagram over levels: {err}.", ""]
            continue
        path = out_dir / f"cd_{value}.png"
        cd_diagram(result, path)
        files.append(path)
        lines += [f"Ranks over the levels of {dataset} ([`{path.name}`]({path.name})); levels of one dataset are not "
                  "independent tasks, so these p-values are optimistic: `python -m pipeline compare` ranks over "
                  "datasets.", "", *rank_markdown(result), ""]
    return lines, files, tests


@dataclass
class Comparison:
    """`python -m pipeline compare`: the experiments read, the paired tests of each, the rank
    analyses over tasks."""

    tasks: dict[str, pd.DataFrame]  # task name -> its runs.csv rows
    tests: pd.DataFrame  # paired tests of every task (column `task`)
    ranks: dict[str, RankResult]  # value -> result
    notes: list[str]
    skipped: list[tuple[str, str]]
    test: str = "t"


def compare(exps, read, methods: list[str] | None = None, level: str | None = None, test: str = "t",
            zero_shot: bool = True) -> Comparison:
    """Read each experiment's `reports/runs.csv` (`read(experiment)` -> DataFrame or None; one
    experiment per task, the first listed), test within each and rank across them."""
    tasks: dict[str, pd.DataFrame] = {}
    skipped: list[tuple[str, str]] = []
    given: dict[str, str] = {}
    for e in exps:
        if e.task in given:
            skipped.append((e.name, f"task {e.task} already given by {given[e.task]}"))
            continue
        runs = read(e)
        if runs is None or runs.empty:
            skipped.append((e.name, "no reports/runs.csv at this revision (run `dvc repro` / `dvc exp run`)"))
            continue
        given[e.task] = e.name
        tasks[e.task] = runs
    parts = []
    for task, runs in tasks.items():
        for v in ("ood", "id"):
            if FIGURES[v] in runs:
                t = paired_tests(runs, v, methods, test)
                parts.append(t.assign(task=task))
    tests = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    ranks, notes = {}, []
    for v in ("ood", "id"):
        have = {t: r for t, r in tasks.items() if FIGURES[v] in r}
        if not have:
            continue
        table = task_table(have, v, methods, level, zero_shot)
        try:
            ranks[v] = rank_test(table, v)
        except ValueError as err:
            notes.append(f"No {NAMES[v]} rank test: {err}.")
    return Comparison(tasks, tests, ranks, notes, skipped, test)


def comparison_markdown(c: Comparison, tables: bool = True) -> str:
    """compare.md: the ranks over tasks, then per task its paired tests (`tables=False`: the
    plain-language line per level only, as the command prints it)."""
    lines = ["# Which method, at which level: the answer with significance", ""]
    lines += [f"Experiments, one per task: {', '.join(c.tasks) or 'none'}. Figures: the test figures of the trial and "
              "α the selection protocol chose on validation data. A rank task is one experiment at one level.", ""]
    lines += ["## Across tasks: average ranks, Friedman, Nemenyi", ""]
    for v, r in c.ranks.items():
        lines += [f"![{NAMES[v]}](cd_{v}.png)", "", *rank_markdown(r), ""]
    lines += [*c.notes, ""] if c.notes else []
    for task in c.tasks:
        t = c.tests[c.tests["task"] == task] if not c.tests.empty else c.tests
        body = within_markdown(t, c.test) if tables else [f"- {line}" for line in summary_lines(t)]
        lines += [f"## {task}: per level, paired over seeds", "", *body, ""]
    if c.skipped:
        lines += ["Skipped:", *[f"- {n}: {w}" for n, w in c.skipped], ""]
    return "\n".join(lines).rstrip() + "\n"


def write(c: Comparison, out_dir: Path) -> list[Path]:
    """`compare.md`, `paired.csv` (every paired test), `ranks_<value>.csv` (tasks × methods and
    the average rank), `nemenyi_<value>.csv` and `cd_<value>.png` per figure."""
    from pipeline.report.files import _write_csv, _write_text

    out_dir = Path(out_dir)
    written = []
    for v, r in c.ranks.items():
        cd_diagram(r, out_dir / f"cd_{v}.png")
        table = pd.concat([r.table, r.table.rank(axis=1, ascending=False).mean().to_frame("average rank").T])
        _write_csv(out_dir / f"ranks_{v}.csv", table.rename_axis("task").reset_index())
        _write_csv(out_dir / f"nemenyi_{v}.csv", r.nemenyi.rename_axis("method").reset_index())
        written += [out_dir / f"cd_{v}.png", out_dir / f"ranks_{v}.csv", out_dir / f"nemenyi_{v}.csv"]
    if not c.tests.empty:
        _write_csv(out_dir / "paired.csv", c.tests)
        written.append(out_dir / "paired.csv")
    _write_text(out_dir / "compare.md", comparison_markdown(c))
    return written + [out_dir / "compare.md"]


def read_runs_csv(experiment, repo: str | Path = ".") -> pd.DataFrame | None:
    """`reports/runs.csv` of an experiment: the file for the workspace, else the revision's
    copy through DVC (`reports/` is a cached output of the report stage); None where absent."""
    import io

    from pipeline.report.crosstask import WORKSPACE
    from pipeline.report.files import RUNS_CSV

    if experiment.rev == WORKSPACE:
        path = Path(repo) / RUNS_CSV
        text = path.read_text() if path.is_file() else None
    else:
        import dvc.api
        from dvc.exceptions import DvcException

        try:
            text = dvc.api.read(str(RUNS_CSV), repo=str(repo), rev=experiment.rev)
        except (DvcException, FileNotFoundError):
            text = None
    if not text:
        return None
    runs = pd.read_csv(io.StringIO(text), dtype={"level": str, "method": str})
    runs["seed"] = runs["seed"].astype("Int64")
    return runs



COMPARE_EXPERIMENT = "compare"  # the MLflow experiment of `python -m pipeline compare` runs


def log(c: Comparison, files: list[Path], level: str | None = None, test: str = "t") -> str:
    """One MLflow run (experiment `compare`, replacing the previous one) with the answer: the
    average ranks (`rank/<ood|id>/<method>`), the Friedman p and CD per figure, and every file
    written as an artifact. Returns its run id."""
    from pipeline.core import tracking
    from pipeline.report.families import mlflow_name

    metrics: dict[str, float] = {}
    for v, r in c.ranks.items():  # a soup row `ft+greedy_soup` is `ft.greedy_soup` (no '+' in MLflow names)
        metrics.update({f"rank/{v}/{mlflow_name(m)}": float(x) for m, x in r.ranks.items()})
        metrics.update({f"friedman_p/{v}": r.friedman_p, f"cd/{v}": r.cd, f"tasks/{v}": float(r.n_tasks)})
    params = {"tasks": ",".join(c.tasks), "level": level or "every level", "test": test,
              "correction": "holm", "post_hoc": "nemenyi", "alpha": ALPHA,
              "methods": ",".join(next(iter(c.ranks.values())).ranks.index) if c.ranks else "",
              "git_commit": tracking.git_commit()}
    md = [f for f in files if f.name == "compare.md"]
    return tracking.log_run(experiment=COMPARE_EXPERIMENT, key=COMPARE_EXPERIMENT, run_name="compare", params=params,
                            tags={tracking.RUN_KIND: "compare", "level": "compare"}, metrics=metrics,
                            artifacts=[*md, *[f for f in files if f not in md]])
