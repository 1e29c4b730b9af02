"""The grid mechanism the README documents, on a throw-away DVC project (not the pipeline):
queue experiments with `dvc exp run --queue -S ...`, run them with
`dvc queue start --jobs 2`, read every result back with `dvc exp show --json`.

The project: `params.yaml` (scale, items), a matrix stage writing one file per item and a
stage summing them into a metric. One experiment overrides a scalar, the other a list (as in
`-S 'finetune.methods=[ft]'`), which changes the matrix itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PARAMS = "scale: 1\nitems: [a, bb]\n"

# Each write runs `write.py`: it leaves a marker naming its experiment in a shared directory and
# waits (up to WAIT s) for a marker of the other experiment before it writes. Two workers that
# really run side by side meet at once; one worker running both in turn never meets, and the log
# says so. The parallelism check is an event, not a race between timestamps.
WRITE_PY = textwrap.dedent("""\
    import pathlib, sys, time, yaml
    name, barrier, log, wait = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    p = yaml.safe_load(open("params.yaml"))
    exp = f"{p['scale']}-{'_'.join(p['items'])}"
    barrier.mkdir(exist_ok=True)
    (barrier / exp).touch()
    t0 = time.time()
    def met():
        return any(m.name != exp for m in barrier.iterdir())
    while not met() and time.time() < t0 + wait:
        time.sleep(0.2)
    open(f"out/{name}.txt", "w").write(str(p["scale"] * len(name)))
    open(log, "a").write(f"{exp} {name} {t0:.3f} {time.time():.3f} {met()}\\n")
""")
WAIT = 240

DVC_YAML = textwrap.dedent("""\
    stages:
      write:
        matrix:
          name: ${items}
        cmd: python write.py ${item.name} BARRIER LOG WAIT
        deps:
          - write.py
        params:
          - scale
        outs:
          - out/${item.name}.txt
      total:
        cmd: >-
          python -c "import json, pathlib; json.dump({'total': sum(int(f.read_text())
          for f in pathlib.Path('out').glob('*.txt'))}, open('metrics.json', 'w'))"
        deps:
          - out
        metrics:
          - metrics.json:
              cache: false
""")

TIMEOUT = 600  # generous: a busy 2-core CI box can be slow to start the workers


def _dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # `dvc queue start` spawns its workers as the `dvc` found on PATH, not as this interpreter's
    # module: the environment's bin directory must come first, or no worker ever starts.
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)


def _experiments(show: list[dict]) -> dict[str, dict]:
    """name -> data of every experiment in `dvc exp show --json`."""
    out = {}
    for row in show:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                out[rev["name"]] = rev["data"]
    return out


@pytest.mark.slow
def test_queue_two_experiments_in_parallel(tmp_path):
    pytest.importorskip("dvc")
    pytest.importorskip("dvc_task")
    repo = tmp_path / "project"
    repo.mkdir()
    log = tmp_path / "runs.log"
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "test@example.com")
    _git(repo, "config", "user.name", "test")
    _dvc(repo, "init", "-q")
    (repo / "params.yaml").write_text(PARAMS)
    (repo / "write.py").write_text(WRITE_PY)
    (repo / "dvc.yaml").write_text(DVC_YAML.replace("BARRIER", str(tmp_path / "barrier"))
                                   .replace("LOG", str(log)).replace("WAIT", str(WAIT)))
    (repo / "out").mkdir()
    (repo / "out" / ".keep").write_text("")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "project")

    _dvc(repo, "exp", "run", "--queue", "-S", "scale=2", "-n", "scaled")
    _dvc(repo, "exp", "run", "--queue", "-S", "items=[a,ccc]", "-n", "listed")
    _dvc(repo, "queue", "start", "--jobs", "2")

    deadline = time.monotonic() + TIMEOUT
    while True:
        status = _dvc(repo, "queue", "status").stdout
        if not any(s in status for s in ("Queued", "Running")):
            break
        if time.monotonic() > deadline:
            worker_logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}"
                                     for p in sorted((repo / ".dvc" / "tmp").rglob("*.log")))
            raise AssertionError(f"queue still busy after {TIMEOUT} s:\n{status}\n{worker_logs}")
        time.sleep(2)
    if "Failed" in status:
        logs = "\n".join(_dvc(repo, "queue", "logs", n, check=False).stdout for n in ("scaled", "listed"))
        raise AssertionError(f"an experiment failed:\n{status}\n{logs}")

    exps = _experiments(json.loads(_dvc(repo, "exp", "show", "--json").stdout))
    assert {"scaled", "listed"} <= set(exps), sorted(exps)
    scaled, listed = exps["scaled"], exps["listed"]
    assert scaled["params"]["params.yaml"]["data"]["scale"] == 2
    assert listed["params"]["params.yaml"]["data"]["items"] == ["a", "ccc"]
    assert scaled["metrics"]["metrics.json"]["data"] == {"total": 2 * (1 + 2)}
    assert listed["metrics"]["metrics.json"]["data"] == {"total": 1 + 3}
    # the workspace is untouched: the experiments ran in their own temporary copies
    assert not (repo / "metrics.json").exists()

    # two workers: each experiment's first write met the other experiment while it waited
    runs = [line.split() for line in log.read_text().splitlines()]
    assert sorted((exp, name) for exp, name, *_ in runs) == [
        ("1-a_ccc", "a"), ("1-a_ccc", "ccc"), ("2-a_bb", "a"), ("2-a_bb", "bb")], runs
    assert all(met == "True" for *_, met in runs), (
        f"the experiments ran one after the other (a write waited {WAIT} s for the other "
        f"experiment and never saw it): {runs}")
