"""LP-FT: linear probe first, then full fine-tuning from the probed head."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.common import LinearHead, image_free
from pipeline.methods.ft import FTHparams, FullFinetune
from pipeline.methods.lp import LinearProbe, LPHparams


@dataclass(frozen=True)
class LPFTHparams(FTHparams):
    lp_steps: Int = 60
    lp_lr: Float = 1e-3
    lp_weight_decay: Float = 0.0
    lp_batch_size: Int = 256


@register
class LPFT(FullFinetune):
    """LP-FT (Kumar et al. 2022): fit the linear probe on cached features first, then run
    FT (image encoder + head) starting from the LP head.

    OPEN (ours): the LP phase runs at setup through the same trainer (`lp_steps` AdamW
    steps at `lp_lr`, no checkpointing: it is seconds on cached features and
    deterministic, so a resumed run recomputes it identically); the step budget
    counts the FT phase only. The LP phase's trainer iterates the image-free view of the
    training set (labels and indices; LP reads its features cached once at its setup), so
    no image is decoded or transformed per LP step. With group-balanced batches
    (finetune.train.group_balanced) the LP phase draws its batches uniformly over domains too,
    as the FT phase does.

    Precision: the LP phase (feature caching and head training) runs in fp32; the FT phase
    as FT (the trainer's precision for the image tower, the loss in fp32).
    """

    name = "lpft"
    Hparams = LPFTHparams

    def setup(self) -> None:
        if "head" not in self.extra:
            lp_hp = LPHparams(lr=self.hp.lp_lr, weight_decay=self.hp.lp_weight_decay, warmup_steps=0)
            lp = LinearProbe(lp_hp, self.ctx)
            self.ctx.fit(lp, image_free(self.ctx.train_eval_set), steps=self.hp.lp_steps,
                         batch_size=self.hp.lp_batch_size, seed=self.ctx.seed, device=self.ctx.device,
                         progress=False, desc="lpft/lp", groups=self.ctx.train_groups)
            self.extra["head"] = LinearHead(lp.extra["head"].weight.detach())
        super().setup()
