"""Wall time of the default pipeline (params.yaml as committed) as `make repro` runs it
(`python -m pipeline repro --jobs 0`: one stage per core at a time, up to 8; `--jobs 1`: plain `dvc repro`)
in a fresh temporary copy of the repository: empty DVC cache, no outputs, nothing downloaded.

    python benchmarks/bench_repro.py                    # git clone of HEAD (what a newcomer gets)
    python benchmarks/bench_repro.py --jobs 1           # plain `dvc repro`, one stage at a time
    python benchmarks/bench_repro.py --from worktree    # the working tree, uncommitted files included
    python benchmarks/bench_repro.py --keep             # keep the copy (its path is printed)
    python benchmarks/bench_repro.py --from worktree --set sample.seeds=[0] --set sample.levels=[1]
                                                        # a quick check that it runs (not the figure)

`--from clone` runs `git clone` of the repository (committed state only); `--from worktree`
copies every tracked and untracked-but-not-ignored file (`git ls-files -co
--exclude-standard`), for trying uncommitted work. The stages run with this interpreter's
environment (its bin/ directory first on PATH, so the `python` in dvc.yaml is this one) and
the copy's root on PYTHONPATH (its own `pipeline` package, installed or not).
Reported: the total wall time, the per-stage breakdown (each DVC stage with its matrix
entries summed: how many ran, their total and mean wall time, share of the whole) and the
slowest entries. With `--jobs 1`, an entry's time runs from its "Running stage" line to the
next one, so it includes DVC's own work between stages; with more, it is the entry's own job,
start to end (from the run's record, `.cluster/history/`), and N run at once. For the finetune stage, its entries' time is
split into training (the runs' own logged wall time, `logs/finetune/.../seed<S>.json`) and the
rest (process start-up and imports, loading, scoring, MLflow, DVC): what an entry pays besides
training. `--set KEY=VALUE` (repeatable; VALUE is YAML) edits the copy's params.yaml first,
for a quick check that the benchmark runs; the figure is the committed params'.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]


def copy_repo(source: Path, dest: Path, how: str) -> str:
    if how == "clone":
        subprocess.run(["git", "clone", "--quiet", str(source), str(dest)], check=True)
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=dest, check=True,
                             capture_output=True, text=True).stdout.strip()
        return f"git clone of {source} at {rev}"
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=source,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = source / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)  # DVC wants an SCM (or --no-scm)
    return f"working tree of {source} ({len([f for f in files if f])} files)"


def set_params(repo: Path, sets: list[str]) -> list[str]:
    """Apply `--set a.b.c=VALUE` (VALUE parsed as YAML) to the copy's params.yaml."""
    import yaml

    if not sets:
        return []
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. sample.seeds=[0]")
        node = params
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"--set {item!r}: params.yaml has no section {part!r} on the way to {key!r}")
            node = node[part]
        node[last] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return sets


def training_seconds(repo: Path) -> tuple[float, int]:
    """The finetune runs' own wall time (what `fit` logged), summed, and how many runs."""
    files = (repo / "logs" / "finetune").rglob("seed*.json")
    times = [json.loads(f.read_text()).get("wall_time_s", 0.0) for f in files]
    return float(sum(times)), len(times)


def local_stages(repo: Path) -> list[tuple[str, float]]:
    """Per stage of a `repro --jobs N` run, its own wall time (start to end of its job, or of
    its restore from the run cache), from the run's record under .cluster/history."""
    import datetime as dt

    records = sorted((repo / ".cluster" / "history").glob("submission-*.json"))
    if not records:
        return []
    out = []
    for name, e in json.loads(records[-1].read_text())["entries"].items():
        if e.get("submitted") and e.get("ended"):
            span = dt.datetime.fromisoformat(e["ended"]) - dt.datetime.fromisoformat(e["submitted"])
            out.append((name, span.total_seconds()))
    return out


