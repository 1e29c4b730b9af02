"""DiVE: Difference Vector Equalization (Suzuki et al., AAAI 2026, arXiv 2511.09973)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core.validation import Bool, Float, Int
from pipeline.core import dist
from pipeline.models.losses import AverageVector, average_vector_loss, pairwise_vector_loss
from pipeline.methods import register
from pipeline.methods.common import image_features, sample_class_prompts, text_features
from pipeline.methods.flyp import FLYP, FLYPHparams


@dataclass(frozen=True)
class DiVEHparams(FLYPHparams):
    lam: Float = 1000.0  # λ, chosen from 100…5000 in the paper, same for all datasets
    momentum: Float = 0.99  # α_m of the average vector (0 = per-batch mean, an ablation)
    ref_batch_size: Int = 8  # B' (global); the default is a quarter of finetune.train.batch_size
    use_avl: Bool = True  # ablation switches
    use_pvl: Bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lam: {self.lam} must be >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: {self.momentum} must lie in [0, 1)")
        if self.ref_batch_size < 1:
            raise ValueError(f"ref_batch_size: {self.ref_batch_size} must be positive")


@register
class DiVE(FLYP):
    """DiVE: FLYP on the target batch plus λ·(AVL + PVL) on a reference batch of
    image-caption pairs (x_j, t_j), with difference vectors u_j = f_ft(x_j) − f_pre(x_j),
    v_j = g_ft(t_j) − g_pre(t_j):
      AVL = (1/B') Σ_j (‖u_j − m‖² + ‖v_j − m‖²),  PVL = (1/B') Σ_j ‖u_j − v_j‖².
    No contrastive loss on reference data. f_pre and g_pre are read from the embed stage's
    cache (never recomputed per step).

    OPEN choices (ours; the paper has no code):
    - embeddings are L2-normalised before subtracting (λ = 1000 fits the unit scale);
    - m is one EMA shared by both modalities, m ← α_m·m + (1−α_m)·mean_j[(u_j+v_j)/2],
      starting at 0, updated with the current batch before AVL uses it, no gradient;
    - reference images use the evaluation transform (no augmentation), so f_pre from the
      cache is the pre-trained embedding of exactly the pixels the fine-tuned model sees;
    - the reference batch is drawn uniformly without replacement from the cached reference
      set each step (seeded per step, identical on every DDP rank, each rank takes a slice);
    - B' = 8 by default, a quarter of the default target batch (32). The reference batch goes
      through both towers forward and backward, so a step costs about 1 + B'/B FLYP steps
      (benchmarks/bench_dive.py: 1.22× time, 1.02× memory at B' = B/4). AVL and PVL are means
      over the reference pairs, unbiased at any B', and m averages over ~1/(1−α_m) = 100
      steps, so a smaller B' adds noise, not bias. The paper does not state its B'.
    - target and reference rows go through each tower in one batch (same values as two
      passes, fewer and larger matmuls).
    """

    name = "dive"
    Hparams = DiVEHparams
    needs_reference = True

    def setup(self) -> None:
        super().setup()
        ref = self.ctx.reference
        if ref is None or len(ref) == 0:
            raise ValueError("dive needs reference data (the embed stage's reference cache)")
        if "avg" not in self.extra:
            self.extra["avg"] = AverageVector(ref.image_pre.shape[1], self.hp.momentum)

    def loss(self, batch, step):
        model = self.ctx.model
        ref = self.ctx.reference
        device = batch["y"].device
        tokens = sample_class_prompts(self.ctx.class_tokens, batch["y"])  # FLYP's draw, first
        size = min(self.hp.ref_batch_size, len(ref))
        chosen = torch.randperm(len(ref))[:size]
        local = chosen[dist.rank()::dist.world_size()]
        ref_images = torch.stack([ref.images[int(j)] for j in local]).to(device)
        # One pass per tower over the target and reference rows together: the towers act on
        # each row independently, so this equals two passes, with fewer and larger matmuls.
        n = batch["image"].shape[0]
        f_all = image_features(model, torch.cat([batch["image"], ref_images.to(batch["image"].dtype)])).float()
        g_all = text_features(model, torch.cat([tokens, ref.tokens[local].to(device)])).float()
        terms = {"flyp_loss": self.contrastive_loss(f_all[:n], g_all[:n])}
        u = f_all[n:] - ref.image_pre[local].to(device)
        v = g_all[n:] - ref.text_pre[local].to(device)
        # this rank's weight in the global mean over the reference batch: 1 when the slices
        # are equal (and in one process); averaged over ranks, share·local mean = global mean
        share = len(local) * dist.world_size() / size
        batch_mean = dist.mean(((u + v) / 2).mean(0).detach() * share)
        m = self.extra["avg"].update(batch_mean).to(device)
        zero = torch.zeros((), device=device)
        lam = self.hp.lam * share
        terms["avl_loss"] = lam * average_vector_loss(u, v, m) if self.hp.use_avl else zero
        terms["pvl_loss"] = lam * pairwise_vector_loss(u, v) if self.hp.use_pvl else zero
        return terms
