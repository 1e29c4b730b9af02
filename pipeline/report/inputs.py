"""The report's inputs: every configured run's metrics, as rows and WiSE-FT curves."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from pipeline import artifacts as paths
from pipeline.core import tracking
from pipeline.core.levels import ZERO_SHOT, Level
from pipeline.data.datasets import DatasetSpec, get_spec
from pipeline.evaluation.measures import report_columns
from pipeline.evaluation.soups import row_name


@dataclass(frozen=True)
class ReportConfig:
    """What the report covers: the dataset, the model, every method × level × seed, and the
    selection protocol that chose each method's trial."""

    dataset: str
    arch: str
    pretrained: str
    methods: tuple[str, ...]
    levels: tuple[Level, ...]
    seeds: tuple[int, ...]
    selection: str = "auto"
    trials: dict[str, tuple[str, ...]] = field(default_factory=dict)  # method -> its trials
    # method -> the soups of its trials it has (`evaluate.soups`, `pipeline.evaluation.soups`)
    soups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, params) -> "ReportConfig":
        """From a loaded params.yaml (`pipeline.config.Params`)."""
        from pipeline.evaluation.soups import soup_kinds
        from pipeline.methods import METHODS

        ft = params.finetune
        soups = {m: tuple(soup_kinds(METHODS[m].soups, len(ft.trials_of(m)), params.evaluate.soups))
                 for m in ft.methods}
        return cls(params.dataset.name, params.model.arch, params.model.pretrained, tuple(ft.methods),
                   params.sample.parsed_levels, tuple(params.sample.seeds), params.evaluate.selection,
                   {m: tuple(ft.trials_of(m)) for m in ft.methods}, {m: k for m, k in soups.items() if k})

    @property
    def rows(self) -> tuple[str, ...]:
        """Every row of the report but zero-shot: each method, followed by its soups."""
        from pipeline.evaluation.soups import row_name

        return tuple(r for m in self.methods for r in (m, *(row_name(m, k) for k in self.soups.get(m, ()))))


EVAL_METRICS = paths.EVAL_METRICS
ZEROSHOT = "zeroshot"
REPORT_KEY = "report"  # the MLflow run key (and run name) of the summary run

# runs.csv / read_runs columns; `values()` are the per-run numbers aggregated over seeds:
# the headline, then every registered measure's report columns (read at call time, so a
# measure registered after this import shows too), then selection and cost
KEYS = ("dataset", "method", "level", "level_kind", "seed")
ID_COLUMNS = ("id", "selected_id")  # dropped for datasets without an ID split


def values() -> tuple[str, ...]:
    return ("id", "ood", *(c.name for c in report_columns()), "selected_alpha", "selected_id",
            "selected_ood", "selection_score", "n_train", "train_steps", "trainable_share", "wall_time_s")


def columns() -> tuple[str, ...]:
    return KEYS + ("trial",) + values()


def shots_metrics() -> tuple[str, ...]:
    """The columns `dvc plots` draws against the level."""
    return ("id", "ood", *(c.name for c in report_columns()), "selected_id", "selected_ood")


VALUES = values()  # as registered at import (the built-in measures)
COLUMNS = columns()

_ZS_TASK = re.compile(r"^zs/(.+)/acc$")
_WISE = re.compile(r"^wise/([^/]+)/(.+)$")
_FLAT = re.compile(r"^(?P<method>[^/]+)/(?P<level>[^/]+)/(?P<col>[a-z_]+)$")


def level_key(level: Level) -> str:
    """A level in flat metric keys (`ft/k16/id`, `ft/25%/id`)."""
    return f"k{level.shots}" if level.kind == "shots" else level.name


# ---------------------------------------------------------------------------------------------
# inputs


class MissingInputsError(FileNotFoundError):
    """Configured runs whose metrics.json is absent; the message lists them and their targets."""

    def __init__(self, missing: list[tuple[Path, str]]):
        self.missing = [p for p, _ in missing]
        lines = "\n".join(f"  - {p}  (made by `dvc repro {target}`)" for p, target in missing)
        super().__init__(
            f"report: {len(missing)} input file(s) missing. The report covers every run that "
            f"params.yaml configures (finetune.methods × sample.levels × sample.seeds) and skips "
            f"none:\n{lines}\nRun `dvc repro` (or the targets above) first, or remove those runs "
            f"from params.yaml."
        )


