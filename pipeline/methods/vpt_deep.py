"""VPT-deep, CLIP variant: learnable visual tokens at every layer of the image tower."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze
from pipeline.methods.common import image_features
from pipeline.methods.vit_internals import insert_visual_prompts, remove, require_vit_image_tower
from pipeline.models.losses import classification_loss


@dataclass(frozen=True)
class VPTDeepHparams(BaseHparams):
    lr: Float = 2.5e-3  # SGD (momentum 0.9, weight decay 5e-4), warm-up, cosine
    weight_decay: Float = 5e-4
    warmup_steps: Int = 6
    momentum: Float = 0.9
    n_ctx: Int = 8  # prompt tokens per layer
    depth: Int = 0  # layers with prompts, from the first: 0 = every layer (VPT-deep)

    def __post_init__(self):
        super().__post_init__()
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx: {self.n_ctx} must be >= 1")
        if self.depth < 0:
            raise ValueError(f"depth: {self.depth} must be >= 0 (0 = every layer)")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: {self.momentum} must lie in [0, 1)")


def prompt_depth(depth: int, layers: int) -> int:
    """Layers that get prompts: `depth` of the tower's `layers`, every layer for 0 or more."""
    return layers if depth == 0 else min(depth, layers)


class DeepPrompts(nn.Module):
    """`prompts` [J, M, width]: layer j's M prompt tokens, N(0, 0.02²)."""

    def __init__(self, depth: int, length: int, width: int):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(depth, length, width))
        nn.init.normal_(self.prompts, std=0.02)

    def layer(self, j: int) -> torch.Tensor:
        return self.prompts[j]


