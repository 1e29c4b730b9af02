"""The `report` stage: every configured run -> tables, plots, DVC metrics, a summary MLflow run."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.stages.common import ParamsOpt, guard, run_command


@guard
def command(params_file: Path = ParamsOpt):
    """Aggregate every run into tables and plots -> reports/ (and a summary MLflow run)."""
    from pipeline import report

    report.run(report.ReportConfig.of(load_params(params_file)))


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "report")