@dataclass(frozen=True)
class Headline:
    """The dataset's headline keys: `<split>/<metric>` for ID (None without ID split) and OOD."""

    metric: str
    id: str | None
    ood: str

    @classmethod
    def of(cls, spec: DatasetSpec) -> "Headline":
        return cls(metric=spec.metric,
                   id=f"{spec.id_splits[-1]}/{spec.metric}" if spec.id_splits else None,
                   ood=f"{spec.ood_splits[-1]}/{spec.metric}")


@dataclass
class RunInput:
    method: str
    level: Level
    seed: int | None  # None: the zero-shot level
    metrics: dict[str, float]
    source: Path
    selection: dict = field(default_factory=dict)  # evaluate's selection.json (trial, protocol, ...)


def stage_target(method: str, level: str) -> str:
    """The dvc.yaml matrix entry that writes this run's metrics (`evaluate@ft`: one entry per
    method covers every level)."""
    return f"evaluate@{method}"


def expected_inputs(cfg: ReportConfig) -> list[tuple[str, Level, int | None, Path, str]]:
    """(method, level, seed, metrics file, dvc target) for the zero-shot level and every run."""
    out: list[tuple[str, Level, int | None, Path, str]] = [
        (ZEROSHOT, ZERO_SHOT, None, paths.EMBED_METRICS, "embed")]
    for method in cfg.methods:
        for level in cfg.levels:
            for seed in cfg.seeds:
                out.append((method, level, seed, paths.evaluate_dir(method, level.name, seed) / EVAL_METRICS,
                            stage_target(method, level.name)))
        for kind in cfg.soups.get(method, ()):  # its soups' rows, written by its evaluate entry
            for level in cfg.levels:
                for seed in cfg.seeds:
                    out.append((row_name(method, kind), level, seed,
                                paths.soup_dir(method, kind, level.name, seed) / EVAL_METRICS,
                                stage_target(method, level.name)))
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-run the stage that writes it") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


