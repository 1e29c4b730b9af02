"""A fresh project holding this repository's pipeline, for the end-to-end tests: the code,
dvc.yaml and pyproject copied, an environment with its own MLflow store, and a runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


SPACE = ("trials", "search")  # finetune's hand-written trials and search spaces: one search space


def merge(base: dict, extra: dict) -> dict:
    """params.yaml with `extra` merged in, key by key; the search space (finetune's `trials`
    and `search`) is replaced, not merged: given either, both are what `extra` says (absent =
    none)."""
    out = dict(base)
    if any(k in extra for k in SPACE):
        for k in SPACE:
            out[k] = extra.get(k, {})
    for k, v in extra.items():
        if k in SPACE:
            continue
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_trials(work: Path, env: dict) -> None:
    """`python -m pipeline search`: the generated trials.yaml dvc.yaml's finetune matrix reads."""
    sh([sys.executable, "-m", "pipeline", "search"], work, env)


def copy_pipeline(work: Path) -> dict:
    """Copy the pipeline into `work`; returns the environment its stages run in."""
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    return {**os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(work),
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
            "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def init_and_repro(work: Path, env: dict, ignore: str = "mlflow.db\nmlruns/\n") -> None:
    """trials.yaml, git + DVC init, one commit, then `dvc repro`."""
    write_trials(work, env)
    sh(["git", "init", "-q"], work, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], work, env)
    sh([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], work, env)
    (work / ".gitignore").write_text(ignore)
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "init"], work, env)
    sh([sys.executable, "-m", "dvc", "repro"], work, env)


def start_until(script: str, marker: Path, work: Path, env: dict, what: str) -> subprocess.Popen:
    """Start `python -c script` in the project and wait (up to 5 min) until it writes `marker`."""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), what
    return proc
