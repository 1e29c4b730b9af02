"""MaPLe: multi-modal prompt learning, text prompts coupled to vision prompts layer by layer."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze
from pipeline.methods.bitfit import class_head_with_grad
from pipeline.methods.common import image_features
from pipeline.methods.vit_internals import (insert_text_prompts, insert_visual_prompts, remove,
                                            require_text_tower, require_vit_image_tower)
from pipeline.models.losses import classification_loss
from pipeline.models.zeroshot import build_head

WHAT = "inserts its prompt tokens"


@dataclass(frozen=True)
class MaPLeHparams(BaseHparams):
    lr: Float = 3.5e-3  # SGD (momentum 0.9, weight decay 5e-4), warm-up, cosine
    weight_decay: Float = 5e-4
    warmup_steps: Int = 6
    momentum: Float = 0.9
    n_ctx: Int = 2  # prompt tokens per layer (M)
    depth: Int = 9  # layers with prompts, from the first (J), in both towers

    def __post_init__(self):
        super().__post_init__()
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx: {self.n_ctx} must be >= 1")
        if self.depth < 1:
            raise ValueError(f"depth: {self.depth} must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: {self.momentum} must lie in [0, 1)")


class MaPLePrompts(nn.Module):
    """Text prompts P_t^j [M, d_t] for layers j = 1..J (`ctx`: layer 1, `deep.<j−2>`: layers
    2..J) and the couplings `couple.<j−1>`: Linear(d_t → d_v), P_v^j = couple_j(P_t^j)."""

    def __init__(self, ctx: torch.Tensor, depth: int, vision_width: int):
        super().__init__()
        length, text_width = ctx.shape
        self.ctx = nn.Parameter(ctx.detach().clone().float())
        self.deep = nn.ParameterList([nn.Parameter(torch.empty(length, text_width)) for _ in range(depth - 1)])
        for p in self.deep:
            nn.init.normal_(p, std=0.02)
        # layer 1's coupling has its own default init; layers 2..J start as copies of one
        # default-initialised Linear (their `_get_clones` of a single layer)
        deeper = nn.Linear(text_width, vision_width)
        self.couple = nn.ModuleList([nn.Linear(text_width, vision_width)]
                                    + [copy.deepcopy(deeper) for _ in range(depth - 1)])

    @property
    def depth(self) -> int:
        return len(self.couple)

    def text(self, j: int) -> torch.Tensor:
        return self.ctx if j == 0 else self.deep[j - 1]

    def visual(self, j: int) -> torch.Tensor:
        return self.couple[j](self.text(j))


def first_template(class_tokens: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """[C, 1, L]: the first template of every class, checked to begin (after the start token)
    with `n_ctx` tokens that are the same for every class and come before the end token:
    the positions MaPLe's context takes."""
    tokens = class_tokens[:, :1]
    rows = tokens[:, 0]
    end = int(rows.argmax(dim=-1).min())  # the first end token of any class
    same = (rows == rows[:1]).all(dim=0)
    shared = 0  # tokens after the start token, before any end token, the same for every class
    while 1 + shared < end and bool(same[1 + shared]):
        shared += 1
    if shared < n_ctx:
        raise ValueError(
            f"maple: the first template of the dataset's prompt file must begin with at least n_ctx = {n_ctx} "
            f"tokens that are the same for every class, before the class name (MaPLe learns them in place, as "
            f"'a photo' of its 'a photo of a {{c}}.'); this one has {shared}. Put such a template first in the "
            f"prompt file, or lower maple's n_ctx")
    return tokens


