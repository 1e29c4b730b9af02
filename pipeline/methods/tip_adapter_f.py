"""Tip-Adapter-F: Tip-Adapter's cache keys fine-tuned; the epoch, α and β chosen on the
protocol's validation split."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import EvalModel, freeze
from pipeline.methods.common import view_batch
from pipeline.methods.tip_adapter import TipAdapter, TipHparams, tip_logits
from pipeline.models.losses import fp32_loss


@dataclass(frozen=True)
class TipFHparams(TipHparams):
    lr: Float = 1e-3  # AdamW (eps 1e-4), cosine to 0 over the run
    weight_decay: Float = 0.01  # torch's AdamW default, which the code keeps
    warmup_steps: Int = 0
    eps: Float = 1e-4
    epochs: Int = 20  # the run's snapshots of the keys ("epochs"), the choice of the selection

    def __post_init__(self):
        super().__post_init__()
        if self.lr <= 0:
            raise ValueError(f"lr: {self.lr} must be positive")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.eps <= 0:
            raise ValueError(f"weight_decay: {self.weight_decay}, warmup_steps: {self.warmup_steps}, eps: {self.eps}: "
                             "need weight_decay >= 0, warmup_steps >= 0, eps > 0")
        if self.epochs < 1:
            raise ValueError(f"epochs: {self.epochs} must be >= 1")


@fp32_loss
def tip_f_loss(f, head, keys, values, alpha, beta, y) -> torch.Tensor:
    return F.cross_entropy(tip_logits(f, head, keys, values, alpha, beta), y)


def snapshot_steps(total: int, epochs: int) -> list[int]:
    """After which optimiser step (1-based) each of the `epochs` snapshots is taken:
    ceil(e·total/epochs), e = 1 .. epochs (the last at the end; with fewer steps than
    epochs, several snapshots share a step)."""
    return [math.ceil(e * total / epochs) for e in range(1, epochs + 1)]


class Cache(nn.Module):
    def __init__(self, keys: torch.Tensor):
        super().__init__()
        self.keys = nn.Parameter(keys.detach().clone().float())


@register
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F (Zhang et al., ECCV 2022, arXiv 2207.09519; code gaopengcuhk/Tip-Adapter,
    `main.py::run_tip_adapter_F`): Tip-Adapter's logits with the cache keys K trainable from
    their Tip-Adapter initialisation (the code's `adapter`, a bias-free linear layer whose
    weight is K), the values L, the zero-shot head, α and β fixed (α, β at their defaults
    1.17, 1 during training, as the code's `init_alpha`, `init_beta`); CE loss; AdamW lr
    1e-3, eps 1e-4, weight decay 0.01 (torch's default, which the code keeps), cosine to 0.
    Only K trains (`trains_extra`); K is not renormalised during training (as the code).

    The epoch, α and β are post-hoc settings (`TunedClassifier`), chosen by the finetune
    stage on the selection protocol's validation split: first the epoch at the default α, β,
    then β × α for that epoch on Tip-Adapter's grid (the code's order). The run keeps K at
    each of `epochs` = 20 snapshots (`extra.snapshots` [E, M, D]); the `none` protocol takes
    the last, α = 1.17, β = 1.

    What the official code does that we do not (Tip-Adapter#11): it keeps the epoch with the
    best TEST accuracy, and reports the max of that and the searched model's test accuracy.

    OPEN choices (ours), besides Tip-Adapter's (`tip_adapter`):
    - an "epoch" is a twentieth of the run: the number of steps is the project's budget
      (`finetune.train`), not the code's 20 epochs of batch 256; snapshots after steps
      ceil(e·T/20);
    - the training features are the cache's `views` = 10 augmented passes, encoded once at
      setup: a step takes every view of each sample of its batch (B·views rows); the code
      encodes a fresh augmentation of each image every epoch (20 draws);
    - the snapshots cost E·M·D floats in the saved state (M training samples): with many
      classes at 16 shots, lower `epochs`.

    Precision: fp32 throughout (features cached at setup; the loss in fp32 with autocast off).
    """

    name = "tip_adapter_f"
    family = "probe"
    Hparams = TipFHparams
    trains = True
    trains_extra = r"^cache\.keys$"

    def setup(self) -> None:
        freeze(self.root)
        ctx, hp = self.ctx, self.hp
        keys, labels = self._build_cache()
        self.labels = labels.to(ctx.device)
        scale = ctx.model.logit_scale.detach().exp().float()
        self.head = (scale * ctx.zeroshot_head.float()).to(ctx.device)
        self.values = F.one_hot(self.labels, ctx.n_classes).float()
        if "cache" not in self.extra:
            self.extra["cache"] = Cache(keys).to(ctx.device)
            self.extra.register_buffer("cache_labels", self.labels.clone())
            self.extra.register_buffer("snapshots", keys.expand(hp.epochs, *keys.shape).clone().to(ctx.device))
        self.at_step = snapshot_steps(self.total_steps or 1, hp.epochs)

    def optimizer(self):
        return torch.optim.AdamW([{"params": [self.extra["cache"].keys], "lr_scale": 1.0}], lr=self.hp.lr,
                                 eps=self.hp.eps, weight_decay=self.hp.weight_decay)

    def loss(self, batch, step):
        keys = self.extra["cache"].keys
        f, y = view_batch(self.view_features, batch, keys.device)
        return {"ce_loss": tip_f_loss(f, self.head.to(keys.device), keys, self.values.to(keys.device),
                                      self.hp.alpha, self.hp.beta, y)}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        keys = self.extra["cache"].keys
        for e, at in enumerate(self.at_step):
            if at == step + 1:
                self.extra.snapshots[e].copy_(keys)

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {f"extra.{n}": b.detach() for n, b in self.extra.named_buffers()}

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        if alpha != 1.0:
            raise ValueError(f"{cls.name} has no WiSE-FT α (not a weight-space method); got α = {alpha}")
        expected = {"extra.snapshots", "extra.cache_labels"}
        if set(state) != expected:
            raise KeyError(f"{cls.name} state does not fit: differing keys {sorted(set(state) ^ expected)}")
        snaps = state["extra.snapshots"]
        clf = cls.classifier(model, snaps, state["extra.cache_labels"], hp, zeroshot_head, n_epochs=snaps.shape[0])
        return EvalModel(model, classifier=clf)
