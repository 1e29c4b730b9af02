"""Run every benchmark and rewrite the figures section of benchmarks/README.md.

    python benchmarks/run_all.py                         # all, this machine's defaults (CPU or CUDA)
    python benchmarks/run_all.py --skip repro            # without the end-to-end `dvc repro`
    python benchmarks/run_all.py --only train,dive --threads 1 --no-write

Each benchmark runs as its own process with its defaults (they pick CPU or CUDA settings
by themselves). Its Markdown output replaces that benchmark's block in the README's figures
section, under a line naming the date, the machine and this command; the blocks of
benchmarks not run this time are kept. A benchmark that fails leaves its error there
instead of figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
START = "<!-- figures:start -->"
END = "<!-- figures:end -->"

# name -> (script, takes --threads/--device)
BENCHES = {
    "train": ("bench_train.py", True),
    "dive": ("bench_dive.py", True),
    "eval": ("bench_eval.py", True),
    "images": ("bench_images.py", True),  # real-size JPEGs: originals vs the image cache
    "radapter": ("bench_radapter.py", True),  # R-Adapter's own cost benchmark
    "text_head": ("bench_text_head.py", True),  # prompt-CE head vs number of classes (~1 h on CPU)
    "repro": ("bench_repro.py", False),
    "startup": ("bench_startup.py", False),  # each stage entry's start-up (imports, exit)
}


def run_one(name: str, args) -> tuple[str, float]:
    script, tunable = BENCHES[name]
    cmd = [sys.executable, str(HERE / script)]
    if tunable:
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.device != "auto":
            cmd += ["--device", args.device]
    if name == "repro" and args.repro_from:
        cmd += ["--from", args.repro_from]
    print(f"== {name}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout
    first = out.find("### ")
    body = out[first:].strip() if first >= 0 else out.strip()
    if proc.returncode != 0:
        err = (proc.stderr or "").strip().splitlines()[-15:]
        body = (f"### {name}: failed (exit {proc.returncode})\n\n{body}\n\n```\n" + "\n".join(err) + "\n```")
    print(body + "\n", flush=True)
    return body, wall


def write_readme(blocks: dict[str, str]) -> None:
    """Replace the blocks of the benchmarks that ran; keep the others' last figures."""
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README}: the markers {START} / {END} are missing")
    section = text[text.index(START) + len(START):text.index(END)]
    old = dict(re.findall(r"<!-- bench:(\w+) -->\n(.*?)\n<!-- /bench:\1 -->", section, flags=re.S))
    old.update(blocks)
    order = [n for n in BENCHES if n in old] + [n for n in old if n not in BENCHES]
    body = "\n\n".join(f"<!-- bench:{n} -->\n{old[n]}\n<!-- /bench:{n} -->" for n in order)
    new = (f"{START}\n\n## Latest figures\n\nWritten by `benchmarks/run_all.py` (each block: when, where, "
           f"the command). Edits between the markers are overwritten.\n\n{body}\n\n{END}")
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    README.write_text(text)
    print(f"wrote {README}", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(BENCHES))
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for each benchmark (0 = default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repro-from", choices=("clone", "worktree"), default=None,
                   help="what bench_repro copies (default: its own default, a git clone)")
    p.add_argument("--no-write", action="store_true", help="print only; leave the README alone")
    p.add_argument("--note", default="", help="a sentence to put under the header (e.g. about load)")
    args = p.parse_args(argv)

    names = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    skip = set(filter(None, args.skip.split(",")))
    unknown = (set(names) | skip) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {sorted(unknown)}; known: {list(BENCHES)}")
    names = [n for n in names if n not in skip and (HERE / BENCHES[n][0]).exists()]

    sys.path.insert(0, str(HERE))
    import bench_train  # noqa: E402  (for the machine line; the benchmarks run in their own processes)

    if args.threads:
        bench_train.torch.set_num_threads(args.threads)
    where = bench_train.machine(bench_train.resolve(args.device))
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/run_all.py", *argv])
    blocks = {}
    for name in names:
        body, wall = run_one(name, args)
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        head = f"_{now}; {where}; `{command}`; {wall:.0f} s._"
        if args.note:
            head += f" {args.note}"
        blocks[name] = f"{head}\n\n{body}"
    if not args.no_write:
        write_readme(blocks)


if __name__ == "__main__":
    main()
