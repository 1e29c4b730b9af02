"""The cluster runner's bookkeeping, fast: submitit's debug executor (in-process) and the local
backend on a small DVC project (tests/cluster_project.py); cluster.yaml's errors. The same
controller through a real SLURM: tests/test_cluster_slurm.py."""

import json
import os
import subprocess
import sys

import pytest

from pipeline.cluster import config
from pipeline.core.validation import ParamsError
from tests import cluster_project as cp


@pytest.mark.parametrize("text, message", [
    ("partiton: gpu\n", "cluster.yaml: partiton: unknown key (did you mean partition?)"),
    ("cpus_per_job: 0\n", "cluster.yaml: cpus_per_job: 0 is not allowed; at least 1"),
    ("setup: module load cuda\n", "cluster.yaml: setup: 'module load cuda' is not a list"),
    ("sbatch: {time: '1:00:00'}\n", "cluster.yaml: sbatch: 'time' is not allowed here; it is set by its own key"),
    ("local: {gpus: [0, -1]}\n", "cluster.yaml: local.gpus: [0, -1] is not allowed; GPU indices are >= 0"),
    ("time_min: true\n", "cluster.yaml: time_min: True is not an integer"),
])
def test_a_bad_cluster_file_is_one_clear_line(tmp_path, text, message):
    (tmp_path / "cluster.yaml").write_text(text)
    with pytest.raises(ParamsError) as err:
        config.load(None, tmp_path)
    assert str(err.value).startswith(message), str(err.value)


def test_the_cluster_file_defaults_and_a_named_file(tmp_path):
    assert config.load(None, tmp_path) == config.ClusterSettings()  # no cluster.yaml: defaults
    with pytest.raises(ParamsError, match="gpu.yaml: cluster file not found"):
        config.load("gpu.yaml", tmp_path)
    (tmp_path / "gpu.yaml").write_text("partition: gpu\ngpus_per_job: 1\nsbatch: {account: lab, exclusive: true}\n")
    got = config.load("gpu.yaml", tmp_path)
    assert got.partition == "gpu" and got.gpus_per_job == 1 and got.sbatch == {"account": "lab", "exclusive": True}


