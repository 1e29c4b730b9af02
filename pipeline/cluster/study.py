"""A study: one DVC experiment per setting of a few params (the five WILDS datasets, the tasks of
the synthetic family), run from one command, each grid on the cluster.

`python -m pipeline study -S dataset.name=iwildcam,fmow --cluster slurm` expands its `-S`
options the way `dvc exp run --queue -S` does (comma-separated values: one experiment per
combination), and gives each experiment a workspace of its own: a git worktree of HEAD under
`.studies/<name>/`, carrying the project's uncommitted edits and untracked files, with the
setting written into its params.yaml and the project's DVC cache as its cache (nothing is stored
twice, and what two experiments share, e.g. the pre-trained model, is computed in one and
checked out in the other). In each workspace `python -m pipeline repro --cluster …` runs: its
own `dvc repro` of the stages above the grid, the grid as jobs, the stages after it; then the
workspace is saved as a DVC experiment (`dvc exp save`) in the project's git repository, so
`leaderboard`, `compare` and `crosstask` read it from the project like any `dvc exp run`.

The workspaces run side by side (`--parallel`, default: all of them on SLURM, one at a time on
this machine): each is a repository of its own, so each has its own DVC lock and controller.
Every job logs to one MLflow tracking server on the project's store, started for the study;
each experiment's runs go to their own MLflow experiment (`<dataset> [<name>]`,
`tracking.experiment_name`), never replacing the project's runs. Running the study again
reuses the workspaces: each keeps its dvc.lock and outputs, so only what is stale runs (a
changed commit, an edit, a new value of `-S`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

FOLDER = ".studies"


class StudyError(RuntimeError):
    """A user-facing problem: one line, exit 1."""


@dataclass(frozen=True)
class Experiment:
    name: str
    sets: tuple[tuple[str, object], ...]  # (dotted params key, value), in -S order


def _value(text: str) -> object:
    """A -S value as YAML reads it (`16` an int, `25%` a string, `[1, 16]` a list), as DVC does."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _split(values: str) -> list[str]:
    """Comma-separated values, commas inside [...] or {...} kept (a list value stays one value)."""
    out, depth, cur = [], 0, ""
    for ch in values:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def _slug(value: object) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return re.sub(r"[^A-Za-z0-9._]+", "_", str(text).replace("%", "pct")).strip("._") or "x"


def expand(sets: list[str], prefix: str | None = None) -> list[Experiment]:
    """The experiments of `-S key=v1,v2 …` options: one per combination of values, in order.
    Each is named by the values that vary (`iwildcam`, `fmow-16`), after `prefix` if given."""
    if not sets:
        raise StudyError("-S: give at least one, e.g. -S dataset.name=iwildcam,fmow (one experiment per value)")
    axes = []
    for s in sets:
        key, eq, values = s.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise StudyError(f"-S {s!r}: expected key=value[,value...], e.g. dataset.name=iwildcam,fmow")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise StudyError(f"-S {s!r}: {key!r} is not a params.yaml key (dotted names: dataset.name, sample.levels)")
        if key in (k for k, _ in axes):
            raise StudyError(f"-S {key}: given twice; list its values once, comma-separated")
        vals = [v for v in _split(values) if v]
        if len(set(vals)) != len(vals):
            raise StudyError(f"-S {s!r}: a value is listed twice")
        axes.append((key, [_value(v) for v in vals]))
    out, names = [], set()
    # named by the values that vary (a -S with one value is a setting of every experiment); one
    # experiment with a prefix is named by the prefix alone (a recipe: `--name robust`)
    varying = [i for i, (_, vals) in enumerate(axes) if len(vals) > 1]
    if not varying and not prefix:
        varying = list(range(len(axes)))
    for combo in itertools.product(*(vals for _, vals in axes)):
        parts = [_slug(combo[i]) for i in varying]
        name = "-".join(([_slug(prefix)] if prefix else []) + parts)
        if name in names:
            raise StudyError(f"-S: two experiments would both be named {name!r}; give values that differ in letters "
                             "or digits")
        names.add(name)
        out.append(Experiment(name, tuple(zip((k for k, _ in axes), combo))))
    return out


