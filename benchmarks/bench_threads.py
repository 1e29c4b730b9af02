"""What params.yaml `threads` costs: the default run's three kinds of work on CPU at 1 and at 2
torch threads (`pipeline.core.env.set_threads`), on the built-in tiny CLIP at its sizes.

    python benchmarks/bench_threads.py                 # threads 1 vs 2, ~1 min
    python benchmarks/bench_threads.py --threads 1,2,4

- pretrain: one step of the built-in pre-training (contrastive, both towers, AdamW, batch 128),
  what the `pretrained` and `vision` stages repeat 1,000 times;
- finetune: one FLYP step (contrastive, batch 32), what every finetune entry repeats 30-300 times;
- encode: image embeddings without gradient (batch 256), what embed, the scoring in finetune
  and evaluate do.

Timing: warm-up steps excluded; the thread counts alternate within each round; the best round
is reported (the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train as bt  # noqa: E402  (imports pipeline first)
import torch  # noqa: E402

from pipeline.core.env import set_threads  # noqa: E402
from pipeline.models.losses import clip_loss  # noqa: E402


def workloads(arch: str):
    model, tokenizer, size, _ = bt.build_model(arch, 0, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    texts = tokenizer([f"a photo of shape {i}" for i in range(128)])
    images = torch.randn(256, 3, size, size, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(n: int):
        def step():
            img, txt = model.encode_image(images[:n], normalize=True), model.encode_text(texts[:n], normalize=True)
            loss = clip_loss(img, txt, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    @torch.no_grad()
    def encode():
        model.encode_image(images, normalize=True)

    return {"pretrain (batch 128)": train_step(128), "finetune FLYP (batch 32)": train_step(32),
            "encode (batch 256)": encode}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny-clip")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    counts = [int(t) for t in args.threads.split(",")]
    work = workloads(args.arch)
    best: dict[tuple[str, int], float] = {}
    for r in range(args.rounds):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            set_threads(n)
            for name, fn in work.items():
                for _ in range(args.warmup):
                    fn()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                ms = (time.perf_counter() - t0) / args.steps * 1000
                best[(name, n)] = min(best.get((name, n), float("inf")), ms)
    set_threads(counts[0])
    print(f"Machine: {bt.machine(torch.device('cpu'))} at start. Best of {args.rounds} interleaved rounds of "
          f"{args.steps} timed steps after {args.warmup} warm-up; {args.arch}.\n")
    print("| work | " + " | ".join(f"{n} thread{'s' if n > 1 else ''} (ms/step)" for n in counts)
          + " | " + " | ".join(f"speed-up at {n}" for n in counts[1:]) + " |")
    print("|---|" + "--:|" * (2 * len(counts) - 1))
    for name in work:
        row = [best[(name, n)] for n in counts]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " | "
              + " | ".join(f"{row[0] / v:.2f}×" for v in row[1:]) + " |")


if __name__ == "__main__":
    main()
