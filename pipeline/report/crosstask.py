"""The cross-task predictor of the IIMM study: does a score of the pre-trained model on a task,
measured with one forward pass before any training, predict the change fine-tuning brings?

IIMM (Inter-Intra Modal Measure; "Inter-Intra Modal Measure: a predictive lens on fine-tuning
outcomes in vision-language models", MIT LL) is "a strong predictor of performance changes
with fine-tuning": across tasks, the change is linear in the task's IIMM, and IIMM predicts it
better than transferability scores from model selection (H-Score, LogME, GBC, TransRate). This
module fits, over a family of tasks (DVC experiments that differ only in the task: e.g. the
synthetic generator's `prepare.synthetic.label`, or `dataset.name`), the least-squares line

    y = a + b·x,   b = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)²,   a = ȳ − b·x̄,
    R² = 1 − Σ(y − a − b·x)² / Σ(y − ȳ)²   (= r², Pearson's r squared, for one predictor)

for x = each pre-training score (`SCORES`: the embed stage's `iimm` and `transfer/...` keys,
as the report copies them into `metrics/report.json` as `zeroshot/<key>`; an absent score is
left out) and y = the change fine-tuning brings (`CHANGES`), and draws one panel per score.

The change (OPEN, our definition): for one method at one level, the seed mean of the official
metric (the dataset's `DatasetSpec.metric`) of the fine-tuned model (α = 1, no WiSE-FT) on the
last ID split minus that of the zero-shot model (k = 0): `<method>/<level>/id − zeroshot/id`
in `metrics/report.json`; the same on the last OOD split for `ood` (the paper's forgetting).

Which experiments (OPEN): every finished revision of `dvc exp show --json` (the workspace,
the baseline commits, their experiments) whose `metrics/report.json` can be read. The params
other than the task's (`dataset.name`, `prepare.<dataset>.label`) must be equal across the
points, or the fit would mix settings: the family with the most distinct tasks is kept (ties:
the first listed), one experiment per task (the first listed); everything else is listed as
skipped, with the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.report.leaderboard import _flat

SCORES = ("iimm", "transfer/h_score", "transfer/logme", "transfer/gbc", "transfer/transrate")
CHANGES = {"id": "ID", "ood": "OOD"}
WORKSPACE = "workspace"
_TASK_KEY = re.compile(r"^(dataset\.name|prepare\.[^.]+\.label)$")


@dataclass(frozen=True)
class Experiment:
    """One revision of `dvc exp show --json`: its name, git rev ("workspace" for the working
    tree) and params (flat dotted keys)."""

    name: str
    rev: str
    params: dict[str, Any]

    @property
    def task(self) -> str:
        """`<dataset>/<label>` where `prepare.<dataset>.label` is set, else the dataset's name."""
        dataset = str(self.params.get("dataset.name", "?"))
        label = self.params.get(f"prepare.{dataset}.label")
        return f"{dataset}/{label}" if label is not None else dataset

    @property
    def settings(self) -> str:
        """Every param but the task's, as a comparable key."""
        return json.dumps({k: v for k, v in self.params.items() if not _TASK_KEY.match(k)}, sort_keys=True,
                          default=str)


@dataclass(frozen=True)
class Point:
    """One task: the pre-trained model's scores (x) and the changes fine-tuning brought (y)."""

    task: str
    experiment: str
    scores: dict[str, float]
    changes: dict[str, float]


@dataclass(frozen=True)
class Fit:
    """y = intercept + slope·x over n tasks; r2 the coefficient of determination, p_value the
    two-sided test of slope = 0 (NaN below 3 tasks: a line through 2 points fits exactly)."""

    score: str
    change: str
    slope: float
    intercept: float
    r2: float
    p_value: float
    n: int


