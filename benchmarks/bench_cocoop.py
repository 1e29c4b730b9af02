"""Step time of CoCoOp (B·C text forwards per step) against CoOp (C per step) vs the number of
classes C and the batch B, on a real open_clip architecture (random weights), through the
methods' own `loss` and one SGD step, as the trainer runs them (fp32 on CPU, the chunked
checkpointed class-prompt path under `--budget-mib`, default the params' 1024).

    python benchmarks/bench_cocoop.py                              # ViT-B-32, C = 8, 62, 182; B = 1, 4, 16
    python benchmarks/bench_cocoop.py --classes 8,1139 --batches 1,2 --steps 1
    python benchmarks/bench_cocoop.py --device cuda --image-size 224 --precision bf16

The class names are RxRx1's ("sirna N", the longest prompts of the WILDS files after the
context: 4 + 3..5 tokens) for the first C classes. Image size 64 px by default on CPU: the text
forwards dominate the step, and the image tower runs once per image either way. Reported: the
mean wall time of `--steps` steps after `--warmup` untimed ones, and per 1,000 prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402,F401
import open_clip  # noqa: E402
import torch  # noqa: E402

from pipeline.data.datasets import load_prompts  # noqa: E402
from pipeline.methods import METHODS  # noqa: E402
from pipeline.methods.base import TaskContext  # noqa: E402


def run(method: str, arch: str, classes: int, batch: int, steps: int, image_size: int, budget_mib: int,
        device: torch.device, precision: str, warmup: int = 1) -> dict:
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, force_image_size=image_size).to(device)
    names = load_prompts("rxrx1").classnames[:classes]
    dim = model.text_projection.shape[1]
    ctx = TaskContext(model=model, class_tokens=torch.zeros(classes, 1, 1, dtype=torch.long),
                      zeroshot_head=torch.zeros(classes, dim, device=device), device=device,
                      prompt_memory_bytes=budget_mib * 2**20, class_names=tuple(names),
                      tokenizer=open_clip.get_tokenizer(arch))
    cls = METHODS[method]
    m = cls(cls.Hparams(), ctx)
    m.setup()
    opt = m.optimizer()
    g = torch.Generator().manual_seed(1)
    batch_data = {"image": torch.randn(batch, 3, image_size, image_size, generator=g).to(device),
                  "y": torch.randint(classes, (batch,), generator=g).to(device)}
    times = []
    for step in range(steps + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = sum(m.loss(batch_data, step).values())
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sum(times[warmup:]) / steps
    prompts = classes * (batch if method == "cocoop" else 1)
    return {"method": method, "C": classes, "B": batch, "prompts": prompts, "step_s": round(step_s, 3),
            "s_per_1k_prompts": round(1000 * step_s / prompts, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--classes", default="8,62,182")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (0 on a busy machine: the first "
                    "step then includes the allocator's start-up)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--budget-mib", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for c in (int(x) for x in args.classes.split(",")):
        rows.append(run("coop", args.arch, c, max(int(b) for b in args.batches.split(",")), args.steps,
                        args.image_size, args.budget_mib, device, args.precision, args.warmup))
        print(json.dumps(rows[-1]), flush=True)
        for b in (int(x) for x in args.batches.split(",")):
            rows.append(run("cocoop", args.arch, c, b, args.steps, args.image_size, args.budget_mib, device,
                            args.precision, args.warmup))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| method | C | B | prompts / step | step (s) | s / 1k prompts |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['C']} | {r['B']} | {r['prompts']} | {r['step_s']} | {r['s_per_1k_prompts']} |")


if __name__ == "__main__":
    main()