def load_inputs(cfg: ReportConfig) -> list[RunInput]:
    """Every input the report needs, or MissingInputsError listing all absent files."""
    expected = expected_inputs(cfg)
    missing = [(p, target) for _, _, _, p, target in expected if not p.is_file()]
    if missing:
        raise MissingInputsError(missing)
    runs = []
    for method, level, seed, path, _ in expected:
        metrics = {key: float(v) for key, v in _read_json(path).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        sel_path = path.with_name(paths.EVAL_SELECTION)
        selection = _read_json(sel_path) if seed is not None and sel_path.is_file() else {}
        runs.append(RunInput(method, level, seed, metrics, path, selection))
    return runs


def _row(dataset: str, run: RunInput, head: Headline) -> dict[str, Any]:
    m = run.metrics
    zero = run.seed is None  # the zero-shot level (the zeroshot *method* at k > 0 is a plain run)

    def need(key: str) -> float:
        if key not in m:
            raise ValueError(
                f"{run.source}: no {key!r} (the headline metric of this dataset); the file was "
                f"written for another dataset or by an older pipeline: re-run its stage")
        return m[key]

    ood = need(head.ood)
    idv = need(head.id) if head.id else math.nan
    return {
        "dataset": dataset, "method": run.method, "level": run.level.name, "level_kind": run.level.kind,
        "seed": run.seed, "trial": run.selection.get("trial", ""),
        "id": idv, "ood": ood,
        **{c.name: c.read(m, zero) for c in report_columns()},
        "selected_alpha": math.nan if zero else m.get("selected/alpha", math.nan),
        "selected_id": idv if zero else (m.get(f"selected/{head.id}", math.nan) if head.id else math.nan),
        "selected_ood": ood if zero else m.get(f"selected/{head.ood}", math.nan),
        "selection_score": math.nan if zero else m.get("selection/score", math.nan),
        "n_train": 0.0 if zero else m.get("train/n_train", math.nan),
        "train_steps": 0.0 if zero else m.get("train/steps", math.nan),
        "trainable_share": 0.0 if zero else m.get("train/trainable_share", math.nan),
        "wall_time_s": 0.0 if zero else m.get("train/wall_time_s", math.nan),
    }


def runs_frame(runs: list[RunInput], dataset: str, head: Headline) -> pd.DataFrame:
    df = pd.DataFrame([_row(dataset, r, head) for r in runs], columns=list(columns()))
    df["seed"] = df["seed"].astype("Int64")
    if head.id is None:
        df = df.drop(columns=list(ID_COLUMNS))
    return df


def read_runs(cfg: ReportConfig) -> pd.DataFrame:
    """One row per run (zero-shot first, as method `zeroshot`, level 0, seed <NA>), columns
    `COLUMNS` (without `id`/`selected_id` for datasets that have no ID split)."""
    spec = get_spec(cfg.dataset)
    return runs_frame(load_inputs(cfg), spec.name, Headline.of(spec))


def wise_curves(runs: list[RunInput], head: Headline) -> pd.DataFrame:
    """WiSE-FT sweeps: method, level, alpha, id, ood (means over seeds; id NaN without ID), n."""
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
                rows.append({"method": r.method, "level": r.level.name, "seed": r.seed, "alpha": alpha,
                             "id": p.get("id", math.nan), "ood": p["ood"]})
    if not rows:
        return pd.DataFrame(columns=["method", "level", "alpha", "id", "ood", "n"])
    df = pd.DataFrame(rows)
    agg = df.groupby(["method", "level", "alpha"], sort=False).agg(
        id=("id", "mean"), ood=("ood", "mean"), n=("ood", "size")).reset_index()
    return agg.sort_values(["method", "level", "alpha"], kind="stable").reset_index(drop=True)


def read_selection(cfg: ReportConfig) -> list[dict]:
    """The selection records of every method × level (`runs/select/<method>/<level>.json`)."""
    out = []
    for method in cfg.methods:
        for level in cfg.levels:
            path = paths.select_file(method, level.name)
            if not path.is_file():
                raise MissingInputsError([(path, "selection")])
            out.append(_read_json(path))
    return out


def task_points(dataset: str, flat: dict[str, float], exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Per method, the change after fine-tuning at its largest level (most training examples,
    mean over seeds) against the pre-trained model's IIMM on this task: dataset, method,
    level, n_train, iimm, d_id, d_ood, d_zs. `exclude`: methods that do not start from the
    CLIP (vision-only baselines: the change from the CLIP's zero-shot is not theirs)."""
    if "zeroshot/iimm" not in flat:
        return []
    best: dict[str, tuple[float, str]] = {}
    for key, v in flat.items():
        hit = _FLAT.match(key)
        if hit and hit.group("col") == "n_train" and hit.group("method") not in (ZEROSHOT, *exclude):
            m, lv = hit.group("method"), hit.group("level")
            if m not in best or v > best[m][0]:
                best[m] = (v, lv)
    points = []
    for method, (n, lv) in sorted(best.items()):
        p: dict[str, Any] = {"dataset": dataset, "method": method, "level": lv, "n_train": n,
                             "iimm": flat["zeroshot/iimm"]}
        for c in ("id", "ood", "zs"):
            a, b = flat.get(f"{method}/{lv}/{c}"), flat.get(f"{ZEROSHOT}/{c}")
            p[f"d_{c}"] = a - b if a is not None and b is not None else math.nan
        points.append(p)
    return points


def other_datasets(cfg: ReportConfig) -> tuple[list[dict[str, Any]], str | None]:
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
        if (not ds or ds == cfg.dataset or ds in latest
                or p.get("arch") != cfg.arch or p.get("pretrained") != cfg.pretrained):
            continue
        latest[ds] = run
    points = []
    for ds, run in sorted(latest.items()):
        points += task_points(ds, report_flat(client, run))
    return points, None


def report_flat(client, run) -> dict[str, float]:
    """Every flat mean of a report run: its `report.json` artifact (metrics/report.json; the
    run's metrics are only the headline ones), or, for a run logged before there was one, its
    metrics."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.info.run_id, paths.REPORT_METRICS.name, tmp)
            return {k: float(v) for k, v in json.loads(Path(path).read_text()).items()}
    except Exception:  # noqa: BLE001 — no such artifact: an older report run
        return dict(run.data.metrics)


