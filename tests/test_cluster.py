"""The cluster runner's bookkeeping, fast: submitit's debug executor (in-process) and the local
backend on a small DVC project (tests/cluster_project.py); cluster.yaml's errors. The same
controller through a real SLURM: tests/test_cluster_slurm.py."""

import json
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
    assert "finetune@b FAILED" in out and "log: " in out and "1 of 2 entries recorded" in out, out
    # the stage's own error is shown, not only submitit's trace of the job's exception
    shown = [line for line in out.splitlines() if line.startswith("  | ")]
    assert shown[-1] == "  | entry b told to fail by FAIL_b" and "Traceback" not in "".join(shown), out
    status = json.loads(cp.dvc(work, "status", "--json").stdout)
    assert "finetune@a" not in status and "finetune@b" in status and "down" in status  # downstream not run
    assert not (work / "down.txt").exists()
    (work / "FAIL_b").unlink()  # fixed: only the stale entry is submitted again
    rc, out = cp.run_controller(work, backend="local", jobs=2)
    assert rc == 0 and "1 of 1 entries recorded" in out, out
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
    assert lines[0].split() == ["entry", "job", "state", "elapsed", "log"] and len(lines) == 4
    assert all(" recorded " in line and ".cluster/jobs/" in line for line in lines[1:]), lines


def test_a_second_controller_is_refused(tmp_path):
    from pipeline.cluster.controller import ClusterError, Controller, Lock

    work = cp.make(tmp_path / "p")
    settings = config.load(None, work)
    with Lock(work, settings):
        with pytest.raises(ClusterError, match="another controller holds"):
            Controller(work, settings, "debug").repro()
