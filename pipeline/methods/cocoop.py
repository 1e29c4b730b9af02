"""CoCoOp: CoOp's context shifted per image by a small meta-network of the image feature."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.validation import Float, Int, Str
from pipeline.methods import register
from pipeline.methods.base import EvalModel, Method, freeze
from pipeline.methods.common import image_features
from pipeline.methods.coop import (EVAL_CHUNK, LearnedContext, PromptHparams, PromptSGD, build_context, chunk_for,
                                   encode_prompts)
from pipeline.models.losses import fp32_loss, upcast


@dataclass(frozen=True)
class CoCoOpHparams(PromptHparams):
    lr: Float = 2e-3
    weight_decay: Float = 5e-4
    warmup_steps: Int = 1
    n_ctx: Int = 4
    ctx_init: Str = "a photo of a"
    reduction: Int = 16  # the meta-net's hidden width is D // reduction

    def __post_init__(self):
        super().__post_init__()
        if self.reduction < 1:
            raise ValueError(f"reduction: {self.reduction} must be >= 1")


def meta_net(dim: int, width: int, reduction: int = 16) -> nn.Sequential:
    """π: Linear(D, D/16) → ReLU → Linear(D/16, width), with biases (the code's `meta_net`)."""
    hidden = max(1, dim // reduction)
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(dim, hidden)), ("relu", nn.ReLU()),
                                      ("linear2", nn.Linear(hidden, width))]))


def conditioned_features(model: nn.Module, prompt: LearnedContext, net: nn.Module, feats: torch.Tensor,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Normalised text features [B, C, D]: for image b and class c, the prompt of c with the
    context v_m + π(f_b) (every context vector shifted by the same π(f_b)); f_b the
    normalised image features [B, D]. B·C prompts, encoded in chunks of `chunk_size`."""
    b, c = feats.shape[0], prompt.tokens.shape[0]
    shift = net(feats.to(prompt.ctx.dtype))  # [B, width]

    def context(rows: torch.Tensor) -> torch.Tensor:  # row r = image r // C, class r % C
        return prompt.ctx[None] + shift[rows // c][:, None]

    tokens = prompt.tokens.repeat(b, 1)
    emb = encode_prompts(model, tokens, context, int(prompt.start), chunk_size)
    return F.normalize(upcast(emb), dim=-1).view(b, c, -1)


@fp32_loss
def conditioned_logits(feats: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s · f_b · g_{b,c} [B, C]: each image against its own class prompts."""
    return scale * torch.einsum("bd,bcd->bc", feats, text)


@fp32_loss
def conditioned_loss(feats, text, scale, y) -> torch.Tensor:
    return F.cross_entropy(conditioned_logits(feats, text, scale), y)


class ConditionedHead:
    """The task head of an image-conditioned prompt method: a function of the image features
    (`split_metrics` calls it) instead of a [C, D] matrix. It computes on the model's device,
    `batch` images at a time (each B·C text forwards), and returns the logits on the CPU."""

    def __init__(self, model: nn.Module, prompt: LearnedContext, net: nn.Module, batch: int = 8):
        self.model, self.prompt, self.net, self.batch = model, prompt, net, batch

    @property
    def n_classes(self) -> int:
        return self.prompt.tokens.shape[0]

    def cpu(self) -> "ConditionedHead":
        return self  # stays with the model; its logits come back on the CPU

    @torch.no_grad()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        device = self.prompt.ctx.device
        scale = self.model.logit_scale.exp().float()
        was = self.model.training
        self.model.eval()
        out = []
        for i in range(0, features.shape[0], self.batch):
            f = F.normalize(features[i:i + self.batch].to(device).float(), dim=-1)
            text = conditioned_features(self.model, self.prompt, self.net, f, EVAL_CHUNK)
            out.append(conditioned_logits(f, text, scale).cpu())
        self.model.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.n_classes)


class ConditionedEvalModel(EvalModel):
    """`EvalModel` whose task head is a `ConditionedHead`; embeddings and zero-shot heads are
    the (frozen) model's."""

    def __init__(self, model: nn.Module, prompt: LearnedContext, net: nn.Module):
        super().__init__(model)
        self.prompt, self.net = prompt, net

    def task_head(self, class_tokens: torch.Tensor | None = None) -> ConditionedHead:
        return ConditionedHead(self.model, self.prompt, self.net)