@dataclass
class Result:
    method: str
    level: str  # the level's key in metrics/report.json (`k16`, `25%`)
    points: list[Point]
    fits: list[Fit]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (experiment, why)

    @property
    def scores(self) -> list[str]:
        """The scores at least one point has, in `SCORES` order (then any other)."""
        have = {s for p in self.points for s in p.scores}
        return [s for s in SCORES if s in have] + sorted(have - set(SCORES))


# ---------------------------------------------------------------------------------------------
# inputs


def experiments(exp_show: list | dict) -> list[Experiment]:
    """Every finished revision in `dvc exp show --json`, in its order: each baseline (the
    workspace, commits) and then its experiments; queued, running and failed ones are left out."""
    rows = exp_show if isinstance(exp_show, list) else [exp_show]
    out: list[Experiment] = []

    def add(rec: dict) -> None:
        data = rec.get("data")
        if rec.get("error") or not isinstance(data, dict):
            return
        rev = str(rec.get("rev") or data.get("rev") or "?")
        params: dict[str, Any] = {}
        for content in (data.get("params") or {}).values():
            _flat("", (content or {}).get("data", {}), params)
        out.append(Experiment(str(rec.get("name") or (rev if rev == WORKSPACE else rev[:7])), rev, params))

    for row in rows:
        add(row)
        for exp in row.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") not in (None, "success"):
                continue
            for rec in exp.get("revs") or []:
                add(rec)
    return out


def level_key(level: str) -> str:
    """A `sample.levels` value as `metrics/report.json` writes it: `16` → `k16`, `25%` stays."""
    from pipeline.core.levels import parse_level
    from pipeline.report.inputs import level_key as report_key

    return report_key(parse_level(level, "--level"))


def largest_level(report: dict[str, float], method: str) -> str | None:
    """The level of `method` with the most training examples in a report (its key), if any."""
    sizes = {}
    for key, value in report.items():
        hit = re.fullmatch(rf"{re.escape(method)}/([^/]+)/n_train", key)
        if hit:
            sizes[hit.group(1)] = value
    return max(sizes, key=sizes.get) if sizes else None


def collect(exps: Iterable[Experiment], read: Callable[[Experiment], dict | None], method: str = "ft",
            level: str | None = None, scores: Iterable[str] = SCORES) -> Result:
    """The points of the comparable family of experiments (see the module docstring).

    `read(experiment)` returns its `metrics/report.json` (None when it has none); `level` is a
    key of that file (`k16`, `25%`), default the method's largest level in the first report."""
    exps = list(exps)
    skipped: list[tuple[str, str]] = []
    reports: dict[str, dict] = {}
    readable = []
    for e in exps:
        report = read(e)
        if report is None:
            skipped.append((e.name, "no metrics/report.json at this revision"))
            continue
        reports[e.rev] = report
        readable.append(e)
    families: dict[str, list[Experiment]] = {}
    for e in readable:
        families.setdefault(e.settings, []).append(e)
    best = max(families.values(), key=lambda fam: len({e.task for e in fam}), default=[])
    in_best = {id(e) for e in best}
    chosen: dict[str, Experiment] = {}
    for e in readable:
        if id(e) not in in_best:
            skipped.append((e.name, f"other settings than the {len({f.task for f in best})}-task family "
                                    f"(params besides the task differ)"))
        elif e.task in chosen:
            skipped.append((e.name, f"task {e.task} already given by {chosen[e.task].name}"))
        else:
            chosen[e.task] = e
    if level is None and chosen:
        level = largest_level(reports[next(iter(chosen.values())).rev], method)
    points = []
    for task, e in chosen.items():
        report = reports[e.rev]
        fine = {c: report.get(f"{method}/{level}/{c}") for c in CHANGES}
        zero = {c: report.get(f"zeroshot/{c}") for c in CHANGES}
        changes = {c: float(fine[c]) - float(zero[c]) for c in CHANGES
                   if fine[c] is not None and zero[c] is not None}
        if not changes:
            skipped.append((e.name, f"its report has no {method} at {level}" if level else
                                    f"its report has no {method} results"))
            continue
        have = {s: float(report[f"zeroshot/{s}"]) for s in scores
                if isinstance(report.get(f"zeroshot/{s}"), (int, float)) and math.isfinite(report[f"zeroshot/{s}"])}
        points.append(Point(task, e.name, have, changes))
    result = Result(method, level or "?", points, [], skipped)
    result.fits = [least_squares_fit(result.points, s, c) for s in result.scores for c in CHANGES]
    return result


