"""`python -m pipeline study`: the -S expansion, and a study of a small DVC project (the cluster
runner's toy, tests/cluster_project.py) run through the local backend and through the real
SLURM: one workspace per experiment, each saved as a DVC experiment of the project that
`leaderboard` reads; a second run submits nothing; an uncommitted edit of the project reaches
every workspace; the project's own workspace stays untouched."""

import json
import subprocess
import sys

import pytest

from pipeline.cluster.study import Experiment, Study, StudyError, expand
from pipeline.report.leaderboard import entries
from tests import cluster_project as cp
from tests.test_cluster_slurm import _sinfo_answers


def test_expand_gives_one_experiment_per_combination():
    got = expand(["dataset.name=iwildcam,fmow", "sample.levels=[1, 16],25%"])
    assert [e.name for e in got] == ["iwildcam-1_16", "iwildcam-25pct", "fmow-1_16", "fmow-25pct"]
    assert got[0].sets == (("dataset.name", "iwildcam"), ("sample.levels", [1, 16]))
    assert got[3].sets == (("dataset.name", "fmow"), ("sample.levels", "25%"))
    assert [e.name for e in expand(["seed=0,1"], prefix="s")] == ["s-0", "s-1"]
    assert expand(["seed=0,1"])[1].sets == (("seed", 1),)  # YAML values: an int, as dvc exp run -S
    # a -S with one value sets every experiment and is left out of the names
    got = expand(["sample.seeds=[0, 1, 2]", "dataset.name=fmow,rxrx1"])
    assert [e.name for e in got] == ["fmow", "rxrx1"] and got[1].sets[0] == ("sample.seeds", [0, 1, 2])
    assert [e.name for e in expand(["dataset.name=fmow"])] == ["fmow"]
    # one experiment with a prefix (a recipe) is named by the prefix alone
    got = expand(["finetune.methods=[lp, ft]", "sample.levels=[1, 16]"], prefix="robust")
    assert [e.name for e in got] == ["robust"] and got[0].sets[0] == ("finetune.methods", ["lp", "ft"])


@pytest.mark.parametrize("sets, message", [
    ([], "-S: give at least one"),
    (["dataset.name"], "expected key=value"),
    (["dataset.name="], "expected key=value"),
    (["data set=a"], "is not a params.yaml key"),
    (["seed=0,0"], "a value is listed twice"),
    (["seed=0", "seed=1"], "given twice"),
    (["a=x y,x_y"], "both be named 'x_y'"),
])
def test_expand_refuses_with_one_clear_line(sets, message):
    with pytest.raises(StudyError, match=message):
        expand(sets)


def _toy_command(backend: str, jobs: int) -> list[str]:
    # the toy's controller, as `repro --cluster` runs it (the CLI first checks the real
    # pipeline's params.yaml, which the toy does not have)
    code = ("import sys; from pathlib import Path; from pipeline.cluster import config; "
            "from pipeline.cluster.controller import Controller; root = Path.cwd(); "
            f"sys.exit(Controller(root, config.load(None, root), {backend!r}, {jobs}).repro())")
    return [sys.executable, "-c", code]


def _exp_show(work):
    proc = cp.dvc(work, "exp", "show", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _study(work, backend, parallel, sets=("k=1,2",)):
    lines = []
    got = Study(work, echo=lines.append).run(expand(list(sets), prefix="k"), _toy_command(backend, 2), parallel)
    return got, "\n".join(lines)


def _run_in(work, fn, *args):
    # the study runs git and DVC in the project's folder: from there, as the CLI does
    import os

    here = os.getcwd()
    os.chdir(work)
    old = dict(os.environ)
    os.environ.update(cp.env())
    try:
        return fn(*args)
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(old)


def _check_study(work, backend, parallel):
    results, out = _run_in(work, _study, work, backend, parallel)
    assert results == {"k-1": 0, "k-2": 0}, out
    assert "[k-1] saved as DVC experiment k-1" in out and "[k-2] saved as DVC experiment k-2" in out, out
    for name, k in (("k-1", "1"), ("k-2", "2")):
        ws = work / ".studies" / name
        assert (ws / "up.txt").read_text() == f"up-{k}\n"
        assert cp.is_clean(ws)
    # the project's workspace: untouched, nothing stale (the workspaces are DVC subrepos)
    assert not (work / "up.txt").exists() and "k: 1" in (work / "params.yaml").read_text()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=work, capture_output=True, text=True).stdout == ""
    board = {e.experiment: e.values for e in entries(_exp_show(work))}
    assert board == {"k-1": {"4": 1.0}, "k-2": {"4": 2.0}}, board
    return out


