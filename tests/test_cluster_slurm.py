"""The cluster runner through a real single-node SLURM (`.ci/slurm-up` starts one; CI runs it
before the suite): job arrays, requeue (preemption), a failing entry, a controller killed and
`cluster collect`, `--detach`. On the small DVC project of tests/cluster_project.py; the real
pipeline's equivalence with `dvc repro` is tests/test_cluster_e2e.py."""

import json
import shutil
import subprocess
import time

import pytest

from tests import cluster_project as cp


def _sinfo_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not _sinfo_answers(), reason="no SLURM cluster answers sinfo (run .ci/slurm-up as root)")]


def _record(work):
    path = work / ".cluster/submission.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _wait_for(what, cond, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.split()
    return out[0] if out else ""


def test_the_grid_runs_as_a_job_array_and_dvc_is_clean(tmp_path):
    work = cp.make(tmp_path / "p")
    rc, out = cp.run_controller(work)
    assert rc == 0, out
    assert "as SLURM job array" in out and "2 of 2 entries recorded" in out
    assert cp.is_clean(work)
    lines = subprocess.run([cp.sys.executable, "-m", "pipeline", "cluster", "status"], cwd=work, env=cp.env(),
                           capture_output=True, text=True).stdout.splitlines()
    assert len(lines) == 3 and all("recorded (COMPLETED)" in line for line in lines[1:]), lines
    array = lines[1].split()[1].split("_")[0]
    assert [line.split()[1] for line in lines[1:]] == [f"{array}_0", f"{array}_1"]  # one array, one element each


def test_a_requeued_element_resumes_and_is_recorded(tmp_path):
    work = cp.make(tmp_path / "p", xs=("a",))
    (work / "sleep_s").write_text("6")
    plain = cp.copy(work, tmp_path / "plain")
    proc = cp.controller(work)
    job = _wait_for("the job id", lambda: (_record(work).get("entries", {}).get("finetune@a") or {}).get("job_id"))
    _wait_for("the element to run", lambda: _state(job) == "RUNNING" and (work / "ck/a/started").exists())
    subprocess.run(["scontrol", "requeue", job], check=True)  # what preemption does
    # SLURM holds a requeued job back for two minutes (its begin time); start it now
    _wait_for("the requeue", lambda: _state(job) == "PENDING")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert (work / "out/a/log").read_text() == "started\nresumed\n"  # the rerun resumed from its checkpoint
    assert cp.is_clean(work)
    assert cp.dvc(plain, "repro").returncode == 0
    assert (work / "down.txt").read_text().replace(str(work), "R") == (plain / "down.txt").read_text().replace(str(plain), "R")


def test_a_failing_entry_shows_its_log_and_the_other_is_recorded(tmp_path):
    work = cp.make(tmp_path / "p")
    (work / "FAIL_a").write_text("")
    rc, out = cp.run_controller(work)
    assert rc == 1, out
    assert "finetune@a FAILED" in out and ".cluster/jobs/" in out and "1 of 2 entries recorded" in out, out
    status = json.loads(cp.dvc(work, "status", "--json").stdout)
    assert "finetune@a" in status and "finetune@b" not in status


def test_a_killed_controller_then_collect(tmp_path):
    work = cp.make(tmp_path / "p")
    (work / "sleep_s").write_text("4")
    proc = cp.controller(work)
    _wait_for("the submission", lambda: all((e or {}).get("job_id") for e in _record(work).get("entries", {None: None}).values()))
    proc.kill()  # the controller dies while the jobs run
    proc.communicate()
    rc, out = cp.run_controller(work, call="collect()")
    assert rc == 0, out
    assert "2 of 2 entries recorded" in out
    assert cp.is_clean(work)
    assert (work / "out/a/log").read_text() == "started\n"  # submitted once, never resubmitted


def test_detach_submits_the_chain_and_exits(tmp_path):
    work = cp.make(tmp_path / "p")
    (work / "sleep_s").write_text("2")
    start = time.time()
    rc, out = cp.run_controller(work, call="repro(detach=True)")
    assert rc == 0 and "detached" in out, out
    collector = _record(work)["collector"]
    assert not (work / "down.txt").exists()  # it returned before the grid ended
    _wait_for("the collecting job", lambda: _state(collector) == "" and not (work / ".cluster/submission.json").exists(),
              timeout=300)
    assert cp.is_clean(work), (work / ".cluster/jobs").glob("*")
    assert time.time() - start < 300
