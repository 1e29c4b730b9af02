"""Command line: one subcommand per DVC stage (the same functions `dvc repro` runs through
`stages/*.py`), plus helpers (repro, search, methods, leaderboard, compare, crosstask, ui).

Every stage command reads params.yaml; `check` validates all of it against the registries
(DVC runs it first).
"""

from __future__ import annotations

import os
import shutil
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


def summary(doc: str) -> str:
    """The first paragraph of a docstring as one line: whole sentences, never cut mid-way."""
    para = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines())


@app.command()
def methods():
    """List the registered fine-tuning methods (the names finetune.methods accepts) with every
    hyper-parameter's default (a trial of finetune.trials sets the ones it changes), the
    method's family in the report, and whether WiSE-FT and model soups (evaluate.soups) apply."""
    import dataclasses

    from pipeline.methods import METHODS

    import textwrap

    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 100)) - 15
    for name, cls in sorted(METHODS.items()):
        doc = summary(cls.__doc__ or "")
        lines = textwrap.wrap(doc, width) or [""]
        typer.echo(f"{name:14s} {lines[0]}")
        for line in lines[1:]:
            typer.echo(f"{'':14s} {line}")
        defaults = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Hparams))
        typer.echo(f"{'':14s} defaults: {defaults}")
        typer.echo(f"{'':14s} family: {cls.family}; WiSE-FT: {'yes' if cls.weight_space else 'no'}; "
                   f"soups: {'yes' if cls.soups else 'no'}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def repro(ctx: typer.Context,
          cluster: Optional[str] = typer.Option(
              None, "--cluster", metavar="slurm|local",
              help="`slurm`: the grid's stale finetune@… entries as a SLURM job array (submitit); the stages above "
                   "and after it run through DVC here. `local`: every stale stage on this machine, --jobs at a time "
                   "(each on its own GPU or share of the cores), a stage as soon as the stages above it are done. "
                   "Each finished stage is recorded in dvc.lock only if its inputs still match what it started with."),
          jobs: int = typer.Option(1, "--jobs", "-j", min=0,
                                   help="Stages at a time on this machine (--cluster local; more than 1 implies it; "
                                        "0: one per core, up to 8, what `make repro` runs). Each gets its share of "
                                        "the cores; params `threads` stays what it is, so the results are those of "
                                        "plain `dvc repro`."),
          cluster_file: Optional[Path] = typer.Option(
              None, "--cluster-file", help="Resources of the jobs (default: cluster.yaml if present; see docs/scaling.md)."),
          detach: bool = typer.Option(False, "--detach", help="--cluster slurm: submit the grid and a collecting job "
                                                              "that depends on it, then exit.")):
    """Check all of params.yaml and the files it names, write the generated trials file
    (`python -m pipeline search`), then run `dvc repro` (any further arguments go to it, e.g.
    `repro -s report`, `repro finetune@ft-0-lr21e-6-16`).

    DVC reads params.yaml to expand dvc.yaml's matrices before any stage runs, so a wrong
    shape there (a level list that is a string, a misspelt section) would otherwise end in
    DVC's own message, naming nothing useful. Plain `dvc repro` works too: its first stage,
    `check`, runs the same checks before any stage that owns outputs.

    With -j N: N stages at a time on this machine (`make repro`: -j 0, one per core, up to 8):
    the same results as `dvc repro`, sooner. With --cluster slurm: the grid runs as jobs
    (`python -m pipeline cluster status` shows them; after a crash or --detach,
    `python -m pipeline cluster collect` finishes the bookkeeping)."""
    from pipeline.stages.check import check_params, write_generated
    from pipeline.stages.common import guard

    params = guard(check_params)("params.yaml")  # one line and exit 1 on a mistake, as every stage
    path, n, changed = write_generated(params)  # the trials DVC's finetune matrix reads: never stale
    if changed:
        typer.echo(f"{path}: {n} trials written from finetune.trials and finetune.search")
    if jobs == 0:
        from pipeline.cluster.controller import auto_jobs

        jobs = auto_jobs()
    if cluster is None and jobs > 1:
        cluster = "local"
    if cluster is None:
        raise typer.Exit(subprocess.call([sys.executable, "-m", "dvc", "repro", *ctx.args]))
    if ctx.args:
        raise typer.BadParameter(f"{' '.join(ctx.args)}: dvc repro arguments are not taken with --cluster or "
                                 "--jobs above 1 (the whole pipeline runs); use --jobs 1 to pass them to dvc repro")
    raise typer.Exit(_cluster(lambda c: c.repro(detach=detach), cluster, jobs, cluster_file))


