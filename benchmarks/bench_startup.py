"""Start-up cost of each DVC stage's entry point: what every entry of `dvc repro` pays before
its work and at its end (the finetune stage runs once per trial and level, evaluate once per
method), measured from outside the process.

    python benchmarks/bench_startup.py                           # every stage, this checkout
    python benchmarks/bench_startup.py --before 2e426fe          # against a git revision, paired
    python benchmarks/bench_startup.py --stages finetune,evaluate --runs 9 --before HEAD~3

Per stage, with this interpreter and each checkout on PYTHONPATH (its own `pipeline`):

- `import s`: `python -X importtime -c "import pipeline.stages.<stage>"`, the cumulative time
  Python reports for the stage module (the imports at its top; those inside functions run
  later, during the work, and are in `bench_repro.py`'s figures);
- `entry s`, `entry cpu s`: `python stages/<stage>.py --help`, the whole process, from its
  start until it is reaped: the interpreter's start, the stage's imports, the command line,
  the interpreter's shutdown. Wall time, and CPU time (user + system, `os.wait4`);
- `full GCs`: how many full (generation 2) garbage collections ran while the stage module was
  imported (`gc.callbacks`; the same every run).

With `--before REV`, REV's files (`git archive`) are measured the same way in a temporary
folder, the two alternating run by run (after, before, after, before, ...), so a machine that
slows down or speeds up during the benchmark affects both alike; `ratio` is the median of the
per-pair ratios after / before. Medians of `--runs` runs (default 5) after one warm-up run
each (which also writes the bytecode caches). On a busy machine compare the CPU ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COUNT_FULL_GC = ("import gc, sys\nfull = []\n"
                 "gc.callbacks.append(lambda p, i: full.append(1) if p == 'stop' and i['generation'] == 2 else None)\n"
                 "import pipeline.stages.{stage}\nprint(len(full))\n")


def stages_of(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "stages").glob("*.py"))


def env_for(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(root),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def timed(cmd: list[str], root: Path) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, its stderr) of one run of `cmd` in `root`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env_for(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {root} ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, err


def import_seconds(stage: str, root: Path) -> float:
    """The stage module's cumulative import time, as `-X importtime` reports it."""
    _, _, err = timed([sys.executable, "-X", "importtime", "-c", f"import pipeline.stages.{stage}"], root)
    for line in err.splitlines():
        m = re.match(r"import time:\s*\d+ \|\s*(\d+) \|\s*pipeline\.stages\." + re.escape(stage) + r"\s*$", line)
        if m:
            return int(m.group(1)) / 1e6
    raise SystemExit(f"no import time of pipeline.stages.{stage} in {root}")


def full_gcs(stage: str, root: Path) -> int:
    out = subprocess.run([sys.executable, "-c", COUNT_FULL_GC.format(stage=stage)], cwd=root, env=env_for(root),
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def measure(stage: str, roots: dict[str, Path], runs: int) -> dict:
    """Per checkout: medians of import s, entry wall s, entry CPU s; the paired ratios."""
    entry = lambda root: [sys.executable, f"stages/{stage}.py", "--help"]  # noqa: E731
    for root in roots.values():  # warm-up: bytecode caches, the page cache
        timed(entry(root), root)
    got = {name: {"import": [], "wall": [], "cpu": []} for name in roots}
    for _ in range(runs):
        for name, root in roots.items():
            got[name]["import"].append(import_seconds(stage, root))
            wall, cpu, _ = timed(entry(root), root)
            got[name]["wall"].append(wall)
            got[name]["cpu"].append(cpu)
    out = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in got.items()}
    for name, root in roots.items():
        out[name]["gc"] = full_gcs(stage, root)
    if len(roots) == 2:
        after, before = got["after"], got["before"]
        out["ratio"] = {k: statistics.median(a / b for a, b in zip(after[k], before[k])) for k in after}
    return out


def export(rev: str, dest: Path) -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return sha


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="a git revision to compare with (paired runs)")
    p.add_argument("--stages", help="comma-separated stage names (default: every stages/*.py)")
    p.add_argument("--runs", type=int, default=5, help="runs per checkout and stage (default 5)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        roots = {"after": ROOT}
        what = f"this checkout ({ROOT})"
        if args.before:
            sha = export(args.before, tmp / "before")
            roots["before"] = tmp / "before"
            what += f" against {args.before} ({sha})"
        stages = args.stages.split(",") if args.stages else stages_of(ROOT)
        unknown = sorted(set(stages) - set(stages_of(ROOT)))
        if unknown:
            raise SystemExit(f"--stages: no such stage {unknown}; known: {', '.join(stages_of(ROOT))}")
        t0 = time.perf_counter()
        results = {s: measure(s, roots, args.runs) for s in stages}
        took = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n### Stage entry start-up: {what}\n")
    print(f"Medians of {args.runs} runs per checkout and stage ({took:.0f} s in all). `import`: the stage "
          "module's import time (`-X importtime`); `entry`: `python stages/<stage>.py --help`, the whole "
          "process (start, imports, exit); `full GCs`: full collections during the import.\n")
    if len(roots) == 1:
        print("| stage | import s | entry s | entry CPU s | full GCs |")
        print("|---|---:|---:|---:|---:|")
        for s, r in results.items():
            a = r["after"]
            print(f"| {s} | {a['import']:.2f} | {a['wall']:.2f} | {a['cpu']:.2f} | {a['gc']} |")
    else:
        print("| stage | import s before → after | entry s before → after | entry CPU s before → after "
              "| CPU ratio | full GCs before → after |")
        print("|---|---:|---:|---:|---:|---:|")
        for s, r in results.items():
            a, b, q = r["after"], r["before"], r["ratio"]
            print(f"| {s} | {b['import']:.2f} → {a['import']:.2f} | {b['wall']:.2f} → {a['wall']:.2f} | "
                  f"{b['cpu']:.2f} → {a['cpu']:.2f} | {q['cpu']:.2f} | {b['gc']} → {a['gc']} |")
    return results


if __name__ == "__main__":
    main()
