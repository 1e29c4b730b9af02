"""FLYP+replay: DiVE's stand-in for ARF (Suzuki et al., AAAI 2026, arXiv 2511.09973)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core import dist
from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.common import sample_class_prompts
from pipeline.methods.dive import DiVE
from pipeline.methods.flyp import FLYPHparams


@dataclass(frozen=True)
class FLYPReplayHparams(FLYPHparams):
    lam_r: Float = 1.0  # λ_r, the weight of the reference (replay) contrastive term
    ref_batch_size: Int = 8  # B' (global), DiVE's default: a quarter of finetune.train.batch_size

    def __post_init__(self):
        super().__post_init__()
        if self.lam_r < 0:
            raise ValueError(f"lam_r: {self.lam_r} must be >= 0")
        if self.ref_batch_size < 1:
            raise ValueError(f"ref_batch_size: {self.ref_batch_size} must be positive")


@register
class FLYPReplay(DiVE):
    """FLYP+replay (DiVE's ARF stand-in, Suzuki et al. AAAI 2026): FLYP + λ_r·CLIP loss on references.

    No official code. L = L_FLYP(target batch) + λ_r · L_CLIP(reference batch of image-caption pairs), both
    towers and the logit scale trained, as FLYP.

    It is DiVE with the reference loss swapped: the same reference set (the embed stage's
    reference cache), the same reference sampler (`DiVE.reference_rows`: B' rows drawn
    uniformly without replacement once per optimiser step from a generator seeded by
    (seed, step), the same on every DDP rank), the same reference forward (`DiVE.embed`: the
    evaluation transform, and fp32 with autocast off under bf16), the same grad_accum rule
    (the whole reference term in the step's first micro-batch, weighted by the micro-batch
    count), and the same FLYP term and defaults (`FLYPHparams`). So FLYP+replay and DiVE
    differ only in the reference loss. The cached pre-trained embeddings are not used (the
    formula has no pre-trained term).

    OPEN choices (baselines.md; ours, the paper gives only the formula):
    - two separate contrastive terms: target and reference rows do not share a softmax;
    - λ_r = 1; B' = 8 (DiVE's, B/4 of the default target batch);
    - the reference term is the family's contrastive loss with the trained scale (CLIP's
      symmetric InfoNCE; SigLIP's sigmoid loss with its bias on a model with `logit_bias`),
      as FLYP's term is;
    - DDP: the reference rows are split over ranks (`[rank::world]`) and their features
      gathered with gradients (a row permutation of the one-process batch, which leaves the
      loss unchanged), so B' must be a multiple of the number of processes (refused at the
      first step otherwise, naming the key).

    Precision: the FLYP term as in FLYP; the reference rows in fp32 with autocast off under
    bf16 (DiVE's rule, kept so that only the loss differs), the logits and loss in fp32.
    """

    name = "flyp_replay"
    Hparams = FLYPReplayHparams
    needs_reference = True

    def setup(self) -> None:
        super(DiVE, self).setup()  # FLYP's parameters; no average vector
        ref = self.ctx.reference
        if ref is None or len(ref) == 0:
            raise ValueError("flyp_replay needs reference data (the embed stage's reference cache)")

    def loss(self, batch, step):
        device = batch["y"].device
        tokens = sample_class_prompts(self.ctx.class_tokens, batch["y"])
        if self.micro.index > 0:  # the step's reference term was in micro-batch 0
            f, g = self.embed(batch["image"], tokens, None, device)
            return {"flyp_loss": self.contrastive_loss(f, g), "replay_loss": torch.zeros((), device=device)}
        local, size = self.reference_rows(step)
        if size % dist.world_size():
            raise ValueError(f"flyp_replay hparams ref_batch_size: {size} reference rows cannot be split equally "
                             f"over {dist.world_size()} processes; use a multiple of {dist.world_size()}")
        f, g, f_ref, g_ref = self.embed(batch["image"], tokens, local, device)
        lam = self.hp.lam_r * self.micro.count  # the trainer divides each micro-batch's loss by the count
        return {"flyp_loss": self.contrastive_loss(f, g), "replay_loss": lam * self.contrastive_loss(f_ref, g_ref)}
