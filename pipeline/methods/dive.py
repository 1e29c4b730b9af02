"""DiVE: Difference Vector Equalization (Suzuki et al., AAAI 2026, arXiv 2511.09973)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core.validation import Bool, Float, Int
from pipeline.core import dist
from pipeline.models.losses import (AverageVector, autocast_off, average_vector_loss, difference_vectors,
                                   pairwise_vector_loss)
from pipeline.methods import register
from pipeline.methods.common import image_features, sample_class_prompts, text_features
from pipeline.methods.flyp import FLYP, FLYPHparams

_REFERENCE_STREAM = 0xD17E  # keeps the reference draw's seed apart from other (seed, step) uses


def reference_draw(seed: int, step: int, n: int, size: int) -> torch.Tensor:
    """`size` of the positions 0…n−1, drawn uniformly without replacement by a generator seeded
    by (seed, step) alone (in draw order): the reference sampler of DiVE and of the methods
    compared with it (FLYP+replay, SnD, ARF)."""
    # plain arithmetic, not hash(): the same seed on every Python version and platform
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + _REFERENCE_STREAM) % 2**63
    g = torch.Generator().manual_seed(mixed)
    return torch.randperm(n, generator=g)[:size]


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

    Model families: the target-batch term is FLYP's, so on SigLIP it is the sigmoid loss with
    the model's logit scale and bias (see `FLYP`); AVL and PVL are distances between
    normalised embeddings, in which neither the scale nor the bias appears, so they are the
    same for every family. On CoCa the captioning decoder stays frozen, as in FLYP.

    Precision: the target batch (the FLYP term) runs in the trainer's precision (bf16
    autocast on CUDA by default), its logits in fp32. The reference rows always go through
    both towers in fp32 with autocast off, and u, v, m, AVL and PVL are fp32: f_pre and g_pre
    are fp32 (the embed stage, no autocast), and a bf16 f_ft would make u rounding noise of
    norm ~1e-2 at θ = θ_pre, which λ = 1000 turns into the dominant gradient (measured with
    CPU bf16 autocast at step 0, random weights, B' = 8, before this rule: λ(AVL + PVL) =
    0.25 on tiny-clip and 0.36 on ViT-B-32 at 224 px, regulariser gradient norms 681 and
    605 against FLYP's 2.0 and 3.5; after it, 1e-10 and 0.002-0.004, as in fp32: the
    rounding between the embed stage's eval-mode kernels and the training forward;
    benchmarks/check_precision.py). The cost: the B' reference rows run at fp32 speed (fp32
    matmuls, TF32 only if the user enables it in torch.backends), which on a GPU costs far
    more per row than the bf16 target rows; see benchmarks/device_check.sh. When the forward
    is fp32 anyway, the reference rows ride in the target rows' batch (`embed`).

    grad_accum: one reference draw and one m update per optimiser step, as with
    grad_accum 1. The first micro-batch of a step (`Method.micro`) embeds all B' reference
    rows, updates m once and weights the regulariser by the micro-batch count (the trainer
    divides each micro-batch's loss by it), so the step's regulariser gradient, m and the
    logged avl/pvl equal those of grad_accum 1 at the same global batch; later micro-batches
    add the FLYP term only. The FLYP term itself is a contrastive loss per micro-batch (its
    negatives are the micro-batch, as for FLYP), so only the regulariser is invariant.

    OPEN choices (ours; the paper has no code):
    - embeddings are L2-normalised before subtracting (λ = 1000 fits the unit scale);
    - m is one EMA shared by both modalities, m ← α_m·m + (1−α_m)·mean_j[(u_j+v_j)/2],
      starting at 0, updated with the current batch before AVL uses it, no gradient;
    - reference images use the evaluation transform (no augmentation), so f_pre from the
      cache is the pre-trained embedding of exactly the pixels the fine-tuned model sees;
    - the reference batch is drawn uniformly without replacement from the cached reference
      set once per optimiser step, from its own generator seeded by (seed, step): the same on
      every DDP rank (each rank takes a slice `[rank::world]`) and for any grad_accum or
      amount of RNG the FLYP term and data loading used; its rows are embedded in index order;
    - B' = 8 by default, a quarter of the default target batch (32). The reference batch goes
      through both towers forward and backward, so a step costs about 1 + B'/B FLYP steps in
      fp32 (benchmarks/bench_dive.py: 1.22× time, 1.02× memory at B' = B/4 on CPU), more
      under bf16 (the reference rows stay fp32). AVL and PVL are means over the reference
      pairs, unbiased at any B', and m averages over ~1/(1−α_m) = 100 steps, so a smaller
      B' adds noise, not bias. The paper does not state its B'.
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

    def reference_rows(self, step: int) -> tuple[torch.Tensor, int]:
        """This rank's reference rows for `step` (in index order) and the global B'."""
        size = min(self.hp.ref_batch_size, len(self.ctx.reference))
        chosen = reference_draw(self.ctx.seed, step, len(self.ctx.reference), size).sort().values
        return chosen[dist.rank()::dist.world_size()], size

    def embed(self, images: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None,
              device: torch.device) -> tuple[torch.Tensor, ...]:
        """f, g of the target rows and, with reference `rows`, f_ft, g_ft of those rows.

        Under autocast (a bf16 forward) the reference rows get their own fp32 forward with
        autocast off (see the class docstring). In an fp32 forward they share each tower's
        batch with the target rows: the towers act on each row alone, so the values are the
        same up to ~1e-7 of batch-layout rounding (the order of the rounding between the
        embed stage's eval-mode kernels and any training forward), and one pass costs less
        (CPU, tiny-clip, B = 32, B' = 8: DiVE step 1.20× FLYP's CPU time against 1.56× with a
        second pass)."""
        model = self.ctx.model
        if rows is None:
            return image_features(model, images), text_features(model, tokens)
        ref = self.ctx.reference
        ref_images = torch.stack([torch.as_tensor(ref.images[int(j)]) for j in rows]).to(device)
        ref_tokens = ref.tokens[rows].to(device)
        if torch.is_autocast_enabled(device.type):
            f, g = image_features(model, images), text_features(model, tokens)
            with autocast_off(device.type):
                return f, g, image_features(model, ref_images), text_features(model, ref_tokens)
        n = images.shape[0]
        f_all = image_features(model, torch.cat([images, ref_images.to(images.dtype)]))
        g_all = text_features(model, torch.cat([tokens, ref_tokens]))
        return f_all[:n], g_all[:n], f_all[n:], g_all[n:]

    def loss(self, batch, step):
        device = batch["y"].device
        tokens = sample_class_prompts(self.ctx.class_tokens, batch["y"])
        zero = torch.zeros((), device=device)
        if self.micro.index > 0:  # the step's reference batch and m update were in micro-batch 0
            f, g = self.embed(batch["image"], tokens, None, device)
            return {"flyp_loss": self.contrastive_loss(f, g), "avl_loss": zero, "pvl_loss": zero}
        ref = self.ctx.reference
        local, size = self.reference_rows(step)
        f, g, f_ref, g_ref = self.embed(batch["image"], tokens, local, device)
        terms = {"flyp_loss": self.contrastive_loss(f, g)}
        u, v = difference_vectors(f_ref, g_ref, ref.image_pre[local], ref.text_pre[local])
        # this rank's weight in the global mean over the reference batch: 1 when the slices
        # are equal (and in one process); averaged over ranks, share·local mean = global mean
        share = len(local) * dist.world_size() / size
        batch_mean = dist.mean(((u + v) / 2).mean(0).detach() * share)
        m = self.extra["avg"].update(batch_mean).to(device)
        # × count: the trainer divides every micro-batch's loss by the count, and the whole
        # regulariser of the step lives in this one
        lam = self.hp.lam * share * self.micro.count
        terms["avl_loss"] = lam * average_vector_loss(u, v, m) if self.hp.use_avl else zero
        terms["pvl_loss"] = lam * pairwise_vector_loss(u, v) if self.hp.use_pvl else zero
        return terms
