"""The method-agnostic trainer: AdamW, cosine schedule with warm-up, clipping, accumulation,
bf16 autocast, DDP gradient averaging, resumable checkpoints, non-finite guards.

It calls only the `Method` interface; it does not know which method it runs.

Determinism: the data order is a function of (seed, epoch) and the RNG is re-seeded from
(seed, step) before every step, so a run resumed from a checkpoint replays exactly the
steps an uninterrupted run would take (bit-identical on CPU with `num_workers: 0`).

Two options, both off by default (`finetune.train` in params.yaml):

- **Group-balanced batches** (`groups=`, `finetune.train.group_balanced`): each batch is drawn
  as WILDS' `get_train_loader('standard', ..., uniform_over_groups=True)` draws it, seeded
  from (seed, step) (`balanced_plan`).
- **SWA** (`swa_start=`, `finetune.train.swa_start`): the trainable parameters are averaged
  over the late steps of the run and the average replaces them at the end (`swa_steps`,
  `swa_refusal`).
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
from torch.optim.swa_utils import get_swa_multi_avg_fn
from torch.utils.data import WeightedRandomSampler

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
    swa_count: int = 0  # snapshots in the SWA average that replaced the weights (0: SWA off)
    runs: int = 1  # trainings of `steps` steps each, combined by the method (`Method.n_runs`)


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFF
    return h


def run_seed_of(seed: int, run: int) -> int:
    """The training seed of run `run` of a method that trains several (`Method.n_runs`): the
    entry's seed for the first, a value mixed from (seed, run) for the others, so that no run
    of one seed repeats a run of another seed (seed + run would: run 1 of seed 0 = run 0 of
    seed 1)."""
    return seed if run == 0 else _mix(seed, run, 0x5EED)


def _global_batch(n: int, batch_size: int, multiple: int) -> int:
    """The global batch of a plan over n samples: min(B, n) rounded down to `multiple`."""
    b = min(batch_size, n)
    return b - b % multiple


def _check_batch(n: int, b: int, multiple: int) -> None:
    if n <= 0:
        raise ValueError("empty training set")
    if b <= 0:
        raise ValueError(f"{n} training samples cannot be split over {multiple} processes")


def batch_plan(n: int, batch_size: int, steps: int, seed: int, multiple: int = 1) -> list[list[int]]:
    """Indices of every global batch: seeded permutations per epoch, last partial batch
    dropped, so a batch never holds the same sample twice. When the set is smaller than the
    batch, each batch is the whole (shuffled) set. The batch size is rounded down to a
    `multiple` (the DDP world size: every rank must get an equal slice).
    """
    b = _global_batch(n, batch_size, multiple)
    _check_batch(n, b, multiple)
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < steps:
        g = torch.Generator().manual_seed(_mix(seed, epoch))
        perm = torch.randperm(n, generator=g).tolist()
        plan.extend(perm[i * b : (i + 1) * b] for i in range(n // b))
        epoch += 1
    return plan[:steps]


def balanced_plan(groups: torch.Tensor, batch_size: int, steps: int, seed: int,
                  multiple: int = 1) -> list[list[int]]:
    """Group-balanced global batches: WILDS' `get_train_loader('standard', dataset, B,
    uniform_over_groups=True, grouper=...)` (wilds/common/data_loaders.py): sample i is drawn
    with probability ∝ 1 / |group(i)|, with replacement (`WeightedRandomSampler`), so every
    group present is drawn equally often in expectation, 1/G of the draws for G groups, and a
    sample of a small group appears in a batch more than once.

    `groups`: one group index per sample (any integers; only equality matters). The batch
    size follows `batch_plan`'s rule (min(B, n), rounded down to `multiple`), so the step
    budget and the DDP slices are those of the default plan; WILDS' own epoch is n draws in
    batches of B, which is the same for n ≥ B and one batch of n draws for n < B. OPEN
    (ours): each step's batch comes from its own generator, seeded from (seed, step), so a
    step's batch does not depend on the length of the run (draws with replacement have no
    epochs to seed by).
    """
    groups = torch.as_tensor(groups, dtype=torch.long).flatten()
    n = len(groups)
    b = _global_batch(n, batch_size, multiple)
    _check_batch(n, b, multiple)
    _, group_of, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    weights = (1.0 / counts.double())[group_of]
    plan = []
    for step in range(steps):
        g = torch.Generator().manual_seed(_mix(seed, step, 0x6B0A))
        plan.append(list(WeightedRandomSampler(weights, b, replacement=True, generator=g)))
    return plan


def epoch_steps(n: int, batch_size: int, multiple: int = 1) -> int:
    """Optimiser steps in one pass over n samples under `batch_plan`'s rule (batch min(B, n),
    rounded down to `multiple`, last partial batch dropped)."""
    b = _global_batch(n, batch_size, multiple)
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


def swa_steps(steps: int, start: float, every: int = 1) -> list[int]:
    """The optimiser steps (counted from 1) whose weights SWA averages: s = steps,
    steps − every, steps − 2·every, … while s > ⌊start · steps⌋; none when start is 0 (off).
    OPEN (ours): anchored at the last step, so the final weights are always in the average and
    it has at least one snapshot whatever `every` is."""
    if start <= 0:
        return []
    return list(range(steps, math.floor(start * steps), -every))[::-1]


def swa_refusal(method_cls: type) -> str | None:
    """Why SWA cannot apply to a method (None: it can). SWA averages the trainable parameters
    and saves the average, so it needs a weight-space method (`Method.weight_space`: its
    trained weights live in the pre-trained weight space, where averaging iterates is
    meaningful) whose saved state is its trainable parameters (`Method.trained_state` not
    overridden: R-Adapter saves its own accumulated EMA, which an average of the parameters
    would never reach). A vision-only method (`backbone` "vision", e.g. `vision_ft`, the MIT LL
    study's SWA baseline) qualifies too: its iterates share one weight space; what it lacks for
    WiSE-FT is only the α = 0 end (a new head has no pre-trained value)."""
    name = method_cls.name
    if method_cls.n_runs > 1:
        return (f"SWA averages the iterates of one training, and {name} trains {method_cls.n_runs} and combines "
                "them (Method.n_runs)")
    if not method_cls.weight_space and method_cls.backbone != "vision":
        return f"SWA averages weights, and {name} is not a weight-space method (Method.weight_space)"
    if method_cls.trained_state is not Method.trained_state:
        return (f"SWA replaces the trainable parameters by their average, and {name} saves something else "
                "(its own trained_state, e.g. an accumulated average of its own)")
    return None


class _RunningMean:
    """SWA's equal-weight running mean of `params` (Izmailov et al. 2018, Algorithm 1:
    w̄ ← (w̄·n + w) / (n + 1)), updated by `torch.optim.swa_utils.get_swa_multi_avg_fn` (one
    foreach lerp). Kept over the trainable parameters only: `AveragedModel` would deep-copy
    the whole model, frozen towers included."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.mean: list[torch.Tensor] = [torch.zeros_like(p) for p in params]
        self.count = 0
        self._update = get_swa_multi_avg_fn()

    @torch.no_grad()
    def add(self) -> None:
        current = [p.detach() for p in self.params]
        if self.count == 0:
            for m, p in zip(self.mean, current):
                m.copy_(p)
        else:
            self._update(self.mean, current, self.count)
        self.count += 1

    @torch.no_grad()
    def swap_in(self) -> None:
        """The parameters become the average."""
        for p, m in zip(self.params, self.mean):
            p.copy_(m)


def _batchnorm_layers(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


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
        progress: bool = True, desc: str | None = None, groups: torch.Tensor | None = None,
        swa_start: float = 0.0, swa_every: int = 1) -> TrainResult:
    """Train `method` for `steps` optimiser steps of `batch_size` global samples.

    The optimiser is AdamW with the method's warm-up and cosine schedule and `grad_clip`,
    unless the method brings its own (`Method.optimizer`: LP++'s data-driven step sizes,
    CLAP's SGD), which owns its step sizes: no clipping, and the schedule only for its groups
    that carry an `lr_scale`.

    `groups` (one group index per sample of `train_set`, e.g. its domain): batches are drawn
    uniformly over the groups (`balanced_plan`); None: `batch_plan`, each sample once per epoch.

    `swa_start` > 0: Stochastic Weight Averaging (Izmailov et al., "Averaging Weights Leads to
    Wider Optima and Better Generalization", UAI 2018). After the optimiser steps of
    `swa_steps(steps, swa_start, swa_every)` (the last step, and every `swa_every`-th before it
    after the first ⌊swa_start · steps⌋) the trainable parameters join an equal-weight running
    mean (torch.optim.swa_utils' SWA update), and at the end the mean replaces them, so
    `trained_state()` (hence evaluation and WiSE-FT) sees the SWA weights. The mean and its
    count are in the checkpoint: a resumed run ends with the same weights. Under DDP every rank
    holds the same parameters after each step (averaged gradients, same updates), so each rank
    averages its own copy, with no communication, and all end with the same mean. OPEN
    (ours): the method's learning-rate schedule is unchanged (warm-up and cosine; no SWALR
    constant or cyclical phase), so SWA on and off differ only in the averaging; the average
    is over the late, low-lr iterates. BatchNorm: the shipped architectures (open_clip's
    towers) normalise with LayerNorm, which has no running statistics, so
    `torch.optim.swa_utils.update_bn` is not needed. A model with BatchNorm layers (a timm
    ResNet) is refused: its running statistics belong to the last weights, not the average,
    and recomputing them (`update_bn` over the training loader) would need the trainer to
    feed the method's model its inputs, while `trained_state()` does not save them anyway.
    Methods `swa_refusal` names (not weight-space, or saving other than their parameters, or
    training several runs) are refused; the `check` stage refuses them first, by their params key.

    A method with `n_runs` > 1 (Model Stock) is trained `n_runs` times for `steps` steps each:
    every run starts from the state `setup` left (parameters and `extra` buffers put back, a
    fresh optimiser), run r with the training seed `run_seed_of(seed, r)` (its batches,
    augmentation and loss draws; run 0 is the plain run of `seed`), the same training set and
    settings; then `Method.combine` makes the trained model of the runs' final states. Steps
    are numbered across runs in the history and the log (run r's step s is r·steps + s). The
    checkpoint names the run and holds the finished runs' final states, so a killed entry
    resumes inside the run it was in and never trains a finished run again.
    """
    if swa_start < 0 or swa_start >= 1 or swa_every < 1:
        raise ValueError(f"SWA: start {swa_start} must lie in [0, 1) (0 = off) and every {swa_every} be >= 1")
    if swa_start > 0 and (reason := swa_refusal(type(method))):
        raise ValueError(f"finetune.train.swa_start: {reason}; set finetune.train.swa_start: 0 (off)")
    if groups is not None and len(groups) != len(train_set):
        raise ValueError(f"groups: {len(groups)} group indices for {len(train_set)} training samples")
    method.total_steps = steps
    method.setup()
    if swa_start > 0 and (bn := _batchnorm_layers(method.root)):
        raise ValueError(
            f"finetune.train.swa_start: the model has BatchNorm layers ({bn[0]}, {len(bn)} in all), whose running "
            "statistics would have to be recomputed for the averaged weights (torch.optim.swa_utils.update_bn); "
            "the trainer supports SWA only for models without BatchNorm (LayerNorm: the open_clip towers). "
            "Set finetune.train.swa_start: 0 (off)")
    method.root.to(device)
    n_runs = type(method).n_runs
    if n_runs < 1:
        raise ValueError(f"method {method.name!r}: n_runs {n_runs} must be >= 1")
    # where every run starts (a method that trains several runs and combines them)
    start_state = _run_state(method) if n_runs > 1 else None

    def make_optimizer() -> tuple[torch.optim.Optimizer, list[nn.Parameter], bool]:
        # a method's own optimiser owns its step sizes: no clipping, and the schedule only for
        # the groups that carry an `lr_scale` (`Method.optimizer`)
        own = method.optimizer()
        if own is None:
            return (*build_optimizer(method, device), False)
        own_params = [p for g in own.param_groups for p in g["params"]]
        if not own_params:
            raise ValueError(f"method {method.name!r} has no trainable parameter")
        return own, own_params, True

    optimizer, params, owns_steps = make_optimizer()
    world, rank = dist.world_size(), dist.rank()
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    trainable_n = count_params(params)
    # share of the pre-trained model (the PEFT convention): inserted modules (adapters,
    # heads) count as trainable but not in the total
    total_n = count_params(method.ctx.model.parameters())

    averaging = set(swa_steps(steps, swa_start, swa_every))
    swa = _RunningMean(params) if averaging else None
    start, start_run, finished = 0, 0, []
    ckpt = checkpoint_dir / "last.pt" if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        start, start_run, finished = _load_checkpoint(ckpt, method, optimizer, swa, n_runs)
        if dist.is_main():
            where = f"step {start} of {steps}" + (f" of run {start_run + 1} of {n_runs}" if n_runs > 1 else "")
            print(f"{desc or method.name}: resuming from {where} ({ckpt})", file=sys.stderr, flush=True)
    resumed_from = start_run * steps + start  # (counted across runs)
    history: list[dict] = []

    def lr_at(step: int) -> None:
        for g in optimizer.param_groups:
            if "lr_scale" in g:  # every group of the trainer's AdamW; a method's own that asks for it
                g["lr"] = scheduled_lr(method.hp.lr * g["lr_scale"], step, steps, method.hp.warmup_steps)

    show = progress and dist.is_main() and sys.stderr.isatty()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps * n_runs, initial=start_run * steps + start, desc=desc or method.name, disable=not show,
               leave=False)
    method.root.train()
    t0 = time.perf_counter()
    n_samples = 0
    for run in range(start_run, n_runs):
        run_seed = run_seed_of(seed, run)
        if groups is None:
            plan = batch_plan(len(train_set), batch_size, steps, run_seed, multiple=world)
        else:
            plan = balanced_plan(groups, batch_size, steps, run_seed, multiple=world)
        if run == start_run and len(plan[0]) != min(batch_size, len(train_set)) and dist.is_main():
            print(f"note: global batch {len(plan[0])} instead of {min(batch_size, len(train_set))}, "
                  f"a multiple of the {world} processes", file=sys.stderr)

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
            generator=torch.Generator().manual_seed(_mix(run_seed, start, 1 + rank, 0xDA7A)),
        )
        it = iter(loader)
        for step in range(start, steps):
            # drawn from by augmentation in this process (num_workers 0): one stream per rank
            torch.manual_seed(_mix(run_seed, 1 + step) if world == 1 else _mix(run_seed, 1 + step, 1 + rank))
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
                torch.manual_seed(_mix(run_seed, 1 + step, 0, 1 + i))
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
            if grad_clip > 0 and not owns_steps:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
            optimizer.step()
            method.after_step(step)
            if swa is not None and step + 1 in averaging:
                swa.add()
            # steps are numbered across runs: run r's step s is r·steps + s
            record = {"step": run * steps + step + 1, **terms_sum, "loss": sum(terms_sum.values()),
                      "lr": optimizer.param_groups[0]["lr"]}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            history.append(record)
            if log is not None and dist.is_main():
                log(record["step"], record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if ckpt is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                _save_checkpoint(ckpt, method, optimizer, step + 1, swa, run, finished)
        start = 0
        if n_runs > 1:
            finished.append(_run_state(method))
            if run + 1 < n_runs:  # the next run starts where setup left, with a fresh optimiser
                _put_back(method, start_state)
                optimizer, params, owns_steps = make_optimizer()
                if ckpt is not None:  # a kill in the next run never trains this one again
                    _save_checkpoint(ckpt, method, optimizer, 0, swa, run + 1, finished)
    bar.close()
    method.micro = MicroBatch()  # a later direct `loss` call computes a whole step
    if n_runs > 1:
        method.combine(start_state, finished)
    if swa is not None:
        swa.swap_in()
    wall = time.perf_counter() - t0
    return TrainResult(
        steps=steps, wall_time_s=wall, samples_per_s=n_samples / wall if wall > 0 else 0.0,
        trainable_params=trainable_n, total_params=total_n, resumed_from=resumed_from,
        history=history, swa_count=swa.count if swa is not None else 0, runs=n_runs,
    )


def _resume_state(method: Method) -> dict[str, torch.Tensor]:
    state = {n: p.detach() for n, p in method.root.named_parameters() if p.requires_grad}
    state.update({f"extra.{n}": b for n, b in method.extra.named_buffers()})
    return state


def _run_state(method: Method) -> dict[str, torch.Tensor]:
    """A copy of what a run trains (`_resume_state`): a run's start or its final state."""
    return {k: v.detach().clone() for k, v in _resume_state(method).items()}


@torch.no_grad()
def _put_back(method: Method, state: dict[str, torch.Tensor]) -> None:
    method.root.load_state_dict(state, strict=False)


def _swa_state(method: Method, swa: _RunningMean) -> dict:
    names = {id(p): n for n, p in method.root.named_parameters()}
    return {"count": swa.count, "mean": {names[id(p)]: m for p, m in zip(swa.params, swa.mean)}}


def _save_checkpoint(path: Path, method: Method, optimizer, step: int, swa: _RunningMean | None = None,
                     run: int = 0, finished: list[dict] | None = None) -> None:
    if not dist.is_main():
        dist.barrier()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {"step": step, "state": _resume_state(method), "optimizer": optimizer.state_dict()}
    if swa is not None:
        state["swa"] = _swa_state(method, swa)
    if type(method).n_runs > 1:  # which run, and the final states of the runs before it
        state["run"] = run
        state["finished"] = list(finished or [])
    torch.save(state, tmp)
    os.replace(tmp, path)
    dist.barrier()


def _load_checkpoint(path: Path, method: Method, optimizer, swa: _RunningMean | None = None,
                     n_runs: int = 1) -> tuple[int, int, list[dict]]:
    """Load a checkpoint into the method and optimiser; returns (step, run, the finished runs'
    final states)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    expected = set(_resume_state(method))
    got = set(ckpt["state"])
    if expected != got:
        raise RuntimeError(
            f"{path}: checkpoint does not match this method's trainable state "
            f"(delete it to start over); differing keys: {sorted(expected ^ got)[:5]}")
    if (swa is None) != ("swa" not in ckpt):
        raise RuntimeError(f"{path}: checkpoint {'lacks' if swa is not None else 'holds'} an SWA average "
                           f"while this run has SWA {'on' if swa is not None else 'off'} (delete it to start over)")
    run, finished = int(ckpt.get("run", 0)), list(ckpt.get("finished", []))
    if (n_runs > 1) != ("run" in ckpt) or not 0 <= run < n_runs or len(finished) != run:
        raise RuntimeError(f"{path}: checkpoint of run {run} with {len(finished)} finished runs does not match this "
                           f"method's {n_runs} run(s) (delete it to start over)")
    method.root.load_state_dict(ckpt["state"], strict=False)
    optimizer.load_state_dict(ckpt["optimizer"])
    if swa is not None:
        saved = ckpt["swa"]["mean"]
        names = list(_swa_state(method, swa)["mean"])
        if set(saved) != set(names):
            raise RuntimeError(f"{path}: the checkpoint's SWA average does not match the trainable parameters "
                               f"(delete it to start over)")
        with torch.no_grad():
            for name, m in zip(names, swa.mean):
                m.copy_(saved[name])
        swa.count = int(ckpt["swa"]["count"])
    if finished:
        device = next(iter(_resume_state(method).values())).device
        finished = [{k: v.to(device) for k, v in state.items()} for state in finished]
    return int(ckpt["step"]), run, finished