# ---------------------------------------------------------------------------------------------
# the fit


def least_squares(x: Iterable[float], y: Iterable[float]) -> tuple[float, float, float, float]:
    """(slope, intercept, R², p) of y = intercept + slope·x by ordinary least squares
    (scipy.stats.linregress; R² = r²). NaN where undefined: fewer than 2 points, or all x equal
    (no slope); R² also where all y are equal; p below 3 points."""
    from scipy import stats

    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan, math.nan, math.nan
    if np.ptp(y) == 0:  # a flat line through every point; R² has no meaning (0/0)
        return 0.0, float(y[0]), math.nan, math.nan
    fit = stats.linregress(x, y)
    p = float(fit.pvalue) if len(x) >= 3 else math.nan
    return float(fit.slope), float(fit.intercept), float(fit.rvalue) ** 2, p


def least_squares_fit(points: Iterable[Point], score: str, change: str) -> Fit:
    """The fit of one change on one score over the points that have both."""
    pairs = [(p.scores[score], p.changes[change]) for p in points if score in p.scores and change in p.changes]
    slope, intercept, r2, p = least_squares([a for a, _ in pairs], [b for _, b in pairs])
    return Fit(score, change, slope, intercept, r2, p, len(pairs))


# ---------------------------------------------------------------------------------------------
# outputs


def read_report(experiment: Experiment, repo: str | Path = ".") -> dict | None:
    """`metrics/report.json` of an experiment: the file itself for the workspace, else the
    revision's copy through DVC (`dvc.api.read`: the output dvc.lock records at that rev, from
    the cache); None where there is none."""
    from pipeline import artifacts as paths

    if experiment.rev == WORKSPACE:
        path = Path(repo) / paths.REPORT_METRICS
        return json.loads(path.read_text()) if path.is_file() else None
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return json.loads(dvc.api.read(str(paths.REPORT_METRICS), repo=str(repo), rev=experiment.rev))
    except (DvcException, FileNotFoundError, json.JSONDecodeError):
        return None


def _num(v: float | None, digits: int = 4) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.{digits}g}"


