"""A small DVC project for the cluster runner's tests: an upstream stage, a `finetune` matrix
(two entries) whose command resumes from a persisted checkpoint folder as the real stage
does, and a downstream stage. Stands in for the real pipeline where the test is about the
controller's bookkeeping, not about what a stage computes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the entry's command: a checkpoint marker in its persisted checkpoint folder makes a rerun
# "resume" (it appends to the log instead of starting over); FAIL_<x> makes it fail; SLEEP_S
# keeps it running long enough to be requeued or killed; EDIT_<x> makes it edit a dep (code.txt)
# while it runs, as a user editing the code under a running job. cores_<x>.txt (not an output):
# the cores it could use (GNU nproc prints OMP_NUM_THREADS when that is set: unset here)
ENTRY = ("mkdir -p out/${item.x} ck/${item.x} && env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc > cores_${item.x}.txt && "
         "if [ -f ck/${item.x}/started ]; then echo resumed >> ck/${item.x}/log; "
         "else touch ck/${item.x}/started; echo started >> ck/${item.x}/log; fi && "
         "sleep $(cat sleep_s 2>/dev/null || echo 0) && "
         "(test ! -f FAIL_${item.x} || (echo entry ${item.x} told to fail by FAIL_${item.x} >&2; false)) && "
         "if [ -f EDIT_${item.x} ]; then echo edited >> code.txt; fi && "
         "cat up.txt code.txt > out/${item.x}/r && echo $DVC_STAGE $DVC_ROOT >> out/${item.x}/r && "
         "cp ck/${item.x}/log out/${item.x}/log && rm ck/${item.x}/started")

DVC_YAML = f"""stages:
  up:
    cmd: echo up-${{k}} > up.txt && env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc > cores_up.txt
    params: [k]
    outs: [up.txt]
  finetune:
    matrix:
      x: ${{xs}}
    cmd: {ENTRY}
    deps:
      - up.txt
      - code.txt
    params:
      - k
    outs:
      - out/${{item.x}}
      - ck/${{item.x}}:
          persist: true
          cache: false
  down:
    cmd: sh down.sh
    deps: [out, down.sh]
    outs: [down.txt]
    metrics:
      - metrics/methods/toy.json:
          cache: false
"""
# the downstream stage: the entries' results, and a headline metric per level in the format
# `leaderboard` reads (metrics/methods/<method>.json): here k, read back from up.txt
DOWN_SH = ("cat out/*/r > down.txt && mkdir -p metrics/methods && "
           "printf '{\"4/ood\": %s}\\n' \"$(cut -d- -f2 up.txt)\" > metrics/methods/toy.json\n")


def env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "SHELL": "/bin/bash"}


def make(work: Path, xs=("a", "b"), cluster_yaml: str = "cpus_per_job: 1\ntime_min: 10\npoll_s: 0.5\n") -> Path:
    work.mkdir(parents=True, exist_ok=True)
    (work / "dvc.yaml").write_text(DVC_YAML)
    (work / "params.yaml").write_text(f"xs: [{', '.join(xs)}]\nk: 1\n")
    (work / "code.txt").write_text("code v1\n")
    (work / "down.sh").write_text(DOWN_SH)
    (work / "cluster.yaml").write_text(cluster_yaml)
    (work / ".gitignore").write_text("/.cluster/\n")
    e = env()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=work, env=e, check=True, capture_output=True)
    return work


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def controller(work: Path, call: str = "repro()", backend: str = "slurm", jobs: int = 1, **popen) -> subprocess.Popen:
    """The controller in its own process, as `python -m pipeline repro --cluster` runs it (the
    CLI's params check is for the real pipeline's params.yaml, so the toy calls it directly)."""
    code = ("import sys; from pathlib import Path; from pipeline.cluster import config; "
            "from pipeline.cluster.controller import Controller; root = Path.cwd(); "
            f"sys.exit(Controller(root, config.load(None, root), {backend!r}, {jobs}).{call})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=work, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def run_controller(work: Path, call: str = "repro()", backend: str = "slurm", jobs: int = 1,
                   timeout: float = 300) -> tuple[int, str]:
    proc = controller(work, call, backend, jobs)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def dvc(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, env=env(), capture_output=True, text=True)


def is_clean(work: Path) -> bool:
    import json

    out = dvc(work, "status", "--json").stdout
    dry = dvc(work, "repro", "--dry").stdout
    return json.loads(out) == {} and "Running stage" not in dry
