"""CLIP-Adapter: a bottleneck MLP on the image feature, mixed with the original feature."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.models.losses import classification_loss, upcast
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze


@dataclass(frozen=True)
class CLIPAdapterHparams(BaseHparams):
    lr: Float = 1e-3
    weight_decay: Float = 0.0
    warmup_steps: Int = 6
    reduction: Int = 4
    ratio: Float = 0.2  # residual ratio: f' = ratio·A(f) + (1 − ratio)·f

    def __post_init__(self):
        super().__post_init__()
        if self.reduction < 1:
            raise ValueError(f"reduction: {self.reduction} must be >= 1")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio: {self.ratio} must lie in [0, 1]")


class Bottleneck(nn.Module):
    """A(f) = ReLU(W₂ ReLU(W₁ f)), W₁: d → d/reduction, W₂: d/reduction → d, no biases
    (Gao et al.'s released adapter)."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(f))))


class ResidualMix(nn.Module):
    """f' = ratio·A(f) + (1 − ratio)·f on the raw (un-normalised) image feature; the
    `image_transform` of `EvalModel`, which normalises afterwards."""

    def __init__(self, adapter: Bottleneck, ratio: float):
        super().__init__()
        self.adapter = adapter
        self.ratio = ratio

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.ratio == 0.0:
            return f
        return self.ratio * self.adapter(f) + (1 - self.ratio) * f


@register
class CLIPAdapter(Method):
    """CLIP-Adapter (Gao et al., IJCV 2024, arXiv 2110.04544), visual adapter only: a
    bottleneck MLP (reduction 4) on the image feature, mixed with the original feature by
    the residual ratio 0.2, cross-entropy on s·f'(x)·Hᵀ against every class with H the
    zero-shot prompt-ensemble head (both towers and the logit scale frozen). Only the MLP
    trains.

    WiSE-style α (`eval_model(alpha)`): the adapter is scaled, i.e. the mix ratio becomes
    α·ratio; α = 0 is the pre-trained model exactly. `weight_space = True` so that the
    evaluate stage sweeps α.

    OPEN choices (ours):
    - no biases, ReLU after both layers, PyTorch's default Linear initialisation (as in the
      released adapter); the MLP acts on the raw projected image feature and the mix is
      normalised afterwards;
    - hidden width d // reduction;
    - AdamW instead of the paper's SGD, for a shared trainer; few-shot defaults lr 1e-3 (a
      freshly initialised MLP), no weight decay, 6 warm-up steps.

    Precision: the image tower and the bottleneck MLP in the trainer's precision (bf16
    autocast on CUDA); the mixed feature is normalised in fp32 and the loss computed in
    fp32 against the fp32 zero-shot head, autocast off. No random draw in the loss.
    """

    name = "clip_adapter"
    family = "probe"
    trains_extra = r"^adapter\.fc[12]\.weight$"
    Hparams = CLIPAdapterHparams
    weight_space = True

    def setup(self) -> None:
        freeze(self.root)
        if "adapter" not in self.extra:
            dim = self.ctx.zeroshot_head.shape[1]
            self.extra["adapter"] = Bottleneck(dim, self.hp.reduction).to(self.ctx.zeroshot_head.device)
        for p in self.extra["adapter"].parameters():
            p.requires_grad_(True)

    def _mix(self, ratio: float) -> ResidualMix:
        return ResidualMix(self.extra["adapter"], ratio)

    def loss(self, batch, step):
        model = self.ctx.model
        feats = F.normalize(upcast(self._mix(self.hp.ratio)(model.encode_image(batch["image"]))), dim=-1)
        head = model.logit_scale.exp().detach().float() * self.ctx.zeroshot_head.float().to(feats.device)
        return {"ce_loss": classification_loss(feats, head, batch["y"])}

    def live_eval_model(self) -> EvalModel:
        return self.build_eval(self.ctx.model, self.extra["adapter"], self.hp.ratio, self.ctx.zeroshot_head)

    @staticmethod
    def build_eval(model, adapter, ratio, zeroshot_head) -> EvalModel:
        head = model.logit_scale.exp().detach().float() * zeroshot_head.float()
        return EvalModel(model, head=head, image_transform=ResidualMix(adapter, ratio))

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        prefix = "extra.adapter."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        adapter = Bottleneck(zeroshot_head.shape[1], hp.reduction)
        adapter.load_state_dict(own)  # strict: the keys must match exactly
        adapter.to(zeroshot_head.device)
        return cls.build_eval(model, adapter, alpha * hp.ratio, zeroshot_head)