@register
class MaPLe(Method):
    """MaPLe (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023; code
    muzairkhattak/multimodal-prompt-learning, `trainers/maple.py`, `clip/model.py`, config
    `MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`): M = 2 learnable text tokens at each of the first
    J = 9 layers of the text tower, and at the same layers M vision tokens coupled to them,
    P_v^j = Linear_j(P_t^j) (text width → image width); both towers frozen, gradients through
    them; cross-entropy on s·f(x)·g(p_c)ᵀ against every class prompt p_c, s the frozen logit
    scale. Trained: the text prompts and the J couplings.

    As their code (checked there):
    - text: the prompt of class c is "a photo of a {c}." with the token embeddings of its
      first M words ("a photo") replaced by the learnable layer-1 context, initialised to
      those embeddings; the positional embedding is added after. At layers 2..J the block's
      input at positions 1..M (after the start token) is replaced by that layer's prompts
      P_t^j, init N(0, 0.02²); later layers pass them through; pooled at the end token;
    - vision: P_v^1 appended after the patch tokens once the positional embedding is added,
      before `ln_pre`; at layers 2..J the block input's last M tokens replaced by P_v^j; the
      class token is pooled (here: the prompt tokens are dropped from the transformer's
      output, the same for class-token pooling);
    - couplings: layer 1's Linear default-initialised, layers 2..J copies of one
      default-initialised Linear (`_get_clones`); their widths hard-coded 512 → 768 (ViT-B):
      here from the model (`transformer.width` of each tower);
    - recipe (the `MaPLeHparams` defaults): M 2, J 9, SGD lr 3.5e-3, momentum 0.9, weight
      decay 5e-4 (Dassl's defaults); their batch 4 and 5 epochs are the project's
      `finetune.train` settings here.

    OPEN choices (ours):
    - the prompt is the dataset's own: the first template of its prompt file, whose first M
      tokens after the start token (which must be the same for every class: `first_template`
      refuses otherwise, before training) become the learnable layer-1 context, initialised
      to their embeddings. For a template "a photo of a {c}." this is MaPLe's prompt and init
      exactly; for FMoW's "satellite photo of a {c}." the context starts as "satellite photo".
      Training and evaluation use that one template (MaPLe has one prompt per class), not the
      prompt ensemble;
    - positions 1..M of every text the model encodes are the prompt positions (as MaPLe's
      text encoder treats any prompt at layers 2..J): zero-shot heads of other tasks
      (retention) use their first template the same way;
    - J = min(depth, layers of the shallower tower): their 9 of 12 on ViT-B, every layer of a
      shallower tower;
    - warm-up: the project's linear warm-up over `warmup_steps` (6, 10 % of a 60-step run),
      then cosine to 0 (their Dassl schedule: one epoch at a constant 1e-5, then cosine); no
      gradient clipping (their code has none);
    - not a weight-space method: no WiSE-FT α.

    Memory: every step encodes the C class prompts with gradient (through the frozen text
    tower, to the prompts): `class_head_with_grad`, chunked under activation checkpointing to
    `finetune.train.prompt_memory_mb` and trimmed after the longest prompt, as BitFit, A-CLIP
    and LoRA (the prompts sit at positions 1..M, before every end token, so the trim stays
    exact). Precision: their PREC is fp16 (the whole CLIP in half); here the trainer's (bf16
    autocast on CUDA): the prompts are fp32 parameters cast to the residual stream's dtype
    where they enter it, the couplings run under autocast; features and head normalised and
    the cross-entropy computed in fp32 with autocast off. No random draw in the loss (DDP:
    every rank encodes every class alike).
    """

    name = "maple"
    family = "prompt"
    trains_extra = r"^maple\.(ctx|deep\.\d+|couple\.\d+\.(weight|bias))$"
    Hparams = MaPLeHparams

    @classmethod
    def check_model(cls, model) -> None:
        require_vit_image_tower(cls.name, model, WHAT)
        require_text_tower(cls.name, model, WHAT)

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self._handles: list = []

    def setup(self) -> None:
        freeze(self.root)
        model = self.ctx.model
        self.tokens = first_template(self.ctx.class_tokens, self.hp.n_ctx)
        if "maple" not in self.extra:
            visual = require_vit_image_tower(self.name, model, WHAT)
            text = require_text_tower(self.name, model, WHAT)
            depth = min(self.hp.depth, len(visual.transformer.resblocks), len(text.blocks))
            lead = self.tokens[0, 0, 1:1 + self.hp.n_ctx].to(text.token_embedding.weight.device)
            with torch.no_grad():
                init = text.token_embedding(lead).float()
            self.extra["maple"] = MaPLePrompts(init, depth, visual.transformer.width).to(
                text.token_embedding.weight.device)
        if not self._handles:
            self._handles = self.install(model, self.extra["maple"])
        for p in self.extra["maple"].parameters():
            p.requires_grad_(True)

    @classmethod
    def install(cls, model: nn.Module, prompts: MaPLePrompts) -> list:
        visual = require_vit_image_tower(cls.name, model, WHAT)
        text = require_text_tower(cls.name, model, WHAT)
        length = prompts.ctx.shape[0]
        return (insert_text_prompts(text, prompts.text, prompts.depth)
                + insert_visual_prompts(visual, prompts.visual, prompts.depth, length))

    def remove_adapters(self) -> None:
        """Detach the hooks: `ctx.model` is the plain pre-trained model again."""
        remove(self._handles)

    def optimizer(self):
        return torch.optim.SGD([{"params": list(self.extra["maple"].parameters()), "lr_scale": 1.0}],
                               lr=self.hp.lr, momentum=self.hp.momentum, weight_decay=self.hp.weight_decay)

    def loss(self, batch, step):
        model = self.ctx.model
        feats = image_features(model, batch["image"])
        head = class_head_with_grad(model, self.tokens, 0, feats.device, self.ctx.prompt_memory_bytes)
        scale = model.logit_scale.exp().detach().float()
        return {"ce_loss": classification_loss(feats, scale * head, batch["y"])}

    def live_eval_model(self) -> EvalModel:
        return MaPLeEvalModel(self.ctx.model, self.extra["maple"])

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        if alpha != 1.0:
            raise ValueError(f"{cls.name} has no WiSE-FT α (not a weight-space method); got α = {alpha}")
        prefix = "extra.maple."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if len(own) != len(state) or "ctx" not in own:
            raise KeyError(f"{cls.name} state does not fit: keys {sorted(state)[:5]}")
        depth = 1 + sum(1 for k in own if k.startswith("deep."))
        visual = require_vit_image_tower(cls.name, model, WHAT)
        prompts = MaPLePrompts(own["ctx"], depth, visual.transformer.width)
        prompts.load_state_dict(own)  # strict: the keys and shapes must match
        prompts.to(zeroshot_head.device)
        cls.install(model, prompts)
        return MaPLeEvalModel(model, prompts)


class MaPLeEvalModel(EvalModel):
    """The model with MaPLe's prompt hooks active (both towers); class heads are built from
    the first template of each class (`first_template`), whose positions 1..M the learned
    context takes. Holds the prompts so that `.to(device)` moves them with the model."""

    def __init__(self, model: nn.Module, prompts: MaPLePrompts):
        super().__init__(model)
        self.prompts = prompts

    def task_head(self, class_tokens: torch.Tensor) -> torch.Tensor:
        tokens = first_template(class_tokens, self.prompts.ctx.shape[0])
        return self.scale * build_head(self.encode_text, tokens.to(self.scale.device))

    def zeroshot_head(self, class_tokens: torch.Tensor) -> torch.Tensor:
        return self.task_head(class_tokens)
