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

# each write records when it ran, so the test can see the two experiments overlap
DVC_YAML = textwrap.dedent("""\
    stages:
      write:
        matrix:
          name: ${items}
        cmd: >-
          python -c "import time, yaml; t0 = time.time(); time.sleep(2);
          p = yaml.safe_load(open('params.yaml'));
          open('out/${item.name}.txt', 'w').write(str(p['scale'] * len('${item.name}')));
          open(r'LOG', 'a').write(f'{t0} {time.time()}\\n')"
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
    (repo / "dvc.yaml").write_text(DVC_YAML.replace("LOG", str(log)))
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

    # two workers: some write of one experiment ran while one of the other ran
    spans = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    assert len(spans) == 4
    overlapping = sum(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans)
                      for (b0, b1) in spans[i + 1:])
    assert overlapping >= 1, f"the experiments ran one after the other: {spans}"