@app.command()
def search(params_file: Path = typer.Option(Path("params.yaml"), "--params", "-p", help="Params file to read."),
           show: bool = typer.Option(False, "--show", help="Also list every trial with its values.")):
    """Write trials.yaml: every trial of finetune.trials and every draw of finetune.search, which
    dvc.yaml's finetune matrix reads (DVC expands matrices before any stage runs, so the draws
    must be in a file). `python -m pipeline repro` runs this first; plain `dvc repro` stops at
    its `check` stage when the file is out of date with params.yaml.

    A search maps each hyper-parameter of its method (`method:`, default the search's name) to a
    list (a grid) or a distribution: loguniform, uniform or int with bounds lo, hi, or choice with
    its options; `n` draws by `sampler` (random or sobol) from `seed`. Draws are seeded and
    prefix-stable: raising n keeps the first draws (names and values), so DVC trains only the new
    ones. README "Search spaces" has the syntax and the details."""
    from pipeline.stages.check import check_params, write_generated
    from pipeline.stages.common import guard

    params = guard(check_params)(params_file)
    path, n, changed = write_generated(params, params_file)
    typer.echo(f"{path}: {n} trials ({'written' if changed else 'unchanged'})")
    if show:
        ft = params.finetune
        for name, spec in ft.all_trials.items():
            values = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "method")
            typer.echo(f"  {name:32s} {spec['method']:10s} {values}  [{ft.origin(name) or 'finetune.trials'}]")


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


@app.command()
def study(sets: list[str] = typer.Option(..., "--set", "-S", metavar="KEY=V1[,V2...]",
                                          help="A params.yaml key and its values, as `dvc exp run --queue -S`: one "
                                               "experiment per combination of the values of every -S."),
          cluster: str = typer.Option("slurm", "--cluster", metavar="slurm|local",
                                      help="Where each experiment's grid runs (as `repro --cluster`)."),
          jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="--cluster local: entries at a time, per experiment."),
          parallel: Optional[int] = typer.Option(None, "--parallel", min=1,
                                                 help="Experiments at a time (default: all of them with slurm, one "
                                                      "with local)."),
          name: Optional[str] = typer.Option(None, "--name", help="A prefix for the experiments' names."),
          cluster_file: Optional[Path] = typer.Option(
              None, "--cluster-file", help="Resources of the jobs (default: cluster.yaml if present).")):
    """Run several experiments (datasets, tasks) from one command, each grid on the cluster.

    E.g. `study -S dataset.name=iwildcam,fmow,camelyon17,rxrx1,waterbirds`.

    Each experiment gets a workspace (a git worktree of HEAD with your uncommitted edits, under
    .studies/<name>, sharing the project's DVC cache) with its -S values in params.yaml; there
    `repro --cluster` runs, and the result is saved as a DVC experiment of this project (`dvc exp
    save`): `leaderboard` and `compare` then show every experiment of the study. Running it again
    runs only what is stale in each. MLflow: one tracking server for all jobs; each
    experiment's runs in the MLflow experiment `<dataset> [<name>]`."""
    from pipeline.cluster import config
    from pipeline.cluster.controller import BACKENDS
    from pipeline.cluster.study import Study, StudyError, expand
    from pipeline.core.validation import ParamsError

    if cluster not in BACKENDS[:2]:
        raise typer.BadParameter(f"{cluster!r}: allowed values are slurm, local", param_hint="--cluster")
    root = Path.cwd()
    try:
        settings = config.load(cluster_file, root)
        experiments = expand(sets, name)
    except (ParamsError, StudyError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    command = [sys.executable, "-m", "pipeline", "repro", "--cluster", cluster, "--jobs", str(jobs)]
    if cluster_file is not None:
        command += ["--cluster-file", str(cluster_file.resolve())]
    runner = Study(root, echo=typer.echo)
    with _study_tracking(root, settings.mlflow_host):
        try:
            results = runner.run(experiments, command, parallel or (len(experiments) if cluster == "slurm" else 1))
        except StudyError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1)
    failed = [n for n, rc in results.items() if rc]
    typer.echo(f"study: {len(results) - len(failed)} of {len(results)} experiments done and saved"
               + (f"; failed: {', '.join(failed)} (fix, then run the same command: only what is stale runs)"
                  if failed else "; `python -m pipeline leaderboard` and `compare` show them"))
    raise typer.Exit(1 if failed else 0)