def _git(root: Path, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, **kw)
    if check and proc.returncode:
        raise StudyError(f"git {' '.join(args)} (in {root}): {(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def _set_params(path: Path, sets: tuple[tuple[str, object], ...]) -> None:
    """Write each dotted key's value into params.yaml, keeping its comments and order (DVC's
    own YAML round trip, as `dvc exp run -S` does)."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(path) as data:
        for key, value in sets:
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    if part in node:
                        raise StudyError(f"-S {key}: params.yaml's {part} is not a section")
                    node[part] = {}
                node = node[part]
            node[parts[-1]] = value


def _git_ignored_metrics(ws: Path) -> list[str]:
    """The workspace's metrics and plots kept out of the DVC cache (`cache: false`): git holds
    them, but the project's .gitignore leaves them out (they are outputs), so `dvc exp save`
    must be told to take them, or `dvc exp show` would find none of the experiment's figures."""
    from dvc.repo import Repo

    with Repo(str(ws)) as repo:
        outs = [out for stage in repo.index.stages for out in stage.outs
                if (out.metric or out.plot) and not out.use_cache]
        paths = [os.path.relpath(out.fs_path, repo.root_dir) for out in outs]
    return [p for p in paths if (ws / p).exists()]


class Study:
    """The study's workspaces under `<root>/.studies/`, and their runs."""

    def __init__(self, root: Path, echo: Callable[[str], None] = print):
        self.root = root.resolve()
        self.dir = self.root / FOLDER
        self.echo = echo
        self._lock = threading.Lock()

    def workspace(self, exp: Experiment) -> Path:
        """The experiment's workspace, made or brought to HEAD (+ the project's uncommitted
        edits) with its setting applied; its own dvc.lock and outputs kept."""
        head = _git(self.root, "rev-parse", "HEAD").stdout.strip()
        self.dir.mkdir(exist_ok=True)
        (self.dir / ".gitignore").write_text("*\n")  # nothing here is the project's to commit
        ws = self.dir / exp.name
        lock = None
        if (ws / ".git").exists():
            lock = (ws / "dvc.lock").read_bytes() if (ws / "dvc.lock").is_file() else None
            _git(ws, "checkout", "--quiet", "--force", "--detach", head)
        else:
            if ws.exists():
                raise StudyError(f"{ws} exists but is not a workspace of this study; move it away")
            _git(self.root, "worktree", "prune")
            _git(self.root, "worktree", "add", "--quiet", "--detach", str(ws), head)
        # the project's edits, not its run state: dvc.lock says what the project's workspace ran
        diff = _git(self.root, "diff", "--binary", "HEAD", "--", ".", ":(exclude)dvc.lock").stdout
        if diff.strip():
            _git(ws, "apply", "--binary", "--whitespace=nowarn", input=diff)
        untracked = _git(self.root, "ls-files", "--others", "--exclude-standard", "-z").stdout.split("\0")
        for rel in filter(None, untracked):
            if rel.startswith(f"{FOLDER}/"):
                continue
            dst = ws / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.root / rel, dst)
        if lock is not None:
            (ws / "dvc.lock").write_bytes(lock)  # what this workspace has run, not the project's
        _set_params(ws / "params.yaml", exp.sets)
        cache = _dvc(self.root, "cache", "dir").stdout.strip() or str(self.root / ".dvc" / "cache")
        proc = _dvc(ws, "cache", "dir", "--local", cache)
        if proc.returncode:
            raise StudyError(f"{ws}: dvc cache dir failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return ws

    @contextlib.contextmanager
    def saving(self):
        """One `dvc exp save` at a time in this project: every workspace's save writes the same
        refs of the project's git repository (refs/exps/stash, under git's own lock file), so two
        at once fail ("stash.lock: File exists"). An flock on .studies/save.lock, held by one
        open file at a time: the study's threads and any other study of this project wait."""
        self.dir.mkdir(exist_ok=True)
        with open(self.dir / "save.lock", "a") as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _say(self, name: str, line: str) -> None:
        with self._lock:
            self.echo(f"[{name}] {line}")

    @staticmethod
    def _env(env: dict, ws: Path, exp: Experiment) -> dict:
        """The workspace's code first on the path (its stages import `pipeline` from there, as
        the project's do from the project), and the experiment's name for MLflow."""
        from pipeline.core.tracking import STUDY_ENV

        path = os.pathsep.join([str(ws), *filter(None, [env.get("PYTHONPATH")])])
        return {**env, "PYTHONPATH": path, STUDY_ENV: exp.name}

    def _run_one(self, exp: Experiment, ws: Path, command: list[str], env: dict) -> int:
        proc = subprocess.Popen(command, cwd=ws, env=self._env(env, ws, exp),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            self._say(exp.name, line.rstrip("\n"))
        rc = proc.wait()
        if rc:
            self._say(exp.name, f"FAILED (exit {rc}); its workspace: {ws}")
            return rc
        include = [arg for path in _git_ignored_metrics(ws) for arg in ("--include-untracked", path)]
        with self.saving():
            saved = _dvc(ws, "exp", "save", "--force", "--name", exp.name, *include)
        if saved.returncode:
            self._say(exp.name, f"dvc exp save failed: {(saved.stderr or saved.stdout).strip()[-500:]}")
            return saved.returncode
        self._say(exp.name, f"saved as DVC experiment {exp.name}")
        return 0

    def run(self, experiments: list[Experiment], command: list[str], parallel: int) -> dict[str, int]:
        """Prepare every workspace, then run `command` (a `python -m pipeline repro --cluster …`)
        in each, `parallel` at a time; each that succeeds is saved as a DVC experiment.
        Returns each experiment's exit status."""
        spaces = {}
        for exp in experiments:
            spaces[exp.name] = self.workspace(exp)
            setting = ", ".join(f"{k}={v}" for k, v in exp.sets)
            self.echo(f"study: {exp.name}: {setting}  (workspace {spaces[exp.name].relative_to(self.root)})")
        results: dict[str, int] = {}
        env = dict(os.environ)
        pending = list(experiments)
        running: list[threading.Thread] = []

        def work(exp: Experiment) -> None:
            try:
                results[exp.name] = self._run_one(exp, spaces[exp.name], command, env)
            except Exception as err:  # noqa: BLE001 — one experiment's failure is reported, others go on
                self._say(exp.name, f"FAILED: {type(err).__name__}: {err}")
                results[exp.name] = 1

        while pending or running:
            running = [t for t in running if t.is_alive()]
            while pending and len(running) < parallel:
                t = threading.Thread(target=work, args=(pending.pop(0),), daemon=True)
                t.start()
                running.append(t)
            if running:
                running[0].join(timeout=1.0)
        return results
