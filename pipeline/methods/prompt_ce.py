"""Prompt cross-entropy: end-to-end fine-tuning of both towers against every class prompt
(the CLIP recipe of the MIT LL few-shot WILDS study)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import freeze, unfreeze
from pipeline.methods.bitfit import PromptCE, PromptCEHparams, class_head_with_grad
from pipeline.methods.common import clamp_logit_scale, image_features
from pipeline.models.losses import classification_loss, upcast



@dataclass(frozen=True)
class PromptCEFTHparams(PromptCEHparams):
    lr: Float = 1e-4
    weight_decay: Float = 1e-4
    warmup_steps: Int = 6


@register
class PromptCEFinetune(PromptCE):
    """`prompt_ce` (MIT LL, "few-shot CLIP on WILDS"; code `mit-ll/robust-vision-language-
    finetuning`, `fmdg/_wrappers.OpenCLIP` and `_model.train_wilds`): every parameter of both
    towers trains, with cross-entropy on the logits s·f(x)·g(prompt_c)ᵀ over all C class
    prompts, the text tower re-encoding the prompts every step:

        L = CE(s · F Hᵀ, y),  F = normalised image features, H[c] = normalised g(prompt_c).

    The logit scale s = exp(logit_scale) is the model's own and trains with the rest, as in
    the MIT LL code (its open_clip wrapper takes the scale the model returns, and the
    optimiser holds `model.parameters()`). Evaluation rebuilds the prompt-ensemble head from
    the fine-tuned text tower with the fine-tuned scale (the default `eval_model`, head None).
    WiSE-FT applies (weight space).

    How it differs from FLYP: FLYP contrasts each image with one sampled prompt per image in
    the batch (same-class pairs are negatives, both directions); `prompt_ce` classifies each
    image against all C class prompts (one direction, no same-class negatives).

    Paper recipe (MIT LL): Adam, lr 1e-5, weight decay 1e-4 (1e-2 on Camelyon17), batch 128,
    30 epochs, StepLR(15, 0.1) after 5 warm-up epochs, optionally SWA over the last 10
    epochs. Few-shot default (ours, `PromptCEFTHparams`): lr 1e-4 (ten times the paper's, for
    runs of tens of steps, as FLYP's), the paper's weight decay 1e-4, 6 warm-up steps (10 %
    of the 60-step default run), our cosine schedule.

    OPEN (ours):
    - the prompt of class c is one template drawn per class each step (`head_templates` = 1,
      `PromptCE`); the MIT LL code has one fixed prompt per class, which is the same thing for
      a prompt file of one template; `head_templates: 0` averages them all;
    - AdamW (decoupled decay) where the paper has Adam with L2 decay: the project's one
      optimiser;
    - the logit scale is clamped to ≤ ln 100 after each step (open_clip's pre-training rule;
      the MIT LL code does not clamp, and no run here comes near it).

    Precision and DDP: as `PromptCE` (forwards in the trainer's precision; features, head
    and loss in fp32; the templates drawn for the head are the same on every rank).
    """

    name = "prompt_ce"
    family = "robust"
    soups = True
    trains_clip = r""
    Hparams = PromptCEFTHparams
    weight_space = True

    def setup(self) -> None:
        freeze(self.root)
        # every tower the loss reads (CoCa's captioning decoder, which it does not, stays frozen)
        unfreeze(self.ctx.model, lambda n, p: not n.startswith("text_decoder."))

    def loss(self, batch, step):
        model = self.ctx.model
        feats = image_features(model, batch["image"])
        head = class_head_with_grad(model, self.ctx.class_tokens, self.hp.head_templates, feats.device,
                                    self.ctx.prompt_memory_bytes)
        scale = upcast(model.logit_scale.exp())
        return {"ce_loss": classification_loss(feats, scale * head, batch["y"])}

    def after_step(self, step: int) -> None:
        clamp_logit_scale(self.ctx.model)
