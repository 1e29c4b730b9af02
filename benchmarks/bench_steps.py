"""Step time and peak memory of several methods at several global batch sizes, through
`pipeline.training.train.fit`, on a real open_clip architecture (random weights).

    python benchmarks/bench_steps.py                          # CPU: ViT-B-32 at 64 px, batch 8
    python benchmarks/bench_steps.py --device cuda --arch ViT-B-16 --batch-sizes 128,256 --json out/steps.json

Each (method, batch) runs in a fresh process, so that one run's memory cannot hide in
another's peak; the settings are bench_dive's (`dive` reads f_pre / g_pre from an
in-memory cache of B' = B/4 rows, as the embed stage provides them) and R-Adapter's
defaults (full rank, drop 0.2, MPM-NCE). Time: mean step time after the warm-up steps,
from fit's per-step log callback. Memory: on CUDA `torch.cuda.max_memory_allocated` over
the run (total) and minus the allocation before `fit` ("added": activations, gradients,
optimiser state); on CPU the peak RSS (bench_train.RssPeak). A run that fails (e.g. out of
memory) is reported with its error instead of figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_dive  # noqa: E402  (imports bench_train, which imports pipeline first)
import bench_train as bt  # noqa: E402
import torch  # noqa: E402

METHODS = ("flyp", "dive", "radapter")


def worker(args) -> dict:
    device = bt.resolve(args.device)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    model, tokenizer, size, _ = bt.build_model(args.arch, args.image_size, device)
    class_tokens = bt.class_tokens_for(tokenizer, args.classes)
    batch = args.worker_batch
    data = bt.make_data(2 * batch, size, args.classes)
    # what the finetune stage gives every method: the training sample (the cache and probe
    # methods read it whole), its class names and the tokenizer (the prompt learners write
    # their own prompts)
    extra = {"train_set": data, "train_eval_set": data, "tokenizer": tokenizer,
             # one token each, so CoOp's 16 context tokens fit the tiny CLIP's 20 positions
             "class_names": tuple("abcdefghijklmnopqrstuvwxyz"[i % 26] * (1 + i // 26) for i in range(args.classes))}
    hp = {}
    from pipeline.methods import METHODS as REGISTRY

    cls = REGISTRY[args.worker]
    if cls.needs_reference:  # B' in the method's own default ratio to the default target batch 32 (DiVE: B/4)
        ref_batch = max(1, round(batch * cls.Hparams().ref_batch_size / 32))
        hp = {"ref_batch_size": ref_batch}
        extra["reference"] = bench_dive.reference(model, tokenizer, max(2 * ref_batch, 8), size, device, naive=False)
    total = args.warmup + args.steps

    def run():
        return bt.fit_loop(model, data, class_tokens, total, batch, args.warmup, device,
                           "bf16" if use_bf16 else "fp32", method=args.worker, ctx_extra=extra, hparams=hp)

    bt.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t, c = run()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with bt.RssPeak() as rss:
            before = rss.start
            t, c = run()
        peak = rss.peak
    return {"method": args.worker, "batch_size": batch, "step_s": t, "cpu_s": c, "samples_per_s": batch / t,
            "peak_bytes": peak, "added_bytes": peak - before, "bf16": use_bf16, "image_size": size}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--image-size", type=int, default=None,
                   help="force_image_size (default: 64 on CPU, the config's on CUDA; 0 = the config's)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated global batches (default: 8 CPU, 128,256 CUDA)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 2 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 3 CUDA)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", type=Path, default=None, help="write the figures here (rewritten after every run)")
    p.add_argument("--in-process", action="store_true",
                   help="run every (method, batch) in this process (quicker; CPU peak RSS then includes earlier runs)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def defaults(args, device) -> argparse.Namespace:
    gpu = device.type == "cuda"
    if args.image_size is None:
        args.image_size = 0 if gpu else 64
    args.batch_sizes = args.batch_sizes or ("128,256" if gpu else "8")
    args.steps = args.steps or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)  # passed on to the worker processes
    args, device = bt.start(argv, parse_args, defaults)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    t0 = time.perf_counter()
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    runs: list[dict] = []
    res = {"arch": args.arch, "device": device.type, "machine": bt.machine(device), "bf16": use_bf16,
           "steps": args.steps, "warmup": args.warmup, "fresh_process": not args.in_process, "runs": runs}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for m in args.methods.split(","):
            if args.in_process:
                args.worker, args.worker_batch = m, batch
                try:
                    runs.append(worker(args))
                except Exception as exc:  # e.g. out of memory: report it, go on
                    runs.append({"method": m, "batch_size": batch, "error": f"{type(exc).__name__}: {exc}"[:300]})
                finally:
                    args.worker = args.worker_batch = None
                    gc.collect()  # the run's model and optimiser, before the next one's peak
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            else:
                cmd = [sys.executable, __file__, *argv, "--worker", m, "--worker-batch", str(batch)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode == 0:
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                else:
                    err = (out.stderr.strip().splitlines() or ["no output"])[-1]
                    runs.append({"method": m, "batch_size": batch, "error": err[-300:]})
            print(f"{m} @ {batch}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
            res["seconds"] = time.perf_counter() - t0
            if args.json:  # after every run: a time limit that stops the rest keeps these
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(res, indent=1))
    size = next((r["image_size"] for r in runs if "image_size" in r), args.image_size or "config")
    mem = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS"
    print(f"\n### Step time and peak memory: {args.arch} @ {size} px, {device.type}, "
          f"{'bf16 autocast' if use_bf16 else 'fp32'}\n")
    where = "in this process" if args.in_process else "in a fresh process"
    print(f"Machine: {res['machine']}. {args.steps} timed steps after {args.warmup} warm-up, each run {where}; "
          f"memory: {mem}. DiVE: B' = B/4.\n")
    print("| method | batch | step ms | samples/s | × FLYP time | peak MiB | added MiB | × FLYP added |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    flyp = {r["batch_size"]: r for r in runs if r["method"] == "flyp" and "error" not in r}
    for r in runs:
        if "error" in r:
            print(f"| {r['method']} | {r['batch_size']} | failed: {r['error'][:80]} | | | | | |")
            continue
        base = flyp.get(r["batch_size"])
        rt = f"{r['step_s'] / base['step_s']:.2f}" if base else "–"
        ra = f"{r['added_bytes'] / max(base['added_bytes'], 1):.2f}" if base else "–"
        print(f"| {r['method']} | {r['batch_size']} | {1e3 * r['step_s']:.1f} | {r['samples_per_s']:.1f} | {rt} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {r['added_bytes'] / 2**20:.0f} | {ra} |")
    print(f"\n(total {res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