@register
class VPTDeep(Method):
    """VPT-deep (Jia et al., "Visual Prompt Tuning", ECCV 2022) in its CLIP variant, the one of
    the MaPLe repository (muzairkhattak/multimodal-prompt-learning, `trainers/vpt.py`,
    `clip/model.py`, config `VPT/vit_b16_c2_ep5_batch4_4.yaml`): M = 8 learnable tokens at
    every layer of the image tower, both towers frozen, cross-entropy on s·f(x)·Hᵀ against
    the fixed text head. Only the prompts train.

    Prompts, as their code (checked there): layer 1's tokens are appended after the patch
    tokens once the positional embedding is added, before `ln_pre` (so they are normalised by
    it, and get no positional embedding); at every later layer j ≤ J the block's input loses
    the previous layer's outputs at those positions and gets layer j's tokens instead; after
    layer J they pass through; the class token is pooled (here: the prompt tokens are dropped
    from the transformer's output, so any pooling of the tower sees the image tokens only,
    identical for the class-token pooling of CLIP). Init N(0, 0.02²) for every layer. Widths
    come from the model. Hooks on open_clip's own VisionTransformer
    (`vit_internals.insert_visual_prompts`); `check` refuses other image towers.

    Recipe (the `VPTDeepHparams` defaults): n_ctx 8, depth 0 = every layer (their
    PROMPT_DEPTH_VISION 12 = every layer of ViT-B/16); SGD lr 2.5e-3, momentum 0.9, weight
    decay 5e-4 (Dassl's defaults, their config names none); their batch 4 and 5 epochs are
    the project's `finetune.train` settings here.

    OPEN choices (ours):
    - the text head is the zero-shot prompt-ensemble head H of the dataset's prompt file
      (their code: the single template "a photo of a {c}."), computed once and fixed;
    - the original VPT (Jia et al.) prepends the prompts right after the class token and
      trains a new linear head: not this variant (the CLIP variant keeps the text head);
    - `depth` n > 0 prompts the first min(n, layers) layers;
    - warm-up: the project's linear warm-up over `warmup_steps` (6, 10 % of a 60-step run),
      then cosine to 0 (their Dassl schedule: one epoch at a constant 1e-5, then cosine);
      no gradient clipping (their code has none);
    - not a weight-space method: no WiSE-FT α (α = 0 would remove the prompts, which is no
      interpolation of weights).

    Precision: their PREC is fp16 (the whole CLIP in half precision); here the trainer's
    (bf16 autocast on CUDA): the prompts are fp32 parameters cast to the residual stream's
    dtype where they enter it; features normalised and the cross-entropy computed in fp32
    (`classification_loss`, autocast off). No random draw in the loss (DDP: nothing to share).
    """

    name = "vpt_deep"
    family = "prompt"
    trains_extra = r"^vpt\.prompts$"
    Hparams = VPTDeepHparams

    @classmethod
    def check_model(cls, model) -> None:
        require_vit_image_tower(cls.name, model, "inserts its prompt tokens")

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self._handles: list = []

    def setup(self) -> None:
        freeze(self.root)
        visual = require_vit_image_tower(self.name, self.ctx.model, "inserts its prompt tokens")
        if "vpt" not in self.extra:
            depth = prompt_depth(self.hp.depth, len(visual.transformer.resblocks))
            self.extra["vpt"] = DeepPrompts(depth, self.hp.n_ctx, visual.transformer.width).to(
                visual.class_embedding.device)
        if not self._handles:
            self._handles = self.install(self.ctx.model, self.extra["vpt"])
        self.extra["vpt"].prompts.requires_grad_(True)

    @staticmethod
    def install(model: nn.Module, prompts: DeepPrompts) -> list:
        visual = require_vit_image_tower(VPTDeep.name, model, "inserts its prompt tokens")
        return insert_visual_prompts(visual, prompts.layer, prompts.prompts.shape[0], prompts.prompts.shape[1])

    def remove_adapters(self) -> None:
        """Detach the hooks: `ctx.model` is the plain pre-trained model again."""
        remove(self._handles)

    def optimizer(self):
        return torch.optim.SGD([{"params": [self.extra["vpt"].prompts], "lr_scale": 1.0}], lr=self.hp.lr,
                               momentum=self.hp.momentum, weight_decay=self.hp.weight_decay)

    def loss(self, batch, step):
        model = self.ctx.model
        feats = image_features(model, batch["image"])
        head = self.fixed_head(model, self.ctx.zeroshot_head).to(feats)  # fp32 (float64 in the float64 tests)
        return {"ce_loss": classification_loss(feats, head, batch["y"])}

    @staticmethod
    def fixed_head(model, zeroshot_head) -> torch.Tensor:
        return model.logit_scale.exp().detach().float() * zeroshot_head.float()

    def live_eval_model(self) -> EvalModel:
        return PromptedImageEvalModel(self.ctx.model, self.extra["vpt"], self.fixed_head(self.ctx.model,
                                                                                         self.ctx.zeroshot_head))

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        if alpha != 1.0:
            raise ValueError(f"{cls.name} has no WiSE-FT α (not a weight-space method); got α = {alpha}")
        if set(state) != {"extra.vpt.prompts"}:
            raise KeyError(f"{cls.name} state does not fit: keys {sorted(state)[:5]}, expected extra.vpt.prompts")
        saved = state["extra.vpt.prompts"]
        visual = require_vit_image_tower(cls.name, model, "inserts its prompt tokens")
        if saved.shape[0] > len(visual.transformer.resblocks) or saved.shape[2] != visual.transformer.width:
            raise KeyError(f"{cls.name} prompts {tuple(saved.shape)} do not fit an image tower of "
                           f"{len(visual.transformer.resblocks)} layers of width {visual.transformer.width}")
        prompts = DeepPrompts(*saved.shape).to(saved.device)
        prompts.load_state_dict({"prompts": saved})
        prompts.to(zeroshot_head.device)
        cls.install(model, prompts)
        return PromptedImageEvalModel(model, prompts, cls.fixed_head(model, zeroshot_head))


class PromptedImageEvalModel(EvalModel):
    """The model with its prompt hooks active and a fixed head; holds the prompt module so
    that `.to(device)` moves it with the model."""

    def __init__(self, model: nn.Module, prompts: nn.Module, head: torch.Tensor):
        super().__init__(model, head=head)
        self.prompts = prompts