@pytest.mark.slow
def test_a_study_on_the_local_backend(tmp_path):
    work = cp.make(tmp_path / "p")
    _check_study(work, "local", parallel=1)
    # again: nothing stale in either workspace, nothing submitted
    results, out = _run_in(work, _study, work, "local", 1)
    assert results == {"k-1": 0, "k-2": 0} and out.count("every stage is up to date") == 2, out
    # an uncommitted edit of the project's code reaches every workspace: both grids, and the stage
    # below them, re-run
    (work / "code.txt").write_text("code v2\n")
    results, out = _run_in(work, _study, work, "local", 1)
    assert results == {"k-1": 0, "k-2": 0} and out.count("3 stages recorded in dvc.lock") == 2, out
    assert "code v2" in (work / ".studies" / "k-2" / "out" / "a" / "r").read_text()
    # the leaderboard command of the project lists both experiments
    proc = subprocess.run([sys.executable, "-m", "pipeline", "leaderboard", "--width", "200"], cwd=work,
                          env=cp.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["k-2", "toy", "2.000", "2.000"] in [r[:4] for r in rows] and ["k-1", "toy", "1.000", "1.000"] in [
        r[:4] for r in rows], proc.stdout


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.skipif(not _sinfo_answers(), reason="no SLURM cluster answers sinfo (run .ci/slurm-up as root)")
def test_a_study_on_slurm_runs_its_experiments_side_by_side(tmp_path):
    work = cp.make(tmp_path / "p")
    out = _check_study(work, "slurm", parallel=2)
    assert out.count("as SLURM job array") == 2, out


def test_a_failed_experiment_is_reported_and_not_saved(tmp_path):
    work = cp.make(tmp_path / "p")
    (work / "FAIL_b").write_text("")  # untracked: it reaches the workspaces, as an edit does
    study = Study(work, echo=lambda line: None)
    # the local backend: the debug one runs a failing job under pdb's post-mortem in the
    # controller's process, which a test's closed stdin ends before the failure is recorded
    results = _run_in(work, study.run, [Experiment("bad", (("k", 3),))], _toy_command("local", 1), 1)
    assert results == {"bad": 1}
    assert "bad" not in json.dumps(_exp_show(work))
    # nothing left running: the workspace's tracking server stopped with its controller (its
    # record, which a server kept up for jobs still out would leave, is gone)
    assert (work / ".studies/bad/logs/mlflow-server.log").exists()
    assert not (work / ".studies/bad/logs/mlflow-server.json").exists()


@pytest.mark.slow
def test_side_by_side_experiments_save_one_at_a_time(tmp_path, monkeypatch):
    """Every workspace's `dvc exp save` writes the project's refs/exps/stash under git's lock
    file: two at once fail ("stash.lock: File exists", seen on SLURM with --parallel 2). Saves
    that would overlap (each held open 3 s, the two experiments' runs ending close together)
    run one after the other, and both are saved."""
    import time

    from pipeline.cluster import study

    spans, real = [], study._dvc

    def slow_save(root, *args):
        if args[:2] != ("exp", "save"):
            return real(root, *args)
        start = time.monotonic()
        time.sleep(3.0)
        try:
            return real(root, *args)
        finally:
            spans.append((start, time.monotonic()))

    monkeypatch.setattr(study, "_dvc", slow_save)
    work = cp.make(tmp_path / "p")
    done = [sys.executable, "-m", "dvc", "repro", "-q"]  # the two runs end within a second or two
    lines = []
    got = _run_in(work, lambda: Study(work, echo=lines.append).run(expand(["k=1,2"], prefix="k"), done, 2))
    assert got == {"k-1": 0, "k-2": 0}, lines
    assert len(spans) == 2
    (_, first_end), (second_start, _) = sorted(spans)
    assert first_end <= second_start, spans  # the second save started after the first had ended
    assert {e.experiment for e in entries(_exp_show(work))} >= {"k-1", "k-2"}
