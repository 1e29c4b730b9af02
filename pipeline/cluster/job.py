"""What runs on a node: one DVC stage's command, unchanged, the way `dvc repro` runs it.

Same shell (`$SHELL -c cmd`, bash without rc files), cwd the stage's wdir, `DVC_ROOT` and
`DVC_STAGE` set, the stage's non-persist outputs removed first (its persist outputs, the
resumable checkpoints, are kept). A job that SLURM interrupts (preemption, `scontrol requeue`,
the time limit) runs again from the start of this function, and the stage resumes from its own
checkpoints: this function owns no state of its own.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import submitit

# how long an interrupted job waits for SLURM to kill and requeue it before calling it failed
INTERRUPT_GRACE_S = 300


class StageFailed(RuntimeError):
    """The stage's command exited non-zero."""


def _shell_cmd(cmd: str) -> list[str]:
    shell = os.getenv("SHELL") or "/bin/sh"
    opts = {"bash": ["--noprofile", "--norc"], "zsh": ["--no-rcs"]}.get(os.path.basename(shell).lower(), [])
    return [shell, *opts, "-c", cmd]


@dataclasses.dataclass
class StageJob(submitit.helpers.Checkpointable):
    """One grid entry: `stage` (its DVC address), the resolved `cmd`, `wdir`, the non-persist
    outputs to remove (`remove`, relative to wdir); `cpus` (cores to pin to) and `gpus`
    (CUDA_VISIBLE_DEVICES) only for the local backend; `threads` the default
    OMP_NUM_THREADS when the environment sets none."""

    stage: str
    cmd: str
    wdir: str
    root: str
    remove: tuple[str, ...] = ()
    cpus: tuple[int, ...] = ()
    gpus: tuple[int, ...] | None = None
    threads: int | None = None

    def __call__(self) -> dict:
        wdir = Path(self.wdir)
        for rel in self.remove:  # as DVC does before it runs a stage
            path = wdir / rel
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        env = dict(os.environ, DVC_ROOT=self.root, DVC_STAGE=self.stage)
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpus))
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) or None
        if threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        start = time.time()
        print(f"[{self.stage}] $ {self.cmd}", flush=True)
        proc = subprocess.Popen(_shell_cmd(self.cmd), cwd=wdir, env=env,
                                preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None)
        rc = proc.wait()
        if rc < 0 and -rc in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
            # SLURM is taking the job away (requeue, preemption, cancel): writing a failure here
            # would race the requeued run; wait to be killed, and fail only if nobody does
            print(f"[{self.stage}] stopped by signal {-rc}; waiting for SLURM to requeue or cancel", flush=True)
            time.sleep(INTERRUPT_GRACE_S)
        if rc != 0:
            raise StageFailed(f"{self.stage}: the command exited with status {rc}")
        return {"stage": self.stage, "seconds": round(time.time() - start, 1)}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Time limit or preemption (SIGUSR2): requeue the same call; the stage resumes from
        its own checkpoints (its child process dies with the job)."""
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self))