def _study_tracking(root: Path, host: str):
    """One MLflow tracking server on the project's store for every job of the study, unless
    MLFLOW_TRACKING_URI already names a server."""
    import contextlib

    from pipeline.core import tracking

    if tracking.is_server():
        return contextlib.nullcontext()
    from pipeline.cluster.controller import tracking_server_hook

    return tracking_server_hook(root, host, typer.echo)


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


# the folders whose entries DVC matrix stages own one by one (a trial x level, a method): an entry
# no stage owns any more was left by a removed trial, level or method. logs/finetune mirrors
# runs/finetune (written beside the output, never by DVC)
_OWNED = (("runs/finetune", 2, "runs/finetune"), ("checkpoints", 2, "checkpoints"),
          ("logs/finetune", 2, "runs/finetune"), ("runs/evaluate", 1, "runs/evaluate"),
          ("runs/mlflow", 1, "runs/mlflow"))


def orphans(outs: set[str], root: Path = Path(".")) -> list[Path]:
    """Entries under the matrix stages' folders that no DVC stage output in `outs` (paths
    relative to the project) owns."""
    found = []
    for folder, depth, mirror in _OWNED:
        base = root / folder
        for p in sorted(base.glob("/".join(["*"] * depth))) if base.is_dir() else ():
            if any(part.startswith(".") for part in p.relative_to(base).parts):
                continue  # DVC's .gitignore files beside its outputs
            owner = (Path(mirror) / p.relative_to(base)).as_posix()
            if owner not in outs:
                found.append(p)
    return found


@app.command()
def clean(dry_run: bool = typer.Option(False, "--dry-run", "-n", help="List what would be removed; remove nothing.")):
    """Remove the outputs no DVC stage owns any more: the runs, checkpoints and logs of a trial,
    level or method removed from params.yaml (DVC stops tracking them but leaves them on disk).
    Reads dvc.yaml through DVC; touches nothing any stage owns. Their MLflow runs stay in the
    store (delete them in the UI if you want them gone)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        root = Path(repo.root_dir)
        outs = {Path(os.path.relpath(out.fs_path, root)).as_posix() for stage in repo.index.stages
                for out in stage.outs}
    found = orphans(outs, root)
    for p in found:
        typer.echo(f"{'would remove' if dry_run else 'removing'} {p.relative_to(root)}")
        if not dry_run:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            parent = p.parent
            while parent != root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    if not found:
        typer.echo("nothing to clean: every output belongs to a stage of dvc.yaml")


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
def compare(level: Optional[str] = typer.Option(None, help="Rank over the experiments at this level of sample.levels "
                                                          "(16, 25%): one task per experiment. Default: every "
                                                          "level, one task per experiment × level."),
            methods: Optional[str] = typer.Option(None, help="Comma-separated methods to compare (default: every "
                                                              "method of the experiments)."),
            test: str = typer.Option("t", help="The paired test over seeds: t (paired t-test) or wilcoxon "
                                               "(signed-rank; needs 6+ seeds to ever reject at 0.05)."),
            zero_shot: bool = typer.Option(True, "--zero-shot/--no-zero-shot",
                                           help="Rank the zero-shot model (k = 0) as a contender."),
            out: Path = typer.Option(Path("benchmarks/out/compare"), help="Folder for the tables and diagrams."),
            log: bool = typer.Option(True, "--log/--no-log", help="Log the answer as an MLflow run (experiment "
                                                                   "`compare`; `python -m pipeline ui` lists it first)."),
            all_commits: bool = typer.Option(False, "--all-commits", "-A",
                                             help="Every commit's experiments, not only HEAD's.")):
    """Which method, at which level: the answer with significance, across DVC experiments
    (datasets, or the tasks of the synthetic family) and within each.

    Across tasks (a task = one experiment at one level): each method's average rank (1 = best)
    on the headline OOD and ID figures, the Friedman test, the Nemenyi post-hoc test and a
    critical-difference diagram (cd_ood.png, cd_id.png; scikit-posthocs). Within each experiment,
    per level: each method against the level's best and against zero-shot, paired over seeds
    (a seed draws the same sample for every method), Holm-corrected; a plain line per level.
    Figures: the test figures of the trial and α each selection protocol chose on validation
    data (reports/runs.csv), never a choice made on a test split. Reads `dvc exp show --json`
    and each experiment's reports/runs.csv; one experiment per task (the first listed)."""
    from pipeline.core.levels import parse_level
    from pipeline.report import compare as cmp
    from pipeline.report.crosstask import experiments

    if test not in cmp.TESTS:
        raise typer.BadParameter(f"{test!r}: allowed values are {', '.join(cmp.TESTS)}", param_hint="--test")
    name = None
    if level is not None:
        try:
            name = parse_level(level, "--level").name
        except ValueError as err:
            raise typer.BadParameter(str(err).removeprefix("--level: "), param_hint="--level") from None
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    result = cmp.compare(experiments(_exp_show(all_commits)), cmp.read_runs_csv, chosen, name, test, zero_shot)
    if not result.tasks:
        typer.secho("error: no experiment with reports/runs.csv: run `dvc repro` (or `dvc exp run`) first.",
                    fg=typer.colors.RED, err=True)
        for exp, why in result.skipped:
            typer.echo(f"  - {exp}: {why}", err=True)
        raise typer.Exit(1)
    if chosen:
        known = {str(m) for runs in result.tasks.values() for m in runs["method"]}
        unknown = [m for m in chosen if m not in known]
        if unknown:
            raise typer.BadParameter(f"{', '.join(unknown)}: in no experiment's runs; the experiments have "
                                     f"{', '.join(sorted(known))}", param_hint="--methods")
    files = cmp.write(result, out)
    for path in files:
        typer.echo(f"wrote {path}")
    if log:
        from pipeline.core import tracking

        run_id = cmp.log(result, files, level=name, test=test)
        typer.echo(f"logged MLflow run {run_id} (experiment `compare`, store {tracking.display_uri()})")
    typer.echo(cmp.comparison_markdown(result, tables=False))  # the tables: compare.md, paired.csv


