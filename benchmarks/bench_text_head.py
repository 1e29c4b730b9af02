"""Peak memory and step time of one BitFit / LoRA training step vs the number of classes,
before and after the class-prompt head was chunked (issue #16), through `pipeline.training.train.fit`
on a real open_clip architecture (random weights).

    python benchmarks/bench_text_head.py                  # CPU: ViT-B-32 @ 64 px, batch 4, C = 8, 182, 1139 (~40 min)
    python benchmarks/bench_text_head.py --classes 8,182 --methods bitfit --cap-gib 6
    python benchmarks/bench_text_head.py --device cuda    # GPU: 224 px, batch 32, bf16

BitFit, A-CLIP and LoRA re-encode every class prompt through the text tower with gradient at
every step (one template per class, the default `head_templates: 1`), so the text tower sees C
prompts per step whatever the batch. The prompts are RxRx1's (the longest of the WILDS
prompt files, 18 tokens at most), for the first C class names. Variants:
- `before`: the code before #16, one forward of all C prompts at the full 77-token context;
- `trim`: one forward of all C prompts, cut after the longest prompt (exact for open_clip's
  causal, argmax-pooled tower);
- `after`: what the pipeline runs: trimmed, in chunks whose activations fit
  `--budget-mib` (params `finetune.train.prompt_memory_mb`, default 1024) under activation
  checkpointing (each chunk's forward runs twice: once before the loss, once in backward).

Each case runs in its own process (so that no case's memory hides in another's peak) under a
memory cap: the worker limits its own address space (RLIMIT_AS) to what it has mapped after
building the model plus (cap − its resident size then), so its resident memory cannot pass
about `--cap-gib`; a case that would needs more and is reported "out of memory at cap".
Memory: peak resident set size sampled from /proc/self/statm every 2 ms (CPU), or
`torch.cuda.max_memory_allocated` (CUDA); "added" = peak − before `fit` (the weights and
data excluded: activations, gradients, optimiser state). "estimate" is what
`pipeline.models.zeroshot.prompt_activation_bytes` predicts for the activations of one forward
(all C prompts, or one chunk): an upper bound, for a tower whose every weight trains (BitFit
and LoRA keep less). Step time: the mean of the timed steps after the warm-up step(s).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train as bt  # noqa: E402  (imports pipeline first)
import torch  # noqa: E402

from pipeline.models import zeroshot  # noqa: E402
from pipeline.data.datasets import load_prompts  # noqa: E402
from pipeline.methods import bitfit  # noqa: E402
from pipeline.models.zeroshot import (prompt_activation_bytes, prompt_chunk_size, text_tower_shape,  # noqa: E402
                               tokenize_prompts, trimmed_length)

VARIANTS = ("before", "trim", "after")
METHODS = ("bitfit", "lora")


def class_tokens(tokenizer, classes: int) -> torch.Tensor:
    """[C, T, L]: RxRx1's templates for its first C class names (C <= 1139)."""
    prompts = load_prompts("rxrx1")
    if classes > len(prompts.classnames):
        raise SystemExit(f"--classes {classes}: RxRx1 has {len(prompts.classnames)} classes")
    texts = prompts.texts()[:classes]
    return tokenize_prompts(tokenizer, texts)


