"""CLIP-LoRA: the `lora` method under the recipe of Zanella & Ben Ayed (CVPRW 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.validation import Float, Int, Str
from pipeline.methods import register
from pipeline.methods.bitfit import class_head_with_grad
from pipeline.methods.common import image_features, rank_rows
from pipeline.methods.lora import LoRA, LoRAHparams
from pipeline.models.losses import classification_loss


@dataclass(frozen=True)
class CLIPLoRAHparams(LoRAHparams):
    lr: Float = 2e-4
    weight_decay: Float = 1e-2  # the paper's 1e-2 (its code once shipped 1e2: MaxZanella/CLIP-LoRA#1)
    warmup_steps: Int = 0
    rank: Int = 2
    scale: Float = 1.0  # α; ΔW = α/√r · B A
    scaling: Str = "rsqrt_rank"
    targets: Str = "qkv"
    dropout: Float = 0.25

    def __post_init__(self):
        super().__post_init__()
        if self.head_templates != 1:
            raise ValueError(f"head_templates: {self.head_templates}: clip_lora trains against one fixed template "
                             "(the prompt file's first); use 1, or the `lora` method to average templates")


@register
class CLIPLoRA(LoRA):
    """CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language
    Models", CVPR Workshops 2024, arXiv 2405.18541; code MaxZanella/CLIP-LoRA): the project's
    `lora` method with the paper's recipe as its defaults, so that both can run side by side.

    Recipe (the `CLIPLoRAHparams` defaults): LoRA on Q, K and V of every residual block of
    both towers, rank 2, ΔW = α/√r · B A with α = 1, dropout 0.25 on the LoRA branch's input
    (training only), A Kaiming-uniform and B zero; cross-entropy against ONE template per
    class through the trained text tower; AdamW lr 2e-4, weight decay 1e-2, no warm-up.

    OPEN choices (ours):
    - the single template is the first template of the dataset's prompt file (fixed for the
      whole run), not "a photo of a {c}." (the paper's), so that a dataset's own wording is
      used; evaluation, like every other method here, uses the full prompt ensemble of the
      trained towers;
    - s is the model's own frozen logit scale (100 for OpenAI CLIP, the paper's literal);
    - the schedule is the project's cosine to 0 (the paper: cosine to 1e-6) over the
      project's step budget (`finetune.train`, the paper: 500·k iterations at batch 32);
      the batch size likewise comes from `finetune.train`;
    - the dropout mask is one Bernoulli draw per element of the block input, the LoRA
      branch's input (loralib's `lora_dropout(x)`), drawn per sample across DDP ranks
      (`common.per_row`); the text tower's forward (shared by every sample) draws the same on
      every rank;
    - K's update is a LoRA pair like Q's and V's; `in_proj_bias` and out_proj stay frozen
      (the paper's default `params: q k v`).

    Precision: as `lora` (forwards in the trainer's precision, features, logits and loss in
    fp32 with autocast off). WiSE-FT's α scales the merged update (weight space).
    """

    name = "clip_lora"
    trains_extra = r"^lora\.[\w]+\.(a|b)_(q|k|v)$"
    Hparams = CLIPLoRAHparams
    adapts = "adapts the Q, K and V projections"

    def loss(self, batch, step):
        model = self.ctx.model
        with rank_rows():  # the batch's rows: LoRA dropout masks drawn per sample across ranks
            feats = image_features(model, batch["image"])
        single = self.ctx.class_tokens[:, :1]  # the first template of every class
        head = class_head_with_grad(model, single, 0, feats.device, self.ctx.prompt_memory_bytes)
        scale = model.logit_scale.exp().detach().float()
        return {"ce_loss": classification_loss(feats, scale * head, batch["y"])}
