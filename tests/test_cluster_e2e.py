"""The acceptance check of the cluster runner on the real pipeline: a tiny configuration (one
level, two trials, one seed) run by `python -m pipeline repro --cluster slurm`, by `python -m
pipeline repro --jobs 2` (every stage a local job, two at a time) and by a plain `dvc repro`,
each in a copy of the same commit, gives identical metrics, weights and report
(the run's own wall time and peak memory aside), and leaves DVC with nothing to do. The plain
run has OMP_NUM_THREADS unset (torch's default: one thread per core) and the SLURM jobs have
it at 1: params.yaml's `threads` sets the count that affects the arithmetic, so the CPUs a job
gets do not change its result. (The local backend's bookkeeping: tests/test_cluster.py, on a
toy project.)"""

import csv
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.e2e_project import ROOT, copy_pipeline, sh, write_trials
from tests.test_cluster_slurm import _sinfo_answers
from tests.test_e2e import TINY, merge

pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not _sinfo_answers(), reason="no SLURM cluster answers sinfo (run .ci/slurm-up as root)")]

# measurements of the run, not results: they differ between any two runs
MEASURED = ("wall_time", "peak_memory")
UPSTREAM = ["check", "prepare", "images", "pretrained", "vision", "embed", "sample"]

SMALL = merge(TINY, {"sample": {"levels": [4], "seeds": [0]},
                     "finetune": {"methods": ["lp", "ft"],
                                  "trials": {"lp-a": {"method": "lp"}, "ft-a": {"method": "ft"}}}})


def _project(work):
    env = copy_pipeline(work)
    env.pop("OMP_NUM_THREADS", None)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SMALL)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "cluster.yaml").write_text("cpus_per_job: 1\ntime_min: 30\npoll_s: 1\n")
    (work / ".gitignore").write_text("mlflow.db\nmlruns/\n.cluster/\n")
    write_trials(work, env)
    sh(["git", "init", "-q"], work, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], work, env)
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "init"], work, env)
    return env


def _results(path):
    if path.suffix == ".csv":
        rows = list(csv.DictReader(path.open()))
        return [{k: v for k, v in r.items() if not any(m in k for m in MEASURED)} for r in rows]
    return {k: v for k, v in json.loads(path.read_text()).items() if not any(m in k for m in MEASURED)}


def test_cluster_repro_equals_dvc_repro(tmp_path):
    """The stages above the grid run once, in one project committed to git; copies of it (same
    commit, same dvc.lock, same cache): a plain `dvc repro` in the first, `repro --cluster
    slurm` in the second, `repro --cluster local --jobs 2` in the third, side by side, each
    training the grid and running what follows it."""
    plain = tmp_path / "plain"
    plain.mkdir()
    env_p = _project(plain)
    sh([sys.executable, "-m", "dvc", "repro", *UPSTREAM], plain, env_p)
    copies = {}
    for backend in ("slurm", "local"):
        work = tmp_path / backend
        shutil.copytree(plain, work, symlinks=True)
        copies[backend] = (work, {**env_p, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1",
                                  "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"})
    procs = {"plain": subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=plain, env=env_p, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)}
    for backend, (work, env) in copies.items():
        jobs = "2" if backend == "local" else "1"  # local: two stages at a time, one core each
        procs[backend] = subprocess.Popen([sys.executable, "-m", "pipeline", "repro", "--cluster", backend, "--jobs",
                                           jobs], cwd=work, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    outs = {name: proc.communicate(timeout=1800)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outs[name][-3000:]}"
    assert "submitted 2 entries as SLURM job array" in outs["slurm"] and "2 of 2 entries recorded" in outs["slurm"]
    # locally every stale stage is a job: the grid, selection, evaluate per method, report
    assert "6 stages recorded in dvc.lock" in outs["local"], outs["local"][-3000:]
    for backend, (work, env) in copies.items():
        status = sh([sys.executable, "-m", "pipeline", "cluster", "status"], work, env).stdout.splitlines()
        assert len(status) == (3 if backend == "slurm" else 7), status
        assert all(" recorded" in line for line in status[1:]), status
        if backend == "slurm":
            assert all("recorded (COMPLETED)" in line for line in status[1:]), status  # SLURM job ids, via sacct
        assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout) == {}
        assert "Running stage" not in sh([sys.executable, "-m", "dvc", "repro", "--dry"], work, env).stdout
        for rel in ("reports/summary.csv", "metrics/report.json", "metrics/methods/lp.json", "metrics/methods/ft.json",
                    "runs/evaluate/ft/4/seed0/metrics.json", "runs/evaluate/lp/4/seed0/metrics.json"):
            assert _results(work / rel) == _results(plain / rel), (backend, rel)
        for trial in ("lp-a", "ft-a"):
            w = f"runs/finetune/{trial}/4/seed0/weights.safetensors"
            assert (work / w).read_bytes() == (plain / w).read_bytes(), (backend, trial)