def _statm() -> tuple[int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        size, rss = f.read().split()[:2]
    return int(size) * page, int(rss) * page


def cap_memory(cap_bytes: int) -> None:
    """Resident memory can only grow by what is newly mapped: limit the address space to
    what is mapped now plus the room left under the cap."""
    size, rss = _statm()
    limit = size + max(cap_bytes - rss, 0)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def fit_steps(model, data, tokens, method: str, args, device, precision: str,
              budget: int | None) -> tuple[float, float]:
    """Mean (wall, process CPU) seconds per step after the warm-up, of `fit` on `method`.
    The zero-shot head is a stand-in: the prompt-CE methods never read it (building the real
    one would cost a no-grad forward of every prompt and template)."""
    from pipeline.methods import METHODS
    from pipeline.methods.base import TaskContext
    from pipeline.training.train import fit

    dim = model.text_projection.shape[1]
    ctx = TaskContext(model=model, class_tokens=tokens, zeroshot_head=torch.zeros(tokens.shape[0], dim),
                      device=device, prompt_memory_bytes=budget)
    cls = METHODS[method]
    stamps: dict[int, tuple[float, float]] = {}
    total = args.warmup + args.steps
    fit(cls(cls.Hparams(), ctx), data, steps=total, batch_size=args.batch_size, seed=0, device=device,
        precision=precision, progress=False,
        log=lambda s, r: stamps.__setitem__(s, (time.perf_counter(), time.process_time())))
    n = args.steps
    return ((stamps[total][0] - stamps[args.warmup][0]) / n, (stamps[total][1] - stamps[args.warmup][1]) / n)


def worker(args) -> dict:
    device = bt.resolve(args.device)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    model, tokenizer, size, _ = bt.build_model(args.arch, args.image_size, device)
    c = int(args.worker_classes)
    tokens = class_tokens(tokenizer, c)
    data = bt.make_data(4 * args.batch_size, size, c)
    variant, method = args.worker_variant, args.worker_method
    budget = args.budget_mib * 2**20 if variant == "after" else None
    if variant == "before":
        # the code before #16: one forward of every prompt at the full context
        bitfit.build_head_with_grad = functools.partial(zeroshot.build_head_with_grad, trim=False)

    # what one text forward holds, as the pipeline estimates it (one template per class)
    flat = tokens[:, 0].to(device)
    length = flat.shape[1] if variant == "before" else trimmed_length(flat)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        chunk = c if budget is None else min(c, prompt_chunk_size(model, flat, budget))
    per_prompt, per_chunk = prompt_activation_bytes(text_tower_shape(model), length,
                                                    torch.bfloat16 if use_bf16 else None)
    res = {"method": method, "classes": c, "variant": variant, "chunk": chunk, "length": length,
           "estimate": chunk * per_prompt + per_chunk}

    precision = "bf16" if use_bf16 else "fp32"
    bt.sync(device)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            t, cpu = fit_steps(model, data, tokens, method, args, device, precision, budget)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            if args.cap_gib:
                cap_memory(int(args.cap_gib * 2**30))
            with bt.RssPeak() as rss:
                before = rss.start
                t, cpu = fit_steps(model, data, tokens, method, args, device, precision, budget)
            peak = rss.peak
    except (RuntimeError, MemoryError) as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if isinstance(err, MemoryError) or "memory" in str(err).lower():
            return {**res, "oom": True, "error": str(err).splitlines()[0][:200]}
        raise
    return {**res, "oom": False, "step_s": t, "cpu_s": cpu, "peak": peak, "added": peak - before}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--image-size", type=int, default=None,
                   help="force_image_size (default: 64 on CPU, the config's on CUDA; 0 = the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="image batch (default: 4 CPU, 32 CUDA)")
    p.add_argument("--classes", default="8,182,1139", help="comma-separated class counts (RxRx1 prompts)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--budget-mib", type=int, default=1024, help="the `after` budget (prompt_memory_mb)")
    p.add_argument("--cap-gib", type=float, default=10.0, help="memory cap per case on CPU (0 = none)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 1 CPU, 5 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 2 CUDA)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--worker-method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-classes", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-variant", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def defaults(args, device) -> argparse.Namespace:
    gpu = device.type == "cuda"
    if args.image_size is None:
        args.image_size = 0 if gpu else 64
    args.batch_size = args.batch_size or (32 if gpu else 4)
    args.steps = args.steps or (5 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    return args


def mib(x: float) -> str:
    return f"{x / 2**20:.0f}"


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)  # passed on to the worker processes
    args, device = bt.start(argv, parse_args, defaults)
    if args.worker_method:
        print(json.dumps(worker(args)))
        return []
    t0 = time.perf_counter()
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    results = []
    for method in args.methods.split(","):
        for c in (int(x) for x in args.classes.split(",")):
            for variant in args.variants.split(","):
                cmd = [sys.executable, __file__, *argv, "--worker-method", method,
                       "--worker-classes", str(c), "--worker-variant", variant]
                t = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    # killed without a Python error (e.g. by the kernel): report, keep going
                    tail = (out.stderr or "").strip().splitlines()[-3:]
                    res = {"method": method, "classes": c, "variant": variant, "oom": True,
                           "error": f"exit {out.returncode}: {' | '.join(tail)[:300]}"}
                else:
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                res["wall_s"] = time.perf_counter() - t
                print(f"{method} C={c} {variant}: {res}", file=sys.stderr, flush=True)
                results.append(res)

    mem = ("CUDA max_memory_allocated" if device.type == "cuda"
           else "peak RSS, /proc/self/statm sampled every 2 ms")
    cap = f"; memory cap per case {args.cap_gib:g} GiB" if device.type != "cuda" and args.cap_gib else ""
    print(f"\n### Class-prompt head vs number of classes: {args.arch} @ {args.image_size or 'config'} px, "
          f"batch {args.batch_size}, {device.type}, {'bf16 autocast' if use_bf16 else 'fp32'}\n")
    print(f"Machine: {bt.machine(device)}. One template per class per step (RxRx1 prompts); "
          f"{args.steps} timed step(s) after {args.warmup} warm-up; each case in a fresh process{cap}; "
          f"memory: {mem}; `after` budget {args.budget_mib} MiB.\n")
    print("| method | classes | variant | tokens / prompt | prompts / chunk | step s | peak MiB | "
          "added MiB | estimate MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        est = mib(r["estimate"]) if "estimate" in r else "–"
        head = (f"| {r['method']} | {r['classes']} | {r['variant']} | {r.get('length', '–')} | "
                f"{r.get('chunk', '–')} |")
        if r["oom"]:
            why = f"out of memory at cap {args.cap_gib:g} GiB" if device.type != "cuda" else "out of memory"
            print(f"{head} {why} | – | – | {est} |")
        else:
            print(f"{head} {r['step_s']:.1f} | {mib(r['peak'])} | {mib(r['added'])} | {est} |")
    by = {(r["method"], r["classes"], r["variant"]): r for r in results}
    lines = []
    for method in args.methods.split(","):
        a, b = by.get((method, 182, "after")), by.get((method, 1139, "after"))
        if a and b and not a["oom"] and not b["oom"]:
            lines.append(f"{method} `after`: peak at 1139 classes / at 182 = **{b['peak'] / a['peak']:.2f}×** "
                         f"(added {b['added'] / max(a['added'], 1):.2f}×)")
    if lines:
        print("\n" + "; ".join(lines) + " (target ≤ 1.5×).")
    print("\n`estimate`: `prompt_activation_bytes` for one forward (all C prompts, or one chunk), an upper "
          "bound that assumes every text weight trains. `added` = peak − memory before `fit`.")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
