"""Command line: one subcommand per DVC stage (the same functions `dvc repro` runs through
`stages/*.py`), plus helpers (repro, methods, leaderboard, crosstask, ui).

Every stage command reads params.yaml; `check` validates all of it against the registries
(DVC runs it first).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.stages import (check, embed, evaluate, finetune, images, prepare, pretrained, report, sample, selection,
                             vision)

app = typer.Typer(
    help="Few-shot robust fine-tuning of CLIP on WILDS. Stages run in this order: check → prepare → "
         "images → pretrained → vision → embed → sample → finetune → selection → evaluate → report. Normally `dvc repro` runs "
         "them; each command here runs one stage by hand (same code, same outputs).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

for _name, _module in (("check", check), ("prepare", prepare), ("images", images), ("pretrained", pretrained), ("vision", vision),
                       ("embed", embed),
                       ("sample", sample), ("finetune", finetune), ("selection", selection), ("evaluate", evaluate),
                       ("report", report)):
    app.command(name=_name)(_module.command)


@app.command()
def methods():
    """List the registered fine-tuning methods (the names finetune.methods accepts) with every
    hyper-parameter's default: a trial of finetune.trials sets the ones it changes."""
    import dataclasses

    from pipeline.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        typer.echo(f"{name:14s} {doc}")
        defaults = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Hparams))
        typer.echo(f"{'':14s} defaults: {defaults}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def repro(ctx: typer.Context,
          cluster: Optional[str] = typer.Option(
              None, "--cluster", metavar="slurm|local",
              help="Run the grid's stale finetune@… entries as jobs: `slurm` (a SLURM job array through submitit) or "
                   "`local` (--jobs at a time on this machine, each on its own GPU or share of the cores). The stages "
                   "above the grid and after it run through DVC here; each finished entry is recorded in dvc.lock only "
                   "if its inputs still match what was submitted."),
          jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="--cluster local: entries at a time."),
          cluster_file: Optional[Path] = typer.Option(
              None, "--cluster-file", help="Resources of the jobs (default: cluster.yaml if present; see docs/scaling.md)."),
          detach: bool = typer.Option(False, "--detach", help="--cluster slurm: submit the grid and a collecting job "
                                                              "that depends on it, then exit.")):
    """Check all of params.yaml and the files it names, then run `dvc repro` (any further
    arguments go to it, e.g. `repro -s report`, `repro finetune@ft-lr1e-4-16`).

    DVC reads params.yaml to expand dvc.yaml's matrices before any stage runs, so a wrong
    shape there (a level list that is a string, a misspelt section) would otherwise end in
    DVC's own message, naming nothing useful. Plain `dvc repro` works too: its first stage,
    `check`, runs the same checks before any stage that owns outputs.

    With --cluster: the grid runs as jobs (`python -m pipeline cluster status` shows them; after
    a crash or --detach, `python -m pipeline cluster collect` finishes the bookkeeping)."""
    from pipeline.stages.check import check_params
    from pipeline.stages.common import guard

    guard(check_params)("params.yaml")  # one line and exit 1 on a mistake, as every stage
    if cluster is None:
        raise typer.Exit(subprocess.call([sys.executable, "-m", "dvc", "repro", *ctx.args]))
    if ctx.args:
        raise typer.BadParameter(f"{' '.join(ctx.args)}: dvc repro arguments are not taken with --cluster")
    raise typer.Exit(_cluster(lambda c: c.repro(detach=detach), cluster, jobs, cluster_file))


