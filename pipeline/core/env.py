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