@app.command()
def ui(host: str = typer.Option("127.0.0.1", help="Interface to bind (default: this machine only)."),
       port: int = typer.Option(5000)):
    """Open the MLflow UI on the tracking store (sqlite:///mlflow.db unless MLFLOW_TRACKING_URI)
    and print, first, the pages that answer: the latest `compare` run (ranks over experiments,
    the critical-difference diagrams) and each experiment's report run (summary.md with its
    significance section), each opened on its artifacts; then each experiment's page in the
    model-training view (runs grouped by method and level; add columns such as
    mean/selected/test/acc_avg from "Columns"). When MLFLOW_TRACKING_URI is a tracking server
    (http/https), that server is the UI: this prints its pages and starts nothing."""
    from pipeline.core.tracking import (answer_pages, display_uri, experiment_pages, is_server,
                                        tracking_uri)

    def pages(base: str) -> None:
        answers = answer_pages(base)
        if answers:
            typer.echo("The answer:")
            for name, url in answers.items():
                typer.echo(f"  {name}: {url}")
            typer.echo("Experiments:")
        for name, url in experiment_pages(base).items():
            typer.echo(f"  {name}: {url}")

    if is_server():
        typer.echo(f"MLflow UI on {display_uri()}  (the tracking server in MLFLOW_TRACKING_URI)")
        pages(display_uri())
        raise typer.Exit(0)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(),
           "--host", host, "--port", str(port), "--workers", "1"]
    base = f"http://{host}:{port}"
    typer.echo(f"MLflow UI on {base}  (Ctrl-C to stop)")
    pages(base)
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


def prog_name(argv0: str | None = None) -> str:
    """The command as typed: `wfp` (the installed script, pyproject's [project.scripts]) or
    `python -m pipeline` (the README's form, which needs no install)."""
    name = Path(argv0 if argv0 is not None else sys.argv[0]).name
    return "wfp" if name in ("wfp", "wfp.exe") else "python -m pipeline"


def use_this_interpreter() -> None:
    """Make `python` in the subprocesses this command starts (dvc.yaml's stage commands, run by
    DVC; the cluster's jobs; a study's workspaces) the interpreter running it: its bin/ folder
    first on PATH. Without it, `.venv/bin/python -m pipeline repro` from a shell without the
    environment activated runs each stage with whatever `python` PATH finds first (another
    environment's, lacking the packages or holding other versions of them)."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, *filter(None, [path])])


def main(argv: Optional[list[str]] = None) -> None:
    use_this_interpreter()
    app(args=argv, prog_name=prog_name())


if __name__ == "__main__":
    main()
