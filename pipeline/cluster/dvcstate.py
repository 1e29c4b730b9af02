"""What the controller asks DVC: the grid's entries, the plan of a whole-DAG run, which stages
are stale, what a stage's command and inputs are, whether the run cache holds it; `dvc commit`
of a stage that ran elsewhere (in process) and `dvc repro` (a subprocess).

Everything here happens in the controller, one call at a time, never while a DVC subprocess
runs: exactly one process uses DVC at any time; the jobs never run DVC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from contextlib import contextmanager
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


def _entry(stage) -> Entry:
    wdir = Path(stage.wdir)
    remove = tuple(str(Path(o.fs_path).relative_to(wdir)) for o in stage.outs if not o.persist)
    return Entry(stage.addressing, stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd),
                 str(wdir), remove)


@dataclass(frozen=True)
class Plan:
    """What `repro` must run, dependencies first: every stage `dvc status` calls changed and
    every stage below one of those (its inputs are about to change: DVC too decides on those
    only once the stages above have run), with the stages each waits for."""

    entries: dict[str, Entry]   # in dvc.yaml's topological order
    after: dict[str, frozenset[str]]  # per stage, the planned stages it depends on (directly or not)


def plan(root: Path) -> Plan:
    import networkx as nx

    with _repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        changed = set(repo.status())
        by_name = {s.addressing: s for s in repo.index.stages}
        todo = set()
        for stage in repo.index.stages:
            if stage.addressing in changed:
                todo |= {stage.addressing} | {s.addressing for s in nx.ancestors(graph, stage)}
        order = [s.addressing for s in reversed(list(nx.topological_sort(graph))) if s.addressing in todo]
        after = {name: frozenset(s.addressing for s in nx.descendants(graph, by_name[name]) if s.addressing in todo)
                 for name in order}
        return Plan({name: _entry(by_name[name]) for name in order}, after)


@dataclass(frozen=True)
class Launch:
    """A planned stage, looked at once the stages above it are done: whether DVC calls it
    changed now, whether DVC's run cache holds its outputs for its current inputs (it ran with
    them before, in this project or another sharing the cache: `dvc repro` would check them
    out instead of running it), and its input digest (`input_digests`)."""

    stale: bool
    restorable: bool
    digest: str


@contextmanager
def _quiet_dvc():
    """DVC's own info lines off ("Stage ... is cached - skipping run" of a dry look, "Updating
    lock file"): the controller says what happened."""
    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def launch_check(root: Path, name: str) -> Launch:
    """`Launch` of one stage, from one in-process look at the project."""
    with _repo(root) as repo, _quiet_dvc():
        stage = next(s for s in repo.index.stages if s.addressing == name)
        if not repo.status(targets=[name]):
            return Launch(False, False, "")
        digest = _digest(stage)
        try:
            stage.save_deps()  # the deps' hashes, in memory: what the run cache is keyed by
            repo.stage_cache.restore(stage, dry=True)  # raises RunCacheNotFoundError when it holds none
            restorable = True
        except Exception:  # none, or nothing DVC can hash here: the stage runs
            restorable = False
        return Launch(True, restorable, digest)


def record(root: Path, name: str, digest: str) -> str:
    """Record a stage that ran elsewhere in dvc.lock (`dvc commit --force <stage>`, in
    process) if its inputs are still those it started with (`digest`): "recorded"; "changed"
    when they are not (it stays stale); else DVC's error, one line."""
    with _repo(root) as repo, _quiet_dvc():
        stage = next((s for s in repo.index.stages if s.addressing == name), None)
        if stage is None or _digest(stage) != digest:
            return "changed"
        try:
            repo.commit(name, force=True)
        except Exception as err:  # what `dvc commit` would print
            return f"dvc commit failed: {str(err).strip() or type(err).__name__}"
    return "recorded"


def stale_grid(root: Path) -> list[Entry]:
    """The grid entries `dvc status` calls changed, in dvc.yaml order."""
    with _repo(root) as repo:
        status = repo.status()
        out = []
        for s in repo.index.stages:
            if _is_grid(s) and s.addressing in status:
                out.append(_entry(s))
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
        return {name: _digest(by_name[name]) for name in stages if name in by_name}  # (an entry
        # no longer in dvc.yaml, a trial or level removed, has none)


def _digest(stage) -> str:
    deps = {}
    for dep in stage.deps:
        try:
            deps[dep.def_path] = repr(dep.get_hash().value)
        except Exception as err:  # a dependency that is missing now
            deps[dep.def_path] = f"missing: {type(err).__name__}"
    blob = json.dumps({"cmd": stage.cmd, "deps": deps}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def dvc(root: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """One DVC command as a subprocess of this (the only DVC-running) process."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, text=True,
                          capture_output=capture)
