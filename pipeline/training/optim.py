"""The one optimiser rule and the one schedule, shared by fine-tuning and pre-training."""

from __future__ import annotations

import math
from typing import Iterable

from torch import nn


def decay_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 **extra) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only, none on biases, norm gains,
    scalars (the logit scale) and 1-D embeddings — every tensor with ndim < 2 (open_clip's and
    nanoGPT's rule). `extra` goes into both groups (e.g. an lr scale); empty groups are left out."""
    decay, no_decay = [], []
    for _, p in named_params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, **extra})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


def scheduled_lr(base: float, step: int, total: int, warmup: int) -> float:
    """Learning rate at `step` (0-based) of `total`: linear warm-up to `base` over `warmup`
    steps, then cosine decay to 0."""
    warmup = min(warmup, max(total - 1, 0))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """The schedule as a multiplier of the base learning rate."""
    return scheduled_lr(1.0, step, total, warmup)
