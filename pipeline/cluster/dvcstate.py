"""What the controller asks DVC: the grid's entries, which are stale, what an entry's command
and inputs are, and (as a subprocess, one at a time) `dvc repro` and `dvc commit`.

The in-process reads (`dvc.repo.Repo`) happen only while no DVC subprocess runs, so exactly one
process uses DVC at any time; the jobs never run DVC.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

GRID = "finetune"  # the matrix stage whose entries are the grid


@dataclass(frozen=True)
class Entry:
    """One stage to run elsewhere: its DVC address, resolved command, wdir and the
    non-persist outputs DVC would remove before running it (relative to wdir)."""

    stage: str
    cmd: str
    wdir: str
    remove: tuple[str, ...]


def _repo(root: Path):
    from dvc.repo import Repo

    return Repo(str(root))


def _is_grid(stage) -> bool:
    return stage.addressing.split("@", 1)[0] == GRID and "@" in stage.addressing


def upstream_stages(root: Path) -> list[str]:
    """Every stage a grid entry depends on (directly or not), e.g. check … sample."""
    import networkx as nx

    with _repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        grid = [s for s in repo.index.stages if _is_grid(s)]
        above = set()
        for s in grid:
            above |= nx.descendants(graph, s)
        return sorted(s.addressing for s in above if not _is_grid(s))


def grid_entries(root: Path) -> list[str]:
    with _repo(root) as repo:
        return [s.addressing for s in repo.index.stages if _is_grid(s)]


def stale_grid(root: Path) -> list[Entry]:
    """The grid entries `dvc status` calls changed, in dvc.yaml order."""
    with _repo(root) as repo:
        status = repo.status()
        out = []
        for s in repo.index.stages:
            if _is_grid(s) and s.addressing in status:
                wdir = Path(s.wdir)
                remove = tuple(str(Path(o.fs_path).relative_to(wdir)) for o in s.outs if not o.persist)
                out.append(Entry(s.addressing, s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd),
                                 str(wdir), remove))
        return out


def stale(root: Path, stages: list[str] | None = None) -> list[str]:
    with _repo(root) as repo:
        status = repo.status()
        return [k for k in status if stages is None or k in stages]


def input_digests(root: Path, stages: list[str]) -> dict[str, str]:
    """Per stage, a SHA-256 over its command and the DVC hash of every dependency (code and data
    files and folders, the values of its params): what DVC compares to decide it is stale."""
    with _repo(root) as repo:
        by_name = {s.addressing: s for s in repo.index.stages}
        out = {}
        for name in stages:
            stage = by_name.get(name)
            if stage is None:  # the entry left dvc.yaml (a trial or level removed)
                continue
            deps = {}
            for dep in stage.deps:
                try:
                    deps[dep.def_path] = repr(dep.get_hash().value)
                except Exception as err:  # a dependency that is missing now
                    deps[dep.def_path] = f"missing: {type(err).__name__}"
            blob = json.dumps({"cmd": stage.cmd, "deps": deps}, sort_keys=True, default=str)
            out[name] = hashlib.sha256(blob.encode()).hexdigest()
        return out


def dvc(root: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """One DVC command as a subprocess of this (the only DVC-running) process."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, text=True,
                          capture_output=capture)
