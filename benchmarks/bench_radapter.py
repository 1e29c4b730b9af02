"""R-Adapter cost: inference of the merged model vs plain CLIP, and training step time and
memory vs full fine-tuning, on any open_clip architecture (random weights).

    python benchmarks/bench_radapter.py                      # ViT-S-32-alt at 64 px: < 1 min on CPU
    python benchmarks/bench_radapter.py --arch ViT-B-16 --image-size 224 --batch-size 128 --device cuda

Inference: the merged R-Adapter model (random non-zero adapters folded into out_proj/c_proj)
against the plain pre-trained model, image and text towers, interleaved repeats, median; it
is the same architecture, so the ratio should be 1.0 within noise. The unmerged model
(adapters as hooks) is shown for reference.

Training: one optimiser step (forward, backward, clip, AdamW, after_step) of `ft` (image
tower + head, this project's full fine-tuning), `flyp` (both towers, full fine-tuning) and
`radapter`, each in a fresh process. Step time is the median over the timed steps. Memory:
on CUDA, `torch.cuda.max_memory_allocated` during the steps minus the allocation before the
first step; on CPU, the peak resident set size (read from /proc/self/statm by a sampling
thread every 2 ms; no tracemalloc) during the steps minus the RSS before the first step.
Both are what training adds on top of the weights: activations, gradients, optimiser state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402,F401  (first, as everywhere)
import open_clip  # noqa: E402
import torch  # noqa: E402

from pipeline.methods import METHODS  # noqa: E402
from pipeline.methods.base import TaskContext  # noqa: E402
from pipeline.models import register_builtin_configs  # noqa: E402
from pipeline.models.zeroshot import build_head  # noqa: E402

from bench_train import RssPeak  # noqa: E402  (this folder is on sys.path when run as a script)

TRAIN_METHODS = ("ft", "flyp", "radapter")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-S-32-alt",
                   help="open_clip architecture (default ViT-S-32-alt: a real config small enough for CPU)")
    p.add_argument("--image-size", type=int, default=64,
                   help="force_image_size for the image tower (default 64; 0 = the config's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--classes", type=int, default=8, help="class prompts (one template each)")
    p.add_argument("--rank", type=int, default=0, help="R-Adapter rank (0 = full rank)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="inference repeats")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build(args, device: torch.device):
    register_builtin_configs()
    kw = {"force_image_size": args.image_size} if args.image_size else {}
    torch.manual_seed(0)
    model = open_clip.create_model(args.arch, pretrained=None, **kw).to(device).eval()
    tok = open_clip.get_tokenizer(args.arch)
    class_tokens = tok([f"a photo of a class {i}." for i in range(args.classes)])[:, None, :]
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return model, class_tokens, size


def context(model, class_tokens, device) -> TaskContext:
    with torch.no_grad():
        head = build_head(model.encode_text, class_tokens.to(device))
    return TaskContext(model=model, class_tokens=class_tokens, zeroshot_head=head, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- training (one method per process) ------------------------------------------------------


def train_worker(args) -> dict:
    from pipeline.training.train import build_optimizer

    device = resolve(args.device)
    model, class_tokens, size = build(args, device)
    ctx = context(model, class_tokens, device)
    cls = METHODS[args.worker]
    hp = cls.Hparams(rank=args.rank) if args.worker == "radapter" else cls.Hparams()
    method = cls(hp, ctx)
    method.setup()
    method.root.to(device)
    optimizer, params = build_optimizer(method, device)
    method.root.train()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(args.batch_size, 3, size, size, generator=g).to(device),
             "y": torch.randint(args.classes, (args.batch_size,), generator=g).to(device),
             "index": torch.arange(args.batch_size, device=device)}
    use_bf16 = args.precision == "bf16"

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            total = sum(method.loss(batch, i).values())
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        method.after_step(i)

    times = []
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            step(i)
            sync(device)
            times.append(time.perf_counter() - t0)
        mem = torch.cuda.max_memory_allocated(device) - base
    else:
        with RssPeak() as rss:
            base = rss.peak
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                step(i)
                times.append(time.perf_counter() - t0)
        mem = rss.peak - base
    return {"method": args.worker, "step_s": statistics.median(times[args.warmup:]),
            "mem_bytes": mem, "trainable": sum(p.numel() for p in params),
            "total": sum(p.numel() for p in model.parameters())}


def run_worker(method: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", method]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- inference --------------------------------------------------------------------------


def time_inference(models: dict, images, tokens, repeats: int, device) -> dict[str, float]:
    """Median seconds per (image batch + text batch) forward, repeats interleaved."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m.encode_image(images), m.encode_text(tokens)
        for _ in range(repeats):
            for k, m in models.items():
                sync(device)
                t0 = time.perf_counter()
                m.encode_image(images)
                m.encode_text(tokens)
                sync(device)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def inference(args) -> dict[str, float]:
    from pipeline.methods.radapter import RAdapter

    device = resolve(args.device)
    plain, class_tokens, size = build(args, device)
    live, _, _ = build(args, device)
    method = RAdapter(RAdapter.Hparams(rank=args.rank), context(live, class_tokens, device))
    method.setup()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so the merge does real work
        for a in method.extra["adapters"].values():
            for p in a.own_params().values():
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device))
            a.update_ema()
    merged_model, _, _ = build(args, device)
    merged = RAdapter.eval_model(merged_model, method.trained_state(), method.hp, None, alpha=1.0).model
    live.eval()
    images = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
    tokens = class_tokens[:, 0].repeat(max(1, args.batch_size // args.classes), 1).to(device)
    return time_inference({"plain": plain, "merged": merged, "unmerged": live}, images, tokens,
                          args.repeats, device)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(train_worker(args)))
        return
    device = resolve(args.device)
    t0 = time.perf_counter()
    inf = inference(args)
    train = {m: run_worker(m, argv) for m in TRAIN_METHODS}
    mem_kind = "CUDA max_memory_allocated − before" if device.type == "cuda" else "peak RSS − before (/proc/self/statm)"
    size = args.image_size or "config"
    print(f"\n### R-Adapter cost: {args.arch} @ {size} px, batch {args.batch_size}, "
          f"{args.classes} classes, rank {args.rank or 'full'}, {device.type}, {args.precision}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| inference (image + text batch) | median ms | ratio to plain |")
    print("|---|---:|---:|")
    for k in ("plain", "merged", "unmerged"):
        print(f"| {k} | {1e3 * inf[k]:.2f} | {inf[k] / inf['plain']:.3f} |")
    ft = train["ft"]
    print(f"\n| training step | trainable | median step ms | ratio to ft | memory MiB ({mem_kind}) "
          f"| ratio to ft | ratio to flyp (time / memory) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    fl = train["flyp"]
    for m in TRAIN_METHODS:
        r = train[m]
        print(f"| {m} | {100 * r['trainable'] / r['total']:.2f} % | {1e3 * r['step_s']:.1f} | "
              f"{r['step_s'] / ft['step_s']:.2f} | {r['mem_bytes'] / 2**20:.0f} | "
              f"{r['mem_bytes'] / max(ft['mem_bytes'], 1):.2f} | "
              f"{r['step_s'] / fl['step_s']:.2f} / {r['mem_bytes'] / max(fl['mem_bytes'], 1):.2f} |")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