@register
class CoCoOp(PromptSGD, Method):
    """CoCoOp (Zhou, Yang, Loy & Liu, "Conditional Prompt Learning for Vision-Language
    Models", CVPR 2022, arXiv 2203.05557; code KaiyangZhou/CoOp, `trainers/cocoop.py`):
    CoOp's prompt with every context vector shifted by a meta-network of the image,

        v_m(x) = v_m + π(f(x)),  L = CE over c of s · f(x) · g(p_c(x))ᵀ,

    f(x) the NORMALISED image feature (the code normalises before the meta-net), π =
    Linear(D, D/16) → ReLU → Linear(D/16, width) with biases (D the embedding width, width
    the token-embedding width; both read from the model). Both towers and s frozen; the
    context and π train. The text tower runs once per image × class: B·C prompts per step.

    Cost bound: the B·C prompts go through the chunked, checkpointed class-prompt path
    (`coop.encode_prompts`) under the same `finetune.train.prompt_memory_mb` budget, each
    chunk computing its own rows' contexts inside the checkpoint, so the peak holds one
    chunk's activations whatever B and C; the time grows as B·C (README, few-shot baselines:
    where it stops being practical). Evaluation is as costly: each evaluated image is
    classified against its own C prompts (`ConditionedHead`, C text forwards per image).

    Choices, checked against the official code:
    - M = 4 initialised from "a photo of a" (`vit_b16_c4_ep10_batch1_ctxv1.yaml`, the
      paper's setting; the code's own default `N_CTX` 16 random is not what the paper runs);
      class token at the end (the only position the code has for CoCoOp);
    - π's hidden width D // 16; PyTorch's default Linear init (drawn under a generator
      seeded by the run's seed: the same on every DDP rank);
    - SGD lr 2e-3, momentum 0.9, weight decay 5e-4 on the context and π, cosine;
    - the same shift for every context vector and every class (the code broadcasts one
      [width] bias over the M vectors).

    OPEN (ours):
    - batch size and steps are the project's (`finetune.train`); the paper's batch 1 and
      10 epochs are settings of `finetune.train` (batch_size: 1), not defaults here; the
      warm-up is the trainer's linear one over 1 step (the code: one epoch at 1e-5);
    - selection: the protocol's (the paper evaluates the last epoch);
    - precision: the code's `PREC: fp16` casts everything to fp16; here the towers and π run
      in the trainer's precision (bf16 autocast on CUDA), the context in the model's dtype,
      features normalised and logits and loss in fp32 with autocast off;
    - retention (zero-shot on other tasks) and the measures read the unchanged towers: the
      paper's transfer of the learned prompts to new classes is not what they measure.

    DDP: nothing random in the loss; each rank encodes its own images' B/world · C prompts,
    and the trainer averages the gradients. Not a weight-space method (no WiSE-FT α).
    """

    name = "cocoop"
    family = "prompt"
    trains_extra = r"^(prompt\.ctx|meta_net\.linear[12]\.(weight|bias))$"
    Hparams = CoCoOpHparams

    def setup(self) -> None:
        freeze(self.root)
        if "prompt" not in self.extra:
            prompt = build_context(self.name, self.ctx, self.hp)
            dim = self.ctx.zeroshot_head.shape[1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.ctx.seed) * 7919 + 0xC0C0)
                net = meta_net(dim, prompt.ctx.shape[-1], self.hp.reduction)
            self.extra["prompt"] = prompt
            self.extra["meta_net"] = net.to(device=prompt.ctx.device, dtype=prompt.ctx.dtype)
        for p in self.extra.parameters():
            p.requires_grad_(True)

    def loss(self, batch, step):
        model = self.ctx.model
        with torch.no_grad():  # the image tower is frozen and nothing before it trains
            feats = image_features(model, batch["image"])
        prompt = self.extra["prompt"]
        rows = prompt.tokens.repeat(feats.shape[0], 1)
        text = conditioned_features(model, prompt, self.extra["meta_net"], feats,
                                    chunk_for(model, rows, self.ctx.prompt_memory_bytes))
        scale = model.logit_scale.exp().detach().float()
        return {"ce_loss": conditioned_loss(feats, text, scale, batch["y"])}

    def live_eval_model(self) -> EvalModel:
        return ConditionedEvalModel(self.ctx.model, self.extra["prompt"], self.extra["meta_net"])

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        if alpha != 1.0:
            raise ValueError(f"{cls.name} has no WiSE-FT α (not a weight-space method); got α = {alpha}")
        device = zeroshot_head.device
        prompt = LearnedContext.from_state(state, "extra.prompt.").to(device)
        prefix = "extra.meta_net."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        net = meta_net(zeroshot_head.shape[1], prompt.ctx.shape[-1], hp.reduction)
        net.load_state_dict(own)  # strict: the keys must match exactly
        return ConditionedEvalModel(model.to(device), prompt, net.to(device=device, dtype=prompt.ctx.dtype))
