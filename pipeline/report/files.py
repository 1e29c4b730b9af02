"""Where the report writes (everything under reports/, DVC metrics and plots), atomically."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipeline import artifacts as paths
from pipeline.evaluation.measures import MEASURES

# ---------------------------------------------------------------------------------------------
# where the report writes (everything under paths.REPORTS)

RUNS_CSV = paths.REPORTS / "runs.csv"
SUMMARY_CSV = paths.REPORTS / "summary.csv"
SELECTION_CSV = paths.REPORTS / "selection.csv"
RETENTION_CSV = paths.REPORTS / "retention.csv"
TRIALS_CSV = paths.REPORTS / "trials.csv"  # every trial: chosen by how many seeds, val score, retention change
SUMMARY_MD = paths.REPORTS / "summary.md"
SIGNIFICANCE_CSV = paths.REPORTS / "significance.csv"  # the paired tests per level (pipeline.report.compare)
METRICS_JSON = paths.REPORT_METRICS  # `dvc metrics show` (outside reports/: DVC outs may not nest)
SUMMARY_JSON = paths.REPORTS / "summary.json"  # written last: the report is complete
SHOTS_CSV = paths.REPORT_PLOT_DATA  # method, level, n_train, metric, value, ci (long format, for your own plots)
METHOD_METRICS = paths.REPORT_METHODS  # `dvc metrics show`: one small file per method
PLOTS: dict[str, Path] = {
    name: paths.REPORTS / f"{name}.png" for name in ("id_vs_shots", "ood_vs_shots", "id_vs_ood", "retention", "iimm_vs_change",
                                                     "cd_ood", "cd_id")  # cd_*: the rank diagrams (compare)
}
# and one per registered measure that draws one
PLOTS.update({Path(m.plot.file).stem: paths.REPORTS / m.plot.file for m in MEASURES.values() if m.plot})
OUTPUTS: tuple[Path, ...] = (RUNS_CSV, SUMMARY_CSV, SELECTION_CSV, RETENTION_CSV, TRIALS_CSV, SIGNIFICANCE_CSV, SUMMARY_MD,
                             METRICS_JSON, SHOTS_CSV, *PLOTS.values())



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