def _strict(value: Any) -> Any:
    """NaN as null (strict JSON) in nested data."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def markdown(result: Result) -> str:
    """The fits (a row per score and change), the points, and what was skipped."""
    lines = [f"# Across tasks: the change `{result.method}` brings at `{result.level}` against pre-training scores",
             "",
             f"Change = fine-tuned ({result.method}, α = 1) − zero-shot, seed means of the official metric on the last "
             "ID / OOD split; one point per task; least squares y = a + b·x.", "",
             "| score | change | slope b | intercept a | R² | p | n |", "|---|---|---|---|---|---|---|"]
    for f in result.fits:
        lines.append(f"| {f.score} | Δ {CHANGES[f.change]} | {_num(f.slope)} | {_num(f.intercept)} | {_num(f.r2)} | "
                     f"{_num(f.p_value)} | {f.n} |")
    lines += ["", "| task | experiment | " + " | ".join(result.scores) + " | Δ ID | Δ OOD |",
              "|---|---|" + "---|" * (len(result.scores) + 2)]
    for p in result.points:
        cells = [_num(p.scores.get(s, math.nan)) for s in result.scores]
        cells += [_num(p.changes.get(c, math.nan)) for c in CHANGES]
        lines.append(f"| {p.task} | {p.experiment} | " + " | ".join(cells) + " |")
    absent = [s for s in SCORES if s not in result.scores]
    if absent:
        lines += ["", f"Not in any report: {', '.join(absent)}."]
    if result.skipped:
        lines += ["", "Skipped:", *[f"- {name}: {why}" for name, why in result.skipped]]
    return "\n".join(lines) + "\n"


def plot(result: Result, path: Path) -> None:
    """A panel per score (columns) and change (rows: ID, OOD): one point per task, labelled,
    the least-squares line, R² and n in the panel's title."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    from pipeline.report.plots import _RC, _save

    scores = result.scores
    changes = [c for c in CHANGES if any(c in p.changes for p in result.points)]
    with rc_context(_RC):
        fig = Figure(figsize=(3.9 * max(len(scores), 1), 3.5 * max(len(changes), 1) + 0.5), layout="constrained")
        axes = fig.subplots(max(len(changes), 1), max(len(scores), 1), squeeze=False)
        fits = {(f.score, f.change): f for f in result.fits}
        for i, change in enumerate(changes):
            for j, score in enumerate(scores):
                ax = axes[i][j]
                have = [p for p in result.points if score in p.scores and change in p.changes]
                xs = np.array([p.scores[score] for p in have])
                ys = np.array([p.changes[change] for p in have])
                ax.scatter(xs, ys, s=46, color="#1f77b4", edgecolors="white", linewidths=0.7, zorder=3)
                for p, x, y in zip(have, xs, ys):
                    ax.annotate(p.task.split("/")[-1], (x, y), textcoords="offset points", xytext=(5, 4),
                                fontsize=8.5, color="#333333")
                f = fits[(score, change)]
                if not math.isnan(f.slope):
                    line = np.linspace(xs.min(), xs.max(), 2)
                    sign = "+" if f.slope >= 0 else "−"
                    ax.plot(line, f.intercept + f.slope * line, color="#d62728", linestyle="--", linewidth=1.2,
                            zorder=2, label=f"y = {_num(f.intercept, 3)} {sign} {_num(abs(f.slope), 3)}·x")
                    ax.legend(loc="best", fontsize=8.5, frameon=False)
                ax.axhline(0.0, color="#222222", linewidth=0.8, linestyle=":", zorder=1)
                ax.set_title(f"{score}: R² = {_num(f.r2, 2)} (n = {f.n})", loc="left", fontsize=10)
                ax.set_xlabel(f"{score} of the pre-trained model")
                if j == 0:
                    ax.set_ylabel(f"Δ {CHANGES[change]} ({result.method} − zero-shot)")
        fig.suptitle(f"Does a pre-training score predict the change fine-tuning brings? {result.method} at "
                     f"{result.level}, one point per task", fontsize=11, fontweight="bold", x=0.01, ha="left")
    _save(fig, path)


def write(result: Result, out_dir: Path) -> list[Path]:
    """`crosstask.png` (where a score and two tasks exist), `crosstask.md`, `crosstask.json`."""
    from pipeline.report.files import _write_text

    out_dir = Path(out_dir)
    written = []
    if result.scores and len(result.points) >= 2:
        plot(result, out_dir / "crosstask.png")
        written.append(out_dir / "crosstask.png")
    data = {"method": result.method, "level": result.level,
            "change": "fine-tuned (alpha = 1) minus zero-shot, seed means of the official metric on the last ID "
                      "(id) / OOD (ood) split",
            "fits": [asdict(f) for f in result.fits], "points": [asdict(p) for p in result.points],
            "skipped": [{"experiment": n, "why": w} for n, w in result.skipped]}
    _write_text(out_dir / "crosstask.json", json.dumps(_strict(data), indent=1, allow_nan=False) + "\n")
    _write_text(out_dir / "crosstask.md", markdown(result))
    return written + [out_dir / "crosstask.json", out_dir / "crosstask.md"]