def run_repro(repo: Path, extra: list[str], log_path: Path,
              jobs: int = 1) -> tuple[int, float, list[tuple[str, float]]]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1",  # stage lines arrive when printed
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           # the copy's own `pipeline` package, even where another checkout is pip-installed
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = ([sys.executable, "-m", "dvc", "repro", *extra] if jobs == 1 else
           [sys.executable, "-m", "pipeline", "repro", "--jobs", str(jobs)])
    stages: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            m = re.match(r"Running stage '([^']+)'", line)
            if m:
                stages.append((m.group(1), time.perf_counter() - t0))
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if jobs > 1:
        return rc, wall, local_stages(repo)
    ends = [t for _, t in stages[1:]] + [wall]
    return rc, wall, [(name, end - start) for (name, start), end in zip(stages, ends)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=ROOT, help="repository to copy (default: this one)")
    p.add_argument("--from", dest="how", choices=("clone", "worktree"), default="clone")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy")
    p.add_argument("--top", type=int, default=8, help="slowest stages to list")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="edit the copy's params.yaml first (VALUE is YAML), e.g. sample.seeds=[0]")
    p.add_argument("--jobs", "-j", type=int, default=0,
                   help="stages at a time (`python -m pipeline repro --jobs N`; default 0: one per core, up to "
                        "8, as `make repro`); 1: plain `dvc repro`")
    p.add_argument("dvc_args", nargs="*", help="extra arguments for dvc repro (after --; --jobs 1 only)")
    args = p.parse_args(argv)
    if args.jobs == 0:  # what `make repro` runs (`repro --jobs 0`), with its number in the figures
        sys.path.insert(0, str(ROOT))
        from pipeline.cluster.controller import auto_jobs

        args.jobs = auto_jobs()

    tmp = Path(tempfile.mkdtemp(prefix="bench-repro-"))
    repo = tmp / "repo"
    repo.mkdir()
    try:
        what = copy_repo(args.source.resolve(), repo, args.how)
        if set_params(repo, args.sets):
            what += ", params.yaml edited: " + ", ".join(f"`{s}`" for s in args.sets)
        rc, wall, stages = run_repro(repo, args.dvc_args, tmp / "repro.log", args.jobs)
        train_s, n_runs = training_seconds(repo)
        log_tail = (tmp / "repro.log").read_text()[-3000:]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    from bench_train import machine, resolve  # after the run: importing torch costs time

    command = "dvc repro" if args.jobs == 1 else f"python -m pipeline repro --jobs {args.jobs}"
    print(f"\n### `{command}` from scratch: {what}\n")
    import yaml

    where = machine(resolve("auto")).rsplit(", ", 1)[0]  # (not this process's torch threads: the stages')
    threads = (yaml.safe_load((args.source / "params.yaml").read_text()) or {}).get("threads")
    threads = dict(s.split("=", 1) for s in args.sets).get("threads", threads)
    print(f"Machine: {where}; params `threads` {threads} in every stage.\n")
    print("| what | value |")
    print("|---|---:|")
    print(f"| exit status | {rc} |")
    print(f"| wall time | {wall:.0f} s ({wall / 60:.1f} min) |")
    print(f"| stages run | {len(stages)} |")
    if stages:
        groups: dict[str, list[float]] = {}
        for name, t in stages:
            groups.setdefault(name.split("@")[0], []).append(t)
        print("\nPer stage (matrix entries summed; " + (
            "wall time between 'Running stage' lines, so DVC's own work is included):\n" if args.jobs == 1 else
            f"each stage's own wall time, start to end of its job; {args.jobs} run at a time, so the shares add up "
            "to more than 100 %):\n"))
        print("| stage | entries | total s | mean s | share |")
        print("|---|---:|---:|---:|---:|")
        for name, ts in groups.items():
            print(f"| {name} | {len(ts)} | {sum(ts):.0f} | {sum(ts) / len(ts):.1f} | {100 * sum(ts) / wall:.0f} % |")
        tune = groups.get("finetune", [])
        if tune:
            rest = sum(tune) - train_s
            print(f"\nfinetune: {len(tune)} entries, {sum(tune):.0f} s; training (the {n_runs} runs' logged wall "
                  f"time) {train_s:.0f} s; the rest (start-up, loading, scoring, MLflow, DVC) {rest:.0f} s, "
                  f"{rest / len(tune):.1f} s per entry.")
        print(f"\nSlowest entries:\n")
        print("| stage | s |")
        print("|---|---:|")
        for name, t in sorted(stages, key=lambda s: -s[1])[:args.top]:
            print(f"| {name} | {t:.1f} |")
    if rc != 0:
        print(f"\n`{command}` failed; the end of its output:\n\n```\n{log_tail}\n```")
    if args.keep:
        print(f"\n(kept: {repo})")
    if rc != 0:
        raise SystemExit(rc)
    return {"rc": rc, "wall_s": wall, "stages": stages, "train_s": train_s}


if __name__ == "__main__":
    main()
