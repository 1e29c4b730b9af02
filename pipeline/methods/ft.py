"""Full fine-tuning of the image encoder with a linear head (the WiSE-FT recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.validation import Float, Int
from pipeline.models.losses import classification_loss
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, Method, freeze, unfreeze
from pipeline.methods.common import LinearHead, image_features


@dataclass(frozen=True)
class FTHparams(BaseHparams):
    lr: Float = 1e-4
    weight_decay: Float = 0.1
    warmup_steps: Int = 6


@register
class FullFinetune(Method):
    """FT (Wortsman et al. 2022, WiSE-FT recipe): image encoder + linear head initialised
    from the zero-shot head (rows s·H_zs, no bias), cross-entropy, AdamW, cosine with
    warm-up. The text tower is unused after the head is built. The logit scale stays
    frozen (it is folded into the head rows).

    Defaults (`FTHparams`, our few-shot choice): lr 1e-4, wd 0.1 (the WiSE-FT recipe's wd;
    its lr 3e-5 is for full-data runs of thousands of steps), 6 warm-up steps (10 % of the
    60-step default run).

    Precision: the image tower in the trainer's precision (bf16 autocast on CUDA); features
    normalised in fp32, the head (fp32 weights) applied and the cross-entropy computed in
    fp32 with autocast off. No random draw in the loss."""

    name = "ft"
    family = "robust"
    soups = True
    trains_clip = r"^visual\."
    trains_extra = r"^head\.weight$"
    Hparams = FTHparams
    weight_space = True

    def setup(self) -> None:
        freeze(self.root)
        unfreeze(self.ctx.model, lambda n, p: n.startswith("visual."))
        if "head" not in self.extra:
            scale = self.ctx.model.logit_scale.exp().detach().float()
            self.extra["head"] = LinearHead(scale * self.ctx.zeroshot_head.float())
        self.extra["head"].weight.requires_grad_(True)

    def loss(self, batch, step):
        feats = image_features(self.ctx.model, batch["image"])  # fp32 (float64 stays: the DDP tests' runs)
        return {"ce_loss": classification_loss(feats, self.extra["head"].weight, batch["y"])}
