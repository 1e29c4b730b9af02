"""Training throughput of the project's trainer (`pipeline.training.train.fit`) against a bare PyTorch
loop, and model FLOP utilisation, for FLYP on a real open_clip architecture (random weights).

    python benchmarks/bench_train.py                     # CPU: ViT-B-32 at 64 px, batch 8 (~1-2 min)
    python benchmarks/bench_train.py --device cuda       # GPU: ViT-B-32 at 224 px, batch 128, bf16

Both loops train the same model on the same in-memory tensors (no decoding, no augmentation,
so data loading costs the same), with the same global batches (`batch_plan`), the same step:
one template per image, both towers forward, the symmetric CLIP loss, backward, gradient
clipping at 1.0, AdamW (fused on CUDA), the logit-scale clamp; bf16 autocast on CUDA.
What `fit` adds on top is the framework overhead: its DataLoader and collate, per-step
re-seeding, the learning-rate schedule, parameter groups, the non-finite guard and the
per-step loss read-back (a device sync on CUDA), the history record.

Timing: warm-up steps are excluded; each loop runs `--rounds` times, interleaved; a round's
figure is its mean step time; the best round is reported (the least disturbed by other load;
all rounds are printed with --verbose). fit's steps are timed from its per-step log callback.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of the step
(matmuls, convolutions, attention; element-wise work and the optimiser are not counted, the
usual MFU convention). Peak: the best of repeated large square matmuls on this device (fp32
on CPU with torch's threads, bf16 on CUDA). MFU = FLOPs per step / step time / peak.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402,F401  (first, as everywhere)
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.models.losses import clip_loss  # noqa: E402
from pipeline.methods.base import TaskContext  # noqa: E402
from pipeline.models import register_builtin_configs  # noqa: E402
from pipeline.models.zeroshot import build_head  # noqa: E402

MAX_LOGIT_SCALE = math.log(100.0)


# ---- shared helpers (imported by the other benchmarks) ----------------------------------------


def resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def start(argv, parse_args, defaults=None) -> tuple[argparse.Namespace, torch.device]:
    """The opening every benchmark's `main` shares: parse the arguments, set the CPU threads,
    resolve the device, fill the device-dependent defaults (if the benchmark has any)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve(args.device)
    return (defaults(args, device) if defaults else args), device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    """One line describing where the figures come from."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    s = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        s = f"{torch.cuda.get_device_name(device)}; " + s
    return s


def build_model(arch: str, image_size: int, device: torch.device):
    """open_clip `arch` with random weights (image size forced if given), its tokenizer, the
    real image size and the evaluation transform."""
    register_builtin_configs()
    kw = {"force_image_size": image_size} if image_size else {}
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, **kw)
    model = model.to(device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return model, open_clip.get_tokenizer(arch), size, preprocess


def class_tokens_for(tokenizer, classes: int, templates: int = 2) -> torch.Tensor:
    """[C, T, L] tokenised prompts, as the pipeline builds them."""
    texts = [f"a photo of a class {c} number {t}." for c in range(classes) for t in range(templates)]
    return tokenizer(texts).view(classes, templates, -1)


def make_context(model, class_tokens, device) -> TaskContext:
    with torch.no_grad():
        head = build_head(model.encode_text, class_tokens.to(device))
    return TaskContext(model=model, class_tokens=class_tokens, zeroshot_head=head, device=device)


class TensorItems(torch.utils.data.Dataset):
    """Items {image, y, index} from tensors already in memory (no decoding, no augmentation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "y": self.labels[i], "index": torch.tensor(i)}


def make_data(n: int, size: int, classes: int, seed: int = 0) -> TensorItems:
    g = torch.Generator().manual_seed(seed)
    return TensorItems(torch.randn(n, 3, size, size, generator=g),
                       torch.randint(classes, (n,), generator=g))


class RssPeak:
    """Peak resident set size over a window, sampled from /proc/self/statm every 2 ms."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def matmul_peak(device: torch.device, seconds: float = 2.0) -> tuple[float, str]:
    """Best FLOP/s of a large square matmul: fp32 on CPU, bf16 on CUDA."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4 if device.type == "cpu" else 20):
            a @ b
        sync(device)
        dt = time.perf_counter() - t0
        best = max(best, (4 if device.type == "cpu" else 20) * 2 * n**3 / dt)
    return best, f"{str(dtype).replace('torch.', '')} {n}x{n} matmul"


# ---- the two loops -------------------------------------------------------------------------


