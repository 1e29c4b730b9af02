"""Process-wide environment: offline defaults, quiet version checks, seeding, devices."""

from __future__ import annotations

import os
import random
import sys
import types

# Defaults only: a user who sets these keeps their value.
_OFFLINE_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def setup_offline() -> None:
    """Make imports safe on machines without internet.

    `import wilds` / `import ogb` start a thread that asks PyPI for newer versions (the
    `outdated` package); a stub module with `check_outdated = None` turns that off.
    """
    for key, value in _OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "outdated" not in sys.modules:
        stub = types.ModuleType("outdated")
        stub.check_outdated = None  # type: ignore[attr-defined]
        stub.warn_if_outdated = lambda *a, **k: None  # type: ignore[attr-defined]
        sys.modules["outdated"] = stub


# how many middle-generation collections may pass between two full ones (CPython's default: 10)
FULL_GC_EVERY = 100


def short_process_gc() -> None:
    """Garbage collection for a process that imports a great deal and ends: a stage.

    CPython runs a full collection whenever 10 middle ones have passed and the objects that
    survived collections have grown by a quarter since the last full one. A stage's imports
    (torch, open_clip, timm, wilds, MLflow, SQLAlchemy: ~700,000 objects, none of them garbage)
    grow them by a quarter again and again: ~9 full collections per process, each one walking
    every object imported so far: ~1 s of CPU in a tiny finetune entry, finding nothing to free.
    A full collection at most every FULL_GC_EVERY middle ones (~700,000 net allocations) leaves
    one or two; the young and middle generations, which free almost all cyclic garbage (and a
    training step's), are collected as before. Only when memory is freed changes, never a value.
    (`freeze_for_exit` spares the last full collection, the interpreter's own at exit.)"""
    import gc

    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, max(full, FULL_GC_EVERY))


def freeze_for_exit() -> None:
    """Before a stage process ends: move every object to the collector's permanent generation,
    so the interpreter's shutdown does not walk them all once more (~0.3-0.7 s after a finetune
    entry's imports) to find garbage the ending process is about to give back anyway. What a
    stage writes is closed (and MLflow's store committed) before it returns, so nothing waits on
    a collection to be flushed."""
    import gc

    gc.freeze()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (signal 0: nothing is sent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# the variables thread pools read when they start: libraries loaded later (scipy's own BLAS)
# and child processes (torchrun's ranks) start with the count params set
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def set_threads(n: int) -> None:
    """Run this process's arithmetic on `n` threads (params.yaml `threads`), whatever the
    machine or OMP_NUM_THREADS say: torch's intra-op pool, the BLAS/OpenMP pools already
    loaded (threadpoolctl) and, through the environment, those loaded later. A CPU result
    depends on the count (it splits the sums), so a stage calls this before computing.

    Inter-op threads are left alone: they only run independent ops side by side (TorchScript
    forks), never split one op's arithmetic, and torch refuses to change them once used."""
    import torch
    from threadpoolctl import threadpool_limits

    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    threadpool_limits(limits=n)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
