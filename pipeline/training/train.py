"""The method-agnostic trainer: AdamW, cosine schedule with warm-up, clipping, accumulation,
bf16 autocast, DDP gradient averaging, resumable checkpoints, non-finite guards.

It calls only the `Method` interface; it does not know which method it runs.

Determinism: the data order is a function of (seed, epoch) and the RNG is re-seeded from
(seed, step) before every step, so a run resumed from a checkpoint replays exactly the
steps an uninterrupted run would take (bit-identical on CPU with `num_workers: 0`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.core import dist
from pipeline.methods.base import Method, MicroBatch, count_params
from pipeline.training.optim import cosine_lr, decay_groups, scheduled_lr  # noqa: F401  (cosine_lr: the schedule's public name)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    wall_time_s: float
    samples_per_s: float
    trainable_params: int
    total_params: int
    resumed_from: int = 0
    history: list[dict] = field(default_factory=list)


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFF
    return h


def batch_plan(n: int, batch_size: int, steps: int, seed: int, multiple: int = 1) -> list[list[int]]:
    """Indices of every global batch: seeded permutations per epoch, last partial batch
    dropped, so a batch never holds the same sample twice. When the set is smaller than the
    batch, each batch is the whole (shuffled) set. The batch size is rounded down to a
    `multiple` (the DDP world size: every rank must get an equal slice).
    """
    if n <= 0:
        raise ValueError("empty training set")
    b = min(batch_size, n)
    b -= b % multiple
    if b <= 0:
        raise ValueError(f"{n} training samples cannot be split over {multiple} processes")
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < steps:
        g = torch.Generator().manual_seed(_mix(seed, epoch))
        perm = torch.randperm(n, generator=g).tolist()
        plan.extend(perm[i * b : (i + 1) * b] for i in range(n // b))
        epoch += 1
    return plan[:steps]


def epoch_steps(n: int, batch_size: int, multiple: int = 1) -> int:
    """Optimiser steps in one pass over n samples under `batch_plan`'s rule (batch min(B, n),
    rounded down to `multiple`, last partial batch dropped)."""
    b = min(batch_size, n)
    b -= b % multiple
    return n // b if b > 0 else 0


def budget_steps(n: int, batch_size: int, epochs: float, min_steps: int, max_steps: int,
                 multiple: int = 1) -> int:
    """The training length for n samples: `epochs` passes over them (rounded up to whole
    steps), bounded by [min_steps, max_steps]. A budget in epochs scales with the data; the
    bounds keep a 1-shot run from stopping after a handful of steps and a full split from
    running for ever. Example (batch 32): n = 8 -> 8 per batch, 1 step per epoch, 15 epochs
    -> 15 -> min_steps 30; n = 128 -> 4 steps per epoch -> 60; n = 4000 -> 125 per epoch -> 1875
    -> max_steps 300."""
    return int(min(max_steps, max(min_steps, math.ceil(epochs * epoch_steps(n, batch_size, multiple) - 1e-9))))


def build_optimizer(method: Method, device: torch.device) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """AdamW over the method's parameter groups, with the one weight-decay rule (`decay_groups`)."""
    groups = []
    for group in method.param_groups():
        groups += decay_groups(group["named_params"], method.hp.weight_decay, lr_scale=group.get("lr_scale", 1.0))
    all_params = [p for g in groups for p in g["params"]]
    if not all_params:
        raise ValueError(f"method {method.name!r} has no trainable parameter")
    for g in groups:
        g["lr"] = method.hp.lr * g["lr_scale"]
    fused = device.type in ("cuda", "cpu")  # one kernel for all tensors: ~6× faster steps on CPU too
    opt = torch.optim.AdamW(groups, lr=method.hp.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    return opt, all_params


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def fit(method: Method, train_set: torch.utils.data.Dataset, *, steps: int, batch_size: int,
        seed: int, device: torch.device, grad_accum: int = 1, grad_clip: float = 1.0,
        precision: str = "fp32", num_workers: int = 0, checkpoint_dir: Path | None = None,
        checkpoint_every: int = 50, log: Callable[[int, dict], None] | None = None,
        progress: bool = True, desc: str | None = None) -> TrainResult:
    """Train `method` for `steps` optimiser steps of `batch_size` global samples."""
    method.setup()
    method.root.to(device)
    optimizer, params = build_optimizer(method, device)
    world, rank = dist.world_size(), dist.rank()
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    trainable_n = count_params(params)
    # share of the pre-trained model (the PEFT convention): inserted modules (adapters,
    # heads) count as trainable but not in the total
    total_n = count_params(method.ctx.model.parameters())

    plan = batch_plan(len(train_set), batch_size, steps, seed, multiple=world)
    if len(plan[0]) != min(batch_size, len(train_set)) and dist.is_main():
        print(f"note: global batch {len(plan[0])} instead of {min(batch_size, len(train_set))}, "
              f"a multiple of the {world} processes", file=sys.stderr)
    start = 0
    ckpt = checkpoint_dir / "last.pt" if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        start = _load_checkpoint(ckpt, method, optimizer)
        if dist.is_main():
            print(f"{desc or method.name}: resuming from step {start} of {steps} ({ckpt})", file=sys.stderr, flush=True)
    history: list[dict] = []

    def lr_at(step: int) -> None:
        for g in optimizer.param_groups:
            g["lr"] = scheduled_lr(method.hp.lr * g["lr_scale"], step, steps, method.hp.warmup_steps)

    # every micro-batch, this rank's slice only; micro-batch sizes are multiples of `world`
    # so that the slices are equal (gathered features need equal shapes; averaged
    # gradients of per-rank means are the global mean only for equal slices)
    micro_plan = []
    for batch in plan:
        size = len(batch) // world
        chunks = min(grad_accum, size)
        bounds = [world * round(i * size / chunks) for i in range(chunks + 1)]
        micro_plan.append([batch[bounds[i]:bounds[i + 1]][rank::world] for i in range(chunks)])

    flat = [mb for step_mbs in micro_plan[start:] for mb in step_mbs]
    # worker RNG (augmentation with num_workers > 0) seeded per rank: without a generator
    # every DDP rank would draw the same worker seeds from its (identical) global RNG
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=flat, num_workers=num_workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(_mix(seed, start, 1 + rank, 0xDA7A)),
    )
    it = iter(loader)
    show = progress and dist.is_main() and sys.stderr.isatty()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc=desc or method.name, disable=not show, leave=False)
    method.root.train()
    t0 = time.perf_counter()
    n_samples = 0
    for step in range(start, steps):
        # drawn from by augmentation in this process (num_workers 0): one stream per rank
        torch.manual_seed(_mix(seed, 1 + step) if world == 1 else _mix(seed, 1 + step, 1 + rank))
        lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        terms_sum: dict[str, float] = {}
        mbs = micro_plan[step]
        for i, mb in enumerate(mbs):
            batch = next(it)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # the loss's random draws must not depend on how much RNG data loading used
            # (augmentation in this process with num_workers 0 draws a variable amount):
            # the same on every DDP rank, and the same as in one process
            torch.manual_seed(_mix(seed, 1 + step, 0, 1 + i))
            method.micro = MicroBatch(i, len(mbs))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                terms = method.loss(batch, step)
            total = sum(terms.values())
            if not torch.isfinite(total):
                bad = {k: float(v.detach()) for k, v in terms.items()}
                raise NonFiniteLossError(
                    f"step {step}: non-finite loss {bad}; lower the learning rate or check the data. "
                    "No output was written.")
            (total / len(mbs)).backward()
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / len(mbs)
            n_samples += len(mb) * world
        dist.average_gradients(params)
        if world > 1:  # report the loss over the global batch (terms are per-rank means)
            keys = sorted(terms_sum)
            avg = dist.mean(torch.tensor([terms_sum[k] for k in keys], dtype=torch.float64, device=device))
            terms_sum = dict(zip(keys, avg.tolist()))
        grad_norm = None
        if grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        optimizer.step()
        method.after_step(step)
        record = {"step": step + 1, **terms_sum, "loss": sum(terms_sum.values()),
                  "lr": optimizer.param_groups[0]["lr"]}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        history.append(record)
        if log is not None and dist.is_main():
            log(step + 1, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if ckpt is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, method, optimizer, step + 1)
    bar.close()
    method.micro = MicroBatch()  # a later direct `loss` call computes a whole step
    wall = time.perf_counter() - t0
    return TrainResult(
        steps=steps, wall_time_s=wall, samples_per_s=n_samples / wall if wall > 0 else 0.0,
        trainable_params=trainable_n, total_params=total_n, resumed_from=start, history=history,
    )


def _resume_state(method: Method) -> dict[str, torch.Tensor]:
    state = {n: p.detach() for n, p in method.root.named_parameters() if p.requires_grad}
    state.update({f"extra.{n}": b for n, b in method.extra.named_buffers()})
    return state


def _save_checkpoint(path: Path, method: Method, optimizer, step: int) -> None:
    if not dist.is_main():
        dist.barrier()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "state": _resume_state(method), "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, path)
    dist.barrier()


def _load_checkpoint(path: Path, method: Method, optimizer) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    expected = set(_resume_state(method))
    got = set(ckpt["state"])
    if expected != got:
        raise RuntimeError(
            f"{path}: checkpoint does not match this method's trainable state "
            f"(delete it to start over); differing keys: {sorted(expected ^ got)[:5]}")
    method.root.load_state_dict(ckpt["state"], strict=False)
    optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["step"])
