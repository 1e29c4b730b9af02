"""FLYP: fine-tune like you pre-train."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core.validation import Float, Int
from pipeline.core import dist
from pipeline.models.losses import contrastive_loss, upcast
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, Method, freeze, unfreeze
from pipeline.methods.common import clamp_logit_scale, image_features, sample_class_prompts, text_features



@dataclass(frozen=True)
class FLYPHparams(BaseHparams):
    lr: Float = 1e-4
    weight_decay: Float = 0.2
    warmup_steps: Int = 6


@register
class FLYP(Method):
    """FLYP (Goyal et al. 2023): both towers trained with the CLIP contrastive loss between
    images and class-prompt texts, one template sampled per image each step:
    L = ½[CE(s·F Gᵀ, arange B) + CE(s·G Fᵀ, arange B)], logit scale trained. Same-class
    pairs in a batch are negatives (as in the paper). Evaluation rebuilds the zero-shot
    head from the fine-tuned text tower.

    Paper recipe (iWildCam/FMoW): 20 epochs, lr 1e-5, wd 0.2, batch 256, 500 warm-up steps.
    Few-shot default (ours, the values in `FLYPHparams`): lr 1e-4 (ten times the paper's, for
    runs of tens of steps instead of thousands), the paper's wd 0.2, 6 warm-up steps (10 % of
    the 60-step default run).
    OPEN (ours): the logit scale is clamped to ≤ ln 100 after each step, as in open_clip's
    pre-training; features are gathered across DDP ranks with gradients.

    Model families ("fine-tune like you pre-train": the loss is the family's pre-training
    loss, `pipeline.models.losses.contrastive_loss`):
    - SigLIP (a model with `logit_bias`): the pairwise sigmoid loss
      −(1/B) Σ_ij log σ(z_ij (s·f_i·g_j + b)) over the (gathered) batch with the model's own
      logit scale s and bias b, both trained (the bias unclamped, as in SigLIP's
      pre-training), instead of the symmetric InfoNCE; same-class pairs stay negatives;
    - CoCa: the contrastive term only, not CoCa's captioning loss (OPEN, ours: the class
      prompts are not captions of the images, and evaluation reads only the towers'
      embeddings); the captioning decoder (`text_decoder`), which that term cannot reach,
      stays frozen rather than listed as trained;
    - EVA-02 and CLIP: the CLIP loss as above.

    Precision: both towers in the trainer's precision (bf16 autocast on CUDA); the features
    are normalised, and the logits and loss computed, in fp32 with autocast off
    (`pipeline.models.losses.fp32_loss`): bf16 logits at scale 100 near cos ≈ 1 step by ~0.4.
    DDP: the template drawn per image follows `common.per_row` (each image gets the draw
    it would get in one process).
    """

    name = "flyp"
    family = "robust"
    soups = True
    trains_clip = r""
    Hparams = FLYPHparams
    weight_space = True

    def setup(self) -> None:
        freeze(self.root)
        unfreeze(self.ctx.model, lambda n, p: not n.startswith("text_decoder."))

    def contrastive_loss(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The family's contrastive loss (CLIP's, or SigLIP's sigmoid loss for a model with a
        logit bias) of this rank's image and class-prompt features, gathered over ranks."""
        model = self.ctx.model
        bias = getattr(model, "logit_bias", None)
        return contrastive_loss(dist.gather(upcast(f)), dist.gather(upcast(g)), upcast(model.logit_scale.exp()),
                                None if bias is None else upcast(bias))

    def loss(self, batch, step):
        model = self.ctx.model
        tokens = sample_class_prompts(self.ctx.class_tokens, batch["y"])
        f, g = image_features(model, batch["image"]), text_features(model, tokens)
        return {"flyp_loss": self.contrastive_loss(f, g)}

    def after_step(self, step: int) -> None:
        clamp_logit_scale(self.ctx.model)
