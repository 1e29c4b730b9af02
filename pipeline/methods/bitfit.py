"""BitFit: only the biases inside the residual blocks of both towers train.

Also home of `PromptCE`, the training objective shared by the PEFT variants that train the
text tower (BitFit, A-CLIP, LoRA): cross-entropy on s·f(x)·g(prompt(c))ᵀ against every class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pipeline.core.validation import Float, Int
from pipeline.models.losses import classification_loss
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, Method, freeze, matches, unfreeze
from pipeline.methods.common import image_features
from pipeline.models.zeroshot import build_head_with_grad, prompt_chunk_size

# parameters of the residual blocks of both open_clip towers (`visual.transformer.resblocks.N`,
# `transformer.resblocks.N`; `text.transformer.resblocks.N` in CustomTextCLIP and CoCa, whose
# captioning decoder `text_decoder.resblocks.N` does not match)
RESBLOCK = r"(^|\.)transformer\.resblocks\.\d+\."
RESBLOCK_MODULE = re.compile(r"(^|\.)transformer\.resblocks\.\d+$")  # the blocks themselves


def require_block_towers(method: str, model: torch.nn.Module, what: str) -> None:
    """ValueError unless both towers of `model` are open_clip transformers with residual
    blocks (`transformer.resblocks.N`), which is what the block-level methods (BitFit,
    A-CLIP, LoRA, R-Adapter) edit. A timm image tower (SigLIP's and EVA-02's open_clip configs,
    `vision_cfg.timm_model_name`) or a ResNet has none: the method would silently adapt the
    text tower alone, so it refuses instead."""
    towers = {"image": [], "text": []}
    for name, _ in model.named_modules():
        if RESBLOCK_MODULE.search(name):
            towers["image" if name.startswith("visual.") else "text"].append(name)
    lacking = [t for t, blocks in towers.items() if not blocks]
    if lacking:
        kinds = {"image": type(getattr(model, "visual", None)).__name__,
                 "text": type(getattr(model, "text", model)).__name__}
        trunk = getattr(getattr(model, "visual", None), "trunk", None)
        if trunk is not None:
            kinds["image"] += f" (timm {type(trunk).__name__})"
        raise ValueError(
            f"{method} {what} in the open_clip residual blocks (`transformer.resblocks.N`) of both towers, and "
            f"this model's {' and '.join(f'{t} tower ({kinds[t]})' for t in lacking)} has none. Allowed: archs "
            f"whose towers are open_clip transformers (the CLIP ViT archs, CoCa); the SigLIP and EVA-02 configs "
            f"build a timm image tower (`vision_cfg.timm_model_name`), ResNet archs a ModifiedResNet (README, "
            f"'Model families', lists the methods that fit each).")


@dataclass(frozen=True)
class PromptCEHparams(BaseHparams):
    # templates per class in the training head: 0 = all (the evaluation head, C·T text
    # forwards with gradient per step); n > 0 = n drawn per class each step
    head_templates: Int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.head_templates < 0:
            raise ValueError(f"head_templates: {self.head_templates} must be >= 0 (0 = all)")


def class_head_with_grad(model: torch.nn.Module, class_tokens: torch.Tensor, n_templates: int,
                         device: torch.device, memory_bytes: int | None = None) -> torch.Tensor:
    """Normalised class text features [C, D] from the current text tower, with gradient.

    `n_templates = 0` averages every template (as `build_head`); otherwise each class
    averages `n_templates` templates drawn without replacement (global RNG: the trainer seeds
    it per step, so every DDP rank draws the same). The prompts go through the text tower in
    chunks whose activations fit `memory_bytes` (None: all at once), recomputed in the
    backward pass: the same loss and gradients at a peak that does not grow with C.
    """
    c, t, length = class_tokens.shape
    if 0 < n_templates < t:
        pick = torch.argsort(torch.rand(c, t), dim=1)[:, :n_templates]
        class_tokens = torch.gather(class_tokens, 1, pick[:, :, None].expand(-1, -1, length))
    class_tokens = class_tokens.to(device)
    chunk = None
    if memory_bytes is not None:
        chunk = prompt_chunk_size(model, class_tokens.reshape(-1, length), memory_bytes)
    return build_head_with_grad(model, class_tokens, chunk)


class PromptCE(Method):
    """Cross-entropy on s·f(x)·Hᵀ with H = the class-prompt text features recomputed with
    gradient every step (the text tower trains), s = the pre-trained logit scale (frozen).
    Evaluation rebuilds the full prompt-ensemble head from the trained text tower (the
    default `eval_model` with `head=None`). Not registered: a base for BitFit, A-CLIP, LoRA.

    Model families: a SigLIP logit bias is a constant shift of every class logit, which the
    cross-entropy (a softmax over the classes) cancels: the loss is the same for every family.

    Precision: the image tower and the class head's text forwards in the trainer's
    precision (bf16 autocast on CUDA); features and head rows normalised in fp32, logits and
    cross-entropy in fp32 with autocast off. DDP: the templates drawn for the head are
    shared by every sample, so every rank draws the same (the trainer's per-micro-batch seed).
    Memory: the prompts are encoded in chunks that fit `ctx.prompt_memory_bytes` (params
    `finetune.train.prompt_memory_mb`) under activation checkpointing, with the padding after
    the longest prompt cut off where that is exact (`pipeline.models.zeroshot`); both leave the loss
    and its gradients as they are, up to float summation order.
    """

    Hparams = PromptCEHparams

    def loss(self, batch, step):
        model = self.ctx.model
        feats = image_features(model, batch["image"])
        head = class_head_with_grad(model, self.ctx.class_tokens, self.hp.head_templates, feats.device,
                                    self.ctx.prompt_memory_bytes)
        scale = model.logit_scale.exp().detach().float()
        return {"ce_loss": classification_loss(feats, scale * head, batch["y"])}


@dataclass(frozen=True)
class BitFitHparams(PromptCEHparams):
    lr: Float = 1e-3
    weight_decay: Float = 0.0  # biases get none anyway (ndim < 2)
    warmup_steps: Int = 6


@register
class BitFit(PromptCE):
    """BitFit (Ben Zaken et al., ACL 2022) as a CLIP PEFT variant in the IIMM / A-CLIP papers
    (Niss et al., MIT LL, arXiv 2407.15731; code `mit-ll/IIMM`): only the bias terms inside
    the residual blocks (`transformer.resblocks`) of both towers train, with cross-entropy
    on s·f(x)·g(prompt(c))ᵀ against every class prompt. WiSE-FT applies (weight space).

    OPEN choices (ours):
    - "biases" = every bias in a residual block: attention `in_proj_bias` and
      `out_proj.bias`, MLP c_fc/c_proj and the LayerNorm biases ln_1/ln_2; biases outside the blocks (ln_pre,
      ln_post, ln_final, patch embedding) and the logit scale stay frozen;
    - the training head averages `head_templates` = 1 template per class drawn each step
      (C text forwards with gradient; all templates would be C·T, e.g. 992 for FMoW);
      evaluation uses the full prompt ensemble;
    - few-shot defaults: lr 1e-3 (BitFit's range 1e-4…1e-3; biases move little), no weight
      decay, 6 warm-up steps (10 % of the 60-step default run).

    Precision: as `PromptCE` (forward in the trainer's precision, loss in fp32).
    """

    name = "bitfit"
    family = "peft"
    soups = True
    trains_clip = RESBLOCK + r".*bias$"
    Hparams = BitFitHparams
    weight_space = True

    @classmethod
    def check_model(cls, model) -> None:
        require_block_towers(cls.name, model, "trains the biases")

    def setup(self) -> None:
        freeze(self.root)
        unfreeze(self.ctx.model, matches(RESBLOCK + r".*bias$"))
