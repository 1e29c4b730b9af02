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
