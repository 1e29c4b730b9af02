"""The device check of issue #17: one command that shows, on a GPU, that the bf16 and DDP
paths compute what the fp32 single-process path computes, and what the GPU path costs.
Run it through `benchmarks/device_check.sh OUT_DIR` (which also records nvidia-smi).

    python benchmarks/device_check.py OUT_DIR            # the GPU check (at most ~8 minutes)
    python benchmarks/device_check.py OUT_DIR --ci       # the same sections, CI-sized, on the CPU

Sections, each a script of this folder in its own process under its own time limit (the
limits add up to 460 s, under the 8 minutes device_check.sh allows the whole run; a section
that runs out is recorded as `timeout`, with what it wrote so far):
- `precision` (check_precision.py): bf16 against fp32 DiVE regulariser and its gradient at
  θ_pre, and the losses of the same features under autocast; ViT-B-16 at 224 px.
- `steps` (bench_steps.py): FLYP, DiVE and R-Adapter step time and peak memory on ViT-B-16
  at 224 px, batch 128 and 256, bf16 autocast, each run in a fresh process.
- `eval` (bench_eval.py): evaluation throughput over PNG files with num_workers 0, 4, 8, 16.
- `ddp` (check_ddp.py): 2-process NCCL DDP against one process, when 2 GPUs are present
  (otherwise the section records why it was skipped).

Writes into OUT_DIR: `<section>.json` (the figures), `<section>.md` (the tables),
`<section>.log` (stderr), `summary.md` (all tables) and `summary.json` (status and time of
every section).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, GPU arguments, CI arguments, GPU time limit s)
SECTIONS = {
    "precision": ("check_precision.py",
                  ["--device", "cuda", "--arch", "ViT-B-16", "--image-size", "0", "--batch-size", "32",
                   "--ref-rows", "32"],
                  ["--device", "cpu", "--arch", "tiny-clip", "--batch-size", "4", "--ref-rows", "2",
                   "--threads", "1"],
                  40),
    "steps": ("bench_steps.py",
              ["--device", "cuda", "--arch", "ViT-B-16", "--image-size", "0", "--batch-sizes", "128,256",
               "--precision", "bf16", "--steps", "10", "--warmup", "3"],
              ["--device", "cpu", "--arch", "tiny-clip", "--image-size", "0", "--batch-sizes", "2",
               "--precision", "bf16", "--steps", "1", "--warmup", "1", "--in-process", "--threads", "1"],
              220),
    "eval": ("bench_eval.py",
             ["--device", "cuda", "--arch", "ViT-B-16", "--images", "2048", "--batch-size", "256",
              "--workers", "0,4,8,16", "--rounds", "1"],
             ["--device", "cpu", "--arch", "tiny-clip", "--images", "4", "--batch-size", "2",
              "--workers", "0,1", "--source-size", "32", "--rounds", "1", "--threads", "1"],
             110),
    "ddp": ("check_ddp.py", ["--device", "cuda", "--timeout", "80"], ["--device", "cuda"], 90),
}


def run_section(name: str, out: Path, ci: bool) -> dict:
    script, gpu_args, ci_args, limit = SECTIONS[name]
    cmd = [sys.executable, str(HERE / script), *(ci_args if ci else gpu_args), "--json", str(out / f"{name}.json")]
    t0 = time.perf_counter()
    # its own session: a time-out ends the section's children too (bench_steps' workers,
    # torchrun's ranks), which would otherwise keep the GPU busy
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=None if ci else limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status = f"timeout after {limit} s"
    seconds = time.perf_counter() - t0
    first = stdout.find("### ")
    table = stdout[first:].strip() if first >= 0 else stdout.strip()
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.log").write_text(stderr)
    if status != "ok":
        table = f"### {name}: {status}\n\n{table}\n\n```\n" + "\n".join(stderr.strip().splitlines()[-15:]) + "\n```"
    return {"status": status, "seconds": seconds, "command": cmd[1:], "table": table,
            "json": (out / f"{name}.json").exists()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for the figures")
    p.add_argument("--ci", action="store_true", help="CI-sized run on the CPU (tiny model, a step or two)")
    p.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(SECTIONS))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in (args.only.split(",") if args.only else SECTIONS) if n]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
    t0 = time.perf_counter()
    import torch

    n_gpu = torch.cuda.device_count()
    # no device query beyond the count: this process should not hold a CUDA context while
    # the sections measure (env.txt has nvidia-smi)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_devices": n_gpu}
    sections = {}
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        if name == "ddp" and n_gpu < 2:  # not worth a process start to find out
            reason = f"{n_gpu} CUDA device(s); the 2-process NCCL check needs 2"
            (args.out / "ddp.json").write_text(json.dumps({"status": "skipped", "reason": reason, "cases": {}}))
            sections[name] = {"status": "skipped", "seconds": 0.0, "reason": reason, "json": True,
                              "table": f"### DDP equivalence, 2 processes vs 1 (NCCL)\n\nskipped: {reason}"}
        else:
            sections[name] = run_section(name, args.out, args.ci)
        print(f"   {sections[name]['status']} in {sections[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    summary = {"mode": "ci" if args.ci else "gpu", "seconds": time.perf_counter() - t0, "env": env,
               "sections": {n: {k: v for k, v in s.items() if k != "table"} for n, s in sections.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    head = (f"## Device check ({summary['mode']}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{summary['seconds']:.0f} s\n\n"
            + "\n".join(f"- {n}: {s['status']}, {s['seconds']:.0f} s" for n, s in sections.items()))
    (args.out / "summary.md").write_text(head + "\n\n" + "\n\n".join(s["table"] for s in sections.values()) + "\n")
    print((args.out / "summary.md").read_text())
    return summary


if __name__ == "__main__":
    main()