def bare_loop(model, data: TensorItems, class_tokens, plan, warmup: int, device,
              use_bf16: bool) -> tuple[float, float]:
    """Mean (wall, process CPU) seconds per step after `warmup` steps of a plain PyTorch
    FLYP loop."""
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.2, fused=device.type == "cuda")
    ct = class_tokens.to(device)
    model.train()
    t0 = None
    for step, idx in enumerate(plan):
        if step == warmup:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
        idx = torch.as_tensor(idx)
        x = data.images[idx].to(device, non_blocking=True)
        y = data.labels[idx].to(device, non_blocking=True)
        pick = torch.randint(ct.shape[1], (len(idx),), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            f = F.normalize(model.encode_image(x), dim=-1).float()
            g = F.normalize(model.encode_text(ct[y, pick]), dim=-1).float()
            loss = clip_loss(f, g, model.logit_scale.exp().float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    sync(device)
    n = len(plan) - warmup
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def fit_loop(model, data: TensorItems, class_tokens, steps: int, batch_size: int, warmup: int,
             device, precision: str, method: str = "flyp", ctx_extra: dict | None = None,
             hparams: dict | None = None) -> tuple[float, float]:
    """Mean (wall, process CPU) seconds per step after `warmup` steps of
    `pipeline.training.train.fit` on `method`."""
    from pipeline.methods import METHODS
    from pipeline.training.train import fit

    ctx = make_context(model, class_tokens, device)
    for k, v in (ctx_extra or {}).items():
        setattr(ctx, k, v)
    cls = METHODS[method]
    m = cls(cls.Hparams(**(hparams or {})), ctx)
    stamps: dict[int, tuple[float, float]] = {}
    fit(m, data, steps=steps, batch_size=batch_size, seed=0, device=device, precision=precision,
        progress=False, log=lambda s, r: stamps.__setitem__(s, (time.perf_counter(), time.process_time())))
    n = steps - warmup
    return (stamps[steps][0] - stamps[warmup][0]) / n, (stamps[steps][1] - stamps[warmup][1]) / n


def step_flops(model, data: TensorItems, class_tokens, batch_size: int, device, use_bf16: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    x = data.images[:batch_size].to(device)
    tokens = class_tokens[data.labels[:batch_size], 0].to(device)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            f = F.normalize(model.encode_image(x), dim=-1).float()
            g = F.normalize(model.encode_text(tokens), dim=-1).float()
            loss = clip_loss(f, g, model.logit_scale.exp().float())
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights)")
    p.add_argument("--image-size", type=int, default=None,
                   help="force_image_size (default: 64 on CPU, the config's on CUDA; 0 = the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: 8 on CPU, 128 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 4 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 CPU, 5 CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats of each loop (order alternating)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto = bf16 autocast on CUDA, fp32 on CPU (as the pipeline)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def defaults(args, device: torch.device) -> argparse.Namespace:
    gpu = device.type == "cuda"
    if args.image_size is None:
        args.image_size = 0 if gpu else 64
    args.batch_size = args.batch_size or (128 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve(args.device)
    args = defaults(args, device)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    t_start = time.perf_counter()

    model, tokenizer, size, _ = build_model(args.arch, args.image_size, device)
    class_tokens = class_tokens_for(tokenizer, args.classes)
    total = args.warmup + args.steps
    data = make_data(max(4 * args.batch_size, args.batch_size * total // 2), size, args.classes)
    from pipeline.training.train import batch_plan

    plan = batch_plan(len(data), args.batch_size, total, seed=0)
    bare, framed = [], []
    for r in range(args.rounds):  # interleaved, the order alternating between rounds
        for which in (("bare", "fit") if r % 2 == 0 else ("fit", "bare")):
            if which == "bare":
                bare.append(bare_loop(model, data, class_tokens, plan, args.warmup, device, use_bf16))
            else:
                framed.append(fit_loop(model, data, class_tokens, total, args.batch_size, args.warmup,
                                       device, "bf16" if use_bf16 else "fp32"))
    t_bare, t_fit = min(t for t, _ in bare), min(t for t, _ in framed)
    c_bare, c_fit = min(c for _, c in bare), min(c for _, c in framed)
    flops = step_flops(model, data, class_tokens, args.batch_size, device, use_bf16)
    peak, peak_kind = matmul_peak(device)

    overhead = t_fit / t_bare - 1
    res = {"arch": args.arch, "image_size": size, "batch_size": args.batch_size,
           "device": device.type, "bf16": use_bf16, "t_bare": t_bare, "t_fit": t_fit,
           "overhead": overhead, "cpu_overhead": c_fit / c_bare - 1, "flops": flops, "peak": peak,
           "mfu_fit": flops / t_fit / peak, "mfu_bare": flops / t_bare / peak}
    print(f"\n### Training throughput, FLYP: {args.arch} @ {size} px, global batch {args.batch_size}, "
          f"{device.type}, {'bf16 autocast' if use_bf16 else 'fp32'}\n")
    print(f"Machine: {machine(device)}. Best of {args.rounds} interleaved rounds (order alternating) of "
          f"{args.steps} timed steps after {args.warmup} warm-up steps.\n")
    print("| loop | step ms | samples/s | model FLOP/s | MFU | process CPU ms / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, c in (("bare PyTorch", t_bare, c_bare), ("pipeline.training.train.fit", t_fit, c_fit)):
        print(f"| {name} | {1e3 * t:.1f} | {args.batch_size / t:.1f} | {flops / t / 1e9:.1f} G | "
              f"{100 * flops / t / peak:.1f} % | {1e3 * c:.1f} |")
    print(f"\nFramework overhead (fit / bare − 1): **{100 * overhead:+.1f} %** wall time, "
          f"{100 * (c_fit / c_bare - 1):+.1f} % process CPU time (target ≤ 5 %). "
          f"FLOPs per step (forward + backward, FlopCounterMode): {flops / 1e9:.1f} G. "
          f"Peak ({peak_kind}): {peak / 1e9:.0f} GFLOP/s.")
    if args.verbose:
        print(f"\nrounds (wall ms, CPU ms): bare {[(round(1e3 * t), round(1e3 * c)) for t, c in bare]}; "
              f"fit {[(round(1e3 * t), round(1e3 * c)) for t, c in framed]}")
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    return res


if __name__ == "__main__":
    main()
