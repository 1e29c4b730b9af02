"""A-CLIP / attention tuning: only the fused Q/K/V input projections of both towers train."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import freeze, matches, unfreeze
from pipeline.methods.bitfit import RESBLOCK, RESBLOCK_MODULE, PromptCE, PromptCEHparams, require_block_towers


@dataclass(frozen=True)
class ACLIPHparams(PromptCEHparams):
    lr: Float = 1e-4
    weight_decay: Float = 0.1
    warmup_steps: Int = 6


@register
class AttentionTuning(PromptCE):
    """A-CLIP / attention tuning (Niss et al., MIT LL; the IIMM paper arXiv 2407.15731 and its
    code `mit-ll/IIMM`): only `attn.in_proj_weight` (the fused [3d, d] Q/K/V input
    projection) of every residual block of both towers trains (≈ 30.7 M, ≈ 20 % of
    ViT-B/32), with cross-entropy on s·f(x)·g(prompt(c))ᵀ against every class prompt.
    WiSE-FT applies (weight space).

    OPEN choices (ours):
    - the Q/K/V input-projection *biases* (`in_proj_bias`) stay frozen: "weights" only, which
      is what gives the paper's 30.7 M;
    - the training head averages `head_templates` = 1 template per class drawn each step;
      evaluation uses the full prompt ensemble;
    - few-shot defaults follow FT (a fifth of the weights train): lr 1e-4, weight decay 0.1,
      6 warm-up steps.

    Precision: as `PromptCE` (forward in the trainer's precision, loss in fp32).
    """

    name = "aclip"
    family = "peft"
    soups = True
    trains_clip = RESBLOCK + r"attn\.in_proj_weight$"
    Hparams = ACLIPHparams
    weight_space = True

    @classmethod
    def check_model(cls, model) -> None:
        require_block_towers(cls.name, model, "trains the fused Q/K/V projections (`attn.in_proj_weight`)")
        blocks = {n for n, _ in model.named_modules() if RESBLOCK_MODULE.search(n)}
        fused = {n.rsplit(".attn.", 1)[0] for n, _ in model.named_parameters()
                 if re.search(RESBLOCK + r"attn\.in_proj_weight$", n)}
        if blocks - fused:
            raise ValueError(f"{cls.name} trains the fused Q/K/V projection `attn.in_proj_weight` of every residual "
                             f"block, and {sorted(blocks - fused)[0]} has none (its attention is not open_clip's). "
                             f"Allowed: archs built of open_clip's attention blocks (CLIP ViT archs, CoCa)")

    def setup(self) -> None:
        freeze(self.root)
        unfreeze(self.ctx.model, matches(RESBLOCK + r"attn\.in_proj_weight$"))