cluster_app = typer.Typer(help="The grid's jobs on a cluster (`repro --cluster`): status, and collect after the "
                               "controller died or --detach.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("collect")
def cluster_collect(cluster_file: Optional[Path] = typer.Option(None, "--cluster-file", help="As given to repro.")):
    """Re-attach to the jobs of the last submission: record each finished entry in dvc.lock (if its
    inputs are unchanged), wait for the rest, then run the stages after the grid. Submits and
    deletes nothing a job owns."""
    raise typer.Exit(_cluster(lambda c: c.collect(), "slurm", 1, cluster_file))


@cluster_app.command("status")
def cluster_status(cluster_file: Optional[Path] = typer.Option(None, "--cluster-file", help="As given to repro.")):
    """One line per entry of the current (or last) submission: entry, job id, state, elapsed, log."""
    raise typer.Exit(_cluster(lambda c: [typer.echo(line) for line in c.status_lines()] and 0, "slurm", 1, cluster_file))


def _cluster(action, backend: str, jobs: int, cluster_file: Optional[Path]) -> int:
    from pipeline.cluster import config
    from pipeline.cluster.controller import ClusterError, Controller
    from pipeline.core.validation import ParamsError

    root = Path.cwd()
    try:
        settings = config.load(cluster_file, root)
        return action(Controller(root, settings, backend, jobs, echo=typer.echo))
    except (ParamsError, ClusterError) as err:
        typer.echo(f"error: {err}", err=True)
        return 1


@app.command()
def leaderboard(value: str = typer.Option("ood", help="Which figure per level: ood or id."),
                all_commits: bool = typer.Option(False, "--all-commits", "-A",
                                                 help="Every commit's experiments, not only HEAD's."),
                width: int = typer.Option(0, help="Cut lines to this width (default: the terminal's).")):
    """Rank the DVC experiments (`dvc exp run`, the workspace and HEAD): one row per experiment
    and method, the selected OOD (or ID) figure per level, their mean (the sort key) and the
    params that differ between experiments. Reads `dvc exp show --json`."""
    import shutil

    from pipeline.report.leaderboard import entries, render

    if value not in ("ood", "id"):
        raise typer.BadParameter(f"{value!r}: allowed values are ood, id", param_hint="--value")
    typer.echo(render(entries(_exp_show(all_commits), value), value,
                      width or shutil.get_terminal_size((120, 24)).columns))


def _exp_show(all_commits: bool) -> list:
    """`dvc exp show --json` of HEAD's experiments (every commit's with `all_commits`), or exit 1
    with DVC's last error line."""
    import json

    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["-A"] if all_commits else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        typer.secho(f"error: `dvc exp show` failed: {proc.stderr.strip().splitlines()[-1:]}", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(1)
    return json.loads(proc.stdout or "[]")


@app.command()
def crosstask(method: str = typer.Option("ft", help="The fine-tuning method whose change is predicted."),
              level: Optional[str] = typer.Option(None, help="A level of sample.levels (16, 25%); default: the "
                                                             "method's largest."),
              out: Path = typer.Option(Path("benchmarks/out/crosstask"), help="Folder for the plot and tables."),
              all_commits: bool = typer.Option(False, "--all-commits", "-A",
                                               help="Every commit's experiments, not only HEAD's.")):
    """Across tasks (DVC experiments that differ only in the task, e.g. `-S
    prepare.synthetic.label=shape,colour,texture,size`): fit the change fine-tuning brings
    (ID and OOD, fine-tuned − zero-shot) on each pre-training score (IIMM, transfer scores) by
    least squares; writes crosstask.png, .md (slope, intercept, R², n per score) and .json.
    Reads `dvc exp show --json` and each experiment's metrics/report.json."""
    from pipeline.report.crosstask import collect, experiments, level_key, markdown, read_report, write

    key = None
    if level is not None:
        try:
            key = level_key(level)
        except ValueError as err:
            raise typer.BadParameter(str(err).removeprefix("--level: "), param_hint="--level") from None
    result = collect(experiments(_exp_show(all_commits)), read_report, method=method, level=key)
    if len(result.points) < 2:
        typer.secho(f"error: {len(result.points)} task(s) with {method} results; a fit needs 2 or more (run the "
                    "grid of README 'Across tasks').", fg=typer.colors.RED, err=True)
        typer.echo(markdown(result), err=True)
        raise typer.Exit(1)
    for path in write(result, out):
        typer.echo(f"wrote {path}")
    typer.echo(markdown(result))


@app.command()
def ui(host: str = typer.Option("127.0.0.1", help="Interface to bind (default: this machine only)."),
       port: int = typer.Option(5000)):
    """Open the MLflow UI on the tracking store (sqlite:///mlflow.db unless MLFLOW_TRACKING_URI)
    and print each experiment's page in the model-training view (runs grouped by method and
    level; add columns such as mean/selected/test/acc_avg from "Columns")."""
    from pipeline.core.tracking import experiment_pages, tracking_uri

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(),
           "--host", host, "--port", str(port), "--workers", "1"]
    base = f"http://{host}:{port}"
    typer.echo(f"MLflow UI on {base}  (Ctrl-C to stop)")
    for name, url in experiment_pages(base).items():
        typer.echo(f"  {name}: {url}")
    raise typer.Exit(_run_group(cmd))


def _run_group(cmd: list[str]) -> int:
    """Run `cmd` in its own process group and stop the whole group (the MLflow server and its
    workers) when this command ends: Ctrl-C, SIGTERM, or the server exiting."""
    import os
    import signal

    proc = subprocess.Popen(cmd, start_new_session=True)

    def stop(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        # the whole group, even when the server itself has exited: its workers may not have
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv, prog_name="wfp")


if __name__ == "__main__":
    main()
