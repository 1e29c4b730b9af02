"""The grid's wall time: `python -m pipeline repro --cluster slurm` (a job array on the local
single-node SLURM of .ci/slurm-up, `cpus_per_job: 1`, so 2 entries at a time on 2 cores)
against a plain `dvc repro`, on the same machine, the same params and the same commit.

Two copies of a tiny project (tests/test_cluster_e2e.py's configuration with 4 trials at one
level); the stages above the grid run first in both (not timed), then the timed part: the
grid and the stages after it. Prints a Markdown table.

    python benchmarks/bench_cluster.py            # needs `sinfo` to answer (.ci/slurm-up)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from tests.e2e_project import copy_pipeline, sh, write_trials  # noqa: E402
from tests.test_cluster_e2e import _results  # noqa: E402  (results, without the run's own wall time / memory)
from tests.test_e2e import TINY, merge  # noqa: E402

GRID = merge(TINY, {"sample": {"levels": [4], "seeds": [0]},
                    "finetune": {"methods": ["lp", "ft"],
                                 "trials": {"lp-a": {"method": "lp"}, "lp-b": {"method": "lp", "lr": 0.003},
                                            "ft-a": {"method": "ft"}, "ft-b": {"method": "ft", "lr": 3e-4}}}})
UPSTREAM = ["check", "prepare", "images", "pretrained", "vision", "embed", "sample"]


def project(work: Path, threads: int) -> dict:
    work.mkdir()
    env = copy_pipeline(work)
    env["OMP_NUM_THREADS"] = str(threads)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), GRID)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "cluster.yaml").write_text("cpus_per_job: 1\ntime_min: 60\npoll_s: 1\n")
    (work / ".gitignore").write_text("mlflow.db\nmlruns/\n.cluster/\n")
    write_trials(work, env)  # trials.yaml, which dvc.yaml's finetune matrix reads
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"], [sys.executable, "-m", "dvc", "repro", *UPSTREAM]):
        sh(cmd, work, env)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every stage (default 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, cluster = Path(tmp) / "plain", Path(tmp) / "cluster"
        env_p, env_c = project(plain, args.threads), project(cluster, args.threads)
        t0 = time.perf_counter()
        sh([sys.executable, "-m", "dvc", "repro"], plain, env_p)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        sh([sys.executable, "-m", "pipeline", "repro", "--cluster", "slurm"], cluster, env_c)
        t_cluster = time.perf_counter() - t0
        same = _results(plain / "reports/summary.csv") == _results(cluster / "reports/summary.csv")
    print("| grid (4 finetune entries) + selection, evaluate, report | wall s |")
    print("|---|---|")
    print(f"| `dvc repro` (one stage at a time) | {t_plain:.0f} |")
    print(f"| `repro --cluster slurm`, 2 jobs at a time | {t_cluster:.0f} |")
    print(f"\nspeed-up {t_plain / t_cluster:.2f}x; reports/summary.csv identical (but the wall-time and "
          f"peak-memory columns): {same}")


if __name__ == "__main__":
    main()
