"""The `report` stage: every configured run -> tables, plots, DVC metrics and a summary MLflow run.

Reads the zero-shot level from `data/embed/metrics.json`, every method × level × seed of
params.yaml from `runs/evaluate/<method>/<level>/seed<S>/` (the trial chosen by the protocol)
and the selection records `runs/select/<method>/<level>.json`; a configured run whose file is
missing is an error (naming the file and the `dvc repro` target that makes it), never silently
skipped. Writes under `reports/`:

- `runs.csv` — one row per run (zero-shot: method `zeroshot`, level 0, blank seed);
- `summary.csv`, `summary.md` — mean, std and 95 % CI over seeds per method × level;
- `selection.csv` — per method × level, the trials chosen per seed and any edge of the search;
- `search.csv`, `search_<method>.png` — the search (`pipeline.report.search`): every trial's
  validation score per seed against its searched hyper-parameters, and the sensitivity plots;
- PNG plots (see `PLOTS`; `dvc plots show` draws them, offline), `metrics/levels.csv` (long
  format against the training examples), `metrics/report.json` (every flat mean) and
  `metrics/methods/<method>.json` (a row per method for `dvc metrics show`: ID and OOD per level);
- the summary MLflow run: the flat means, and each method's curve (`curve/<method>/<value>`)
  with the training-set size as the step;
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
import shutil
from pathlib import Path

import pandas as pd

from pipeline import artifacts as paths
from pipeline.core import tracking
from pipeline.data.datasets import get_spec
from pipeline.evaluation.measures import MEASURES
from pipeline.methods import METHODS
from pipeline.evaluation.soups import base_method
from pipeline.report.compare import report_section
from pipeline.report.families import headline_metrics, log_tables, ordered, plot_vs_shots_by_family, report_tables
from pipeline.report.files import (METHOD_METRICS, METRICS_JSON, OUTPUTS, PLOTS, RETENTION_CSV, TRIALS_CSV, RUNS_CSV, SELECTION_CSV, SHOTS_CSV,
                                   SIGNIFICANCE_CSV, SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD, _write_csv, _write_text)
from pipeline.report.inputs import (COLUMNS, KEYS, REPORT_KEY, VALUES, ZEROSHOT, columns, values, Headline, MissingInputsError,
                                    ReportConfig, RunInput, _ZS_TASK, load_inputs, other_datasets, read_runs,
                                    read_selection, runs_frame, task_points, wise_curves)
from pipeline.report.plots import plot_id_vs_ood, plot_iimm, plot_panels, plot_vs_shots
from pipeline.report.search import SEARCH_CSV, old_plots, search_report, write_long
from pipeline.report.retention import (plot_retention, retention_flat, retention_long, retention_markdown,
                                       retention_summary, task_infos, trial_tradeoff)
from pipeline.report.tables import (_md_table, flat_metrics, level_curves, method_headlines, selection_table, shots_long,
                                    summarize, summary_markdown)

__all__ = ["run", "ReportConfig", "read_runs", "load_inputs", "runs_frame", "summarize", "flat_metrics",
           "shots_long", "wise_curves", "summary_markdown", "MissingInputsError", "Headline", "RunInput",
           "KEYS", "VALUES", "COLUMNS", "values", "columns", "ZEROSHOT", "REPORT_KEY", "PLOTS", "OUTPUTS"]


def run(cfg: ReportConfig) -> dict[str, float]:
    """Write every report file, log the summary MLflow run; returns the flat metrics."""
    spec = get_spec(cfg.dataset)
    head = Headline.of(spec)
    inputs = load_inputs(cfg)  # before touching reports/: missing inputs change nothing
    records = read_selection(cfg)
    from pipeline.data.retention import no_task_hint, read_records

    task_records = read_records(paths.PREPARED_RETENTION)

    SUMMARY_JSON.unlink(missing_ok=True)  # from here on the report is unfinished
    for p in (*OUTPUTS, SEARCH_CSV, *old_plots()):
        p.unlink(missing_ok=True)
    paths.REPORTS.mkdir(parents=True, exist_ok=True)

    # every row (the methods and their soups), family by family (`families`)
    methods = ordered(cfg.rows)
    # methods without a text tower (vision-only baselines): no zero-shot level, and the
    # measures that need a text tower (retention, RSA) do not apply
    text_free = [m for m in methods if METHODS[base_method(m)].backbone != "clip"]
    # runs.csv in the same order: the zero-shot level, then row by row
    rank = {m: i for i, m in enumerate(methods)}
    inputs = sorted(inputs, key=lambda r: (r.seed is not None, rank.get(r.method, len(rank))))
    runs = runs_frame(inputs, spec.name, head)
    summary = summarize(runs, methods, list(cfg.levels))
    selection = selection_table(records)
    embed = inputs[0].metrics
    flat = flat_metrics(summary, embed)
    wise = wise_curves(inputs, head)
    infos = task_infos(task_records, embed)
    n_train = {(r.method, r.level.name, r.seed): r.metrics.get("train/n_train", float("nan")) for r in inputs}
    retention = retention_summary(retention_long(inputs, infos, n_train), methods, list(cfg.levels))
    flat.update(retention_flat(retention))
    tasks = [t.name for t in infos]
    notes: list[str] = []

    _write_csv(RUNS_CSV, runs)
    _write_csv(SUMMARY_CSV, summary)
    _write_csv(SELECTION_CSV, selection)
    _write_csv(RETENTION_CSV, retention)
    _write_csv(SHOTS_CSV, shots_long(summary))
    search_md, search_plots, search_df = search_report(
        records, lambda name: next((lv.label for lv in cfg.levels if lv.name == name), name), _md_table)
    write_long(search_df)

    plots: list[Path] = []
    if head.id:
        plot_vs_shots_by_family(summary, "id", f"ID: {head.id}",
                                f"In-distribution ({head.id}) vs training data", PLOTS["id_vs_shots"])
        plots.append(PLOTS["id_vs_shots"])
    else:
        notes.append(f"{spec.name} has no ID split: no ID columns, no `id_vs_shots.png`, "
                     "no `id_vs_ood.png`.")
    plot_vs_shots_by_family(summary, "ood", f"OOD: {head.ood}",
                            f"Out-of-distribution ({head.ood}) vs training data", PLOTS["ood_vs_shots"])
    plots.append(PLOTS["ood_vs_shots"])
    if head.id:
        plot_id_vs_ood(summary, wise, head, PLOTS["id_vs_ood"], next(iter(selection["protocol"]), ""),
                       no_zero=text_free)
        plots.append(PLOTS["id_vs_ood"])
    retention_plot = None
    if infos and not retention.empty:
        retention_plot = PLOTS["retention"]
        plot_retention(retention, infos, retention_plot)
        plots.append(retention_plot)
    for measure in MEASURES.values():  # every registered measure's own figure
        if measure.plot is None:
            continue
        cols = [c.name for c in measure.columns if f"{c.name}_mean" in summary]
        path = paths.REPORTS / measure.plot.file
        fine = summary[~((summary["method"] == ZEROSHOT) & (summary["level"] == "0"))]
        if cols and fine[[f"{c}_mean" for c in cols]].notna().any().any():
            plot_panels(summary, cols, measure.plot, path)
            plots.append(path)
        else:
            notes.append(f"No {measure.name} values in the metrics: no `{measure.plot.file}`.")

    others, store_note = other_datasets(cfg)
    if store_note:
        notes.append(store_note)
    points = task_points(spec.name, flat, exclude=text_free) + others
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

    tradeoff = trial_tradeoff(records, infos, list(cfg.levels))
    _write_csv(TRIALS_CSV, tradeoff)
    section = retention_markdown(retention, infos, no_task_hint(spec.name), retention_plot, _md_table, tradeoff,
                                 next(iter(selection["split"]), "") or "")
    # which differences are real: paired tests per level, ranks over the levels (diagrams)
    significance, rank_plots, tests = report_section(runs, methods, paths.REPORTS)
    _write_csv(SIGNIFICANCE_CSV, tests)
    md = summary_markdown(cfg, summary, head, embed, [p for p in plots if p != retention_plot], notes, tasks,
                          selection, section, text_free=text_free, significance=significance, search=search_md)
    _write_text(METRICS_JSON, json.dumps(flat, indent=1, sort_keys=True) + "\n")
    if METHOD_METRICS.exists():
        shutil.rmtree(METHOD_METRICS)  # no row of a method no longer compared
    for method, table in method_headlines(summary, methods, ZEROSHOT).items():
        _write_text(METHOD_METRICS / f"{method}.json", json.dumps(table, indent=1) + "\n")
    _write_text(SUMMARY_MD, md)

    run_params = {
        "dataset": spec.name, "arch": cfg.arch, "pretrained": cfg.pretrained,
        "methods": ",".join(cfg.methods), "rows": ",".join(methods), "levels": ",".join(lv.name for lv in cfg.levels),
        "seeds": ",".join(map(str, cfg.seeds)), "metric": head.metric,
        "id_key": head.id or "", "ood_key": head.ood, "selection": cfg.selection,
        "select_split": next(iter(selection["split"]), "") or "none",
        "trials": sum(len(t) for t in cfg.trials.values()),
        "git_commit": tracking.git_commit(),
    }
    # a few headline numbers per row as metrics (`families.headline_metrics`), every table and
    # every flat mean as artifacts (the CSVs, metrics/report.json, MLflow tables)
    headline, curves = headline_metrics(flat, level_curves(summary, methods, ZEROSHOT, no_zero=text_free), methods)
    run_id = tracking.log_run(
        experiment=spec.name, key=REPORT_KEY, run_name=REPORT_KEY, params=run_params,
        tags={"run_kind": "report", "level": "report", "dataset": spec.name},
        metrics=headline, curves=curves,
        artifacts=[SUMMARY_MD, SIGNIFICANCE_CSV, *rank_plots, SUMMARY_CSV, SELECTION_CSV, RETENTION_CSV, TRIALS_CSV,
                   RUNS_CSV, METRICS_JSON, SEARCH_CSV, *plots, *search_plots])
    log_tables(run_id, report_tables(summary, flat))

    _write_text(SUMMARY_JSON, json.dumps({
        "dataset": spec.name, "runs": len(runs), "headline": {"metric": head.metric, "id": head.id,
                                                             "ood": head.ood},
        "files": [str(p) for p in (RUNS_CSV, SUMMARY_CSV, SELECTION_CSV, RETENTION_CSV, TRIALS_CSV, SIGNIFICANCE_CSV,
                                   SUMMARY_MD, METRICS_JSON, SHOTS_CSV, SEARCH_CSV, *plots, *rank_plots,
                                   *search_plots)],
        "notes": notes, "mlflow_run_id": run_id,
    }, indent=1) + "\n")
    return flat
