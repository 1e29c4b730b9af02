"""Linear probe on cached features."""

from __future__ import annotations

from dataclasses import dataclass


from pipeline.core.validation import Float, Int
from pipeline.models.losses import classification_loss
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze
from pipeline.methods.common import LinearHead, cached_features


@dataclass(frozen=True)
class LPHparams(BaseHparams):
    lr: Float = 1e-3
    weight_decay: Float = 0.0
    warmup_steps: Int = 0


@register
class LinearProbe(Method):
    """LP: frozen image encoder, linear head initialised from the zero-shot head (rows
    s·H_zs, no bias), cross-entropy, trained on features cached once at setup (no image
    forward per step).

    OPEN (ours): features are computed without augmentation (the eval transform); the head
    is trained with minibatch AdamW like every other method rather than L-BFGS logistic
    regression, so that it shares the trainer, schedule and logging.

    Precision: fp32 throughout: the features are cached at setup, before the trainer's
    autocast region, and the head and loss are fp32 with autocast off.
    """

    name = "lp"
    family = "probe"
    soups = True
    trains_extra = r"^head\.weight$"
    Hparams = LPHparams
    weight_space = True  # the head interpolates with the zero-shot head (WiSE-FT)
    uses_images = False

    def setup(self) -> None:
        freeze(self.root)
        ctx = self.ctx
        self.features = cached_features(ctx, EvalModel(ctx.model), "lp features")
        scale = ctx.model.logit_scale.exp().detach().float()
        self.extra["head"] = LinearHead(scale * ctx.zeroshot_head.float()).to(ctx.device)

    def loss(self, batch, step):
        feats = self.features[batch["index"].to(self.features.device)]
        return {"ce_loss": classification_loss(feats, self.extra["head"].weight, batch["y"])}