@pytest.mark.slow
def test_the_cli_rejects_a_bad_cluster_file_before_anything_runs(tmp_path):
    work = cp.make(tmp_path / "p")
    (work / "cluster.yaml").write_text("partiton: gpu\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "cluster", "status"], cwd=work, env=cp.env(),
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "cluster.yaml: partiton: unknown key" in proc.stderr
    assert not (work / "dvc.lock").exists() and not (work / ".cluster").exists()


@pytest.mark.slow
def test_debug_executor_records_every_entry_and_dvc_is_clean(tmp_path):
    work = cp.make(tmp_path / "p")
    rc, out = cp.run_controller(work, backend="debug")
    assert rc == 0, out
    assert "2 of 2 entries recorded in dvc.lock" in out
    assert cp.is_clean(work)
    r = (work / "out/a/r").read_text()
    assert f"finetune@a {work}" in r  # DVC_STAGE and DVC_ROOT, as DVC sets them
    lock = (work / "dvc.lock").read_text()
    assert "finetune@a" in lock and "finetune@b" in lock and "down:" in lock
    # nothing stale: a second run submits nothing
    rc, out = cp.run_controller(work, backend="debug")
    assert rc == 0 and "every grid entry is up to date" in out, out


@pytest.mark.slow
def test_one_failing_entry_is_reported_and_the_other_recorded(tmp_path):
    work = cp.make(tmp_path / "p")
    (work / "FAIL_b").write_text("")
    rc, out = cp.run_controller(work, backend="local", jobs=2)
    assert rc == 1, out
    assert "finetune@b FAILED" in out and "log: " in out and "2 stages recorded" in out, out
    assert "  finetune@b: failed  log " in out and "  down: blocked" in out, out
    # the stage's own error is shown, not only submitit's trace of the job's exception
    shown = [line for line in out.splitlines() if line.startswith("  | ")]
    assert shown[-1] == "  | entry b told to fail by FAIL_b" and "Traceback" not in "".join(shown), out
    status = json.loads(cp.dvc(work, "status", "--json").stdout)
    assert "finetune@a" not in status and "finetune@b" in status and "down" in status  # downstream not run
    assert not (work / "down.txt").exists()
    (work / "FAIL_b").unlink()  # fixed: only the stale entry (and what it blocked) runs again
    rc, out = cp.run_controller(work, backend="local", jobs=2)
    assert rc == 0 and "2 stages to run" in out and "2 stages recorded" in out, out
    assert cp.is_clean(work)
    assert (work / "out/b/log").read_text() == "started\nresumed\n"  # resumed from its checkpoint folder


@pytest.mark.slow
def test_an_entry_whose_dep_changed_while_it_ran_is_not_recorded(tmp_path):
    work = cp.make(tmp_path / "p", xs=("a",))
    (work / "EDIT_a").write_text("")  # the job edits code.txt (a dep) while it runs
    rc, out = cp.run_controller(work, backend="debug")
    assert rc == 1 and "inputs (code, params or data) changed since it was submitted" in out, out
    assert "finetune@a" in json.loads(cp.dvc(work, "status", "--json").stdout)
    assert "finetune@a" not in (work / "dvc.lock").read_text()


@pytest.mark.slow
def test_local_backend_two_jobs_equals_dvc_repro(tmp_path):
    work = cp.make(tmp_path / "p", xs=("a", "b", "c"))
    plain = cp.copy(work, tmp_path / "plain")
    assert cp.dvc(plain, "repro").returncode == 0
    rc, out = cp.run_controller(work, backend="local", jobs=2)
    assert rc == 0, out
    assert cp.is_clean(work)
    for rel in ("down.txt", "out/a/r", "out/c/log"):
        assert (work / rel).read_text().replace(str(work), "ROOT") == (plain / rel).read_text().replace(str(plain), "ROOT")
    lines = subprocess.run([sys.executable, "-m", "pipeline", "cluster", "status"], cwd=work, env=cp.env(),
                           capture_output=True, text=True).stdout.splitlines()
    assert lines[0].split() == ["entry", "job", "state", "elapsed", "log"] and len(lines) == 6  # every stage
    assert all(" recorded " in line and ".cluster/jobs/" in line for line in lines[1:]), lines


@pytest.mark.slow
def test_local_backend_runs_independent_stages_side_by_side_and_restores_from_the_run_cache(tmp_path):
    """--cluster local runs the whole DAG: the entries, independent of each other, overlap in
    time (two slots of one core each); a stage waits for the stages above it; a stage DVC's
    run cache holds for its inputs is checked out, not run, as `dvc repro` does. (Needs 2
    cores at least.)"""
    import datetime as dt

    work = cp.make(tmp_path / "p", xs=("a", "b"))
    (work / "sleep_s").write_text("6\n")  # long enough to overlap under load
    rc, out = cp.run_controller(work, backend="local", jobs=2)
    assert rc == 0 and "4 stages recorded" in out, out
    hist = json.loads(next((work / ".cluster/history").glob("submission-*.json")).read_text())["entries"]
    span = {k: (dt.datetime.fromisoformat(v["submitted"]), dt.datetime.fromisoformat(v["ended"]))
            for k, v in hist.items()}
    a, b = span["finetune@a"], span["finetune@b"]
    assert a[0] < b[1] and b[0] < a[1], span  # the two entries ran at the same time
    assert span["up"][1] <= min(a[0], b[0]) and span["down"][0] >= max(a[1], b[1]), span  # the DAG's order
    # a stage that is the only one that can run gets every free core; side by side, one each
    n = len(os.sched_getaffinity(0))
    cores = {x: int((work / f"cores_{x}.txt").read_text()) for x in ("up", "a", "b")}
    assert cores == {"up": n, "a": n // 2, "b": n // 2}, cores
    # k 1 -> 2 -> 1: the second change brings back outputs DVC's run cache holds for `up`
    for k in (2, 1):
        (work / "params.yaml").write_text(f"xs: [a, b]\nk: {k}\n")
        rc, out = cp.run_controller(work, backend="local", jobs=2)
        assert rc == 0, out
    assert "up restored from DVC's run cache" in out, out
    assert (work / "up.txt").read_text() == "up-1\n" and cp.is_clean(work)


def test_a_second_controller_is_refused(tmp_path):
    from pipeline.cluster.controller import ClusterError, Controller, Lock

    work = cp.make(tmp_path / "p")
    settings = config.load(None, work)
    with Lock(work, settings):
        with pytest.raises(ClusterError, match="another controller holds"):
            Controller(work, settings, "debug").repro()


@pytest.mark.slow
def test_a_local_run_whose_controller_dies_loses_no_finished_stage(tmp_path):
    """kill -9 of the controller while two stages run: the jobs finish on their own, `cluster
    collect` records them and calls the stage never started lost; the next run runs only that."""
    import time

    work = cp.make(tmp_path / "p", xs=("a", "b"))
    (work / "sleep_s").write_text("8\n")
    proc = cp.controller(work, backend="local", jobs=2)
    record = work / ".cluster/submission.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = json.loads(record.read_text())["entries"] if record.exists() else {}
        if all(states.get(f"finetune@{x}", {}).get("state") == "submitted" for x in ("a", "b")):
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert {k: v["state"] for k, v in json.loads(record.read_text())["entries"].items()} == {
        "up": "recorded", "finetune@a": "submitted", "finetune@b": "submitted", "down": "queued"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "cluster", "collect"], cwd=work, env=cp.env(),
                         capture_output=True, text=True).stdout
    assert "3 stages recorded in dvc.lock" in out and "down: lost" in out and "repro --jobs 2` again" in out, out
    status = json.loads(cp.dvc(work, "status", "--json").stdout)
    assert list(status) == ["down"], status  # both entries are in dvc.lock
    rc, out = cp.run_controller(work, backend="local", jobs=2)
    assert rc == 0 and "1 stage to run" in out and "1 stage recorded" in out, out
    assert cp.is_clean(work) and (work / "out/a/log").read_text() == "started\n"  # trained once
