"""CLIPood (Shu et al., ICML 2023, arXiv 2302.00864; code thuml/CLIPood)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze, unfreeze
from pipeline.methods.common import image_features
from pipeline.models.losses import fp32_loss


@fp32_loss
def margin_metric_loss(f: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                       lam: float) -> torch.Tensor:
    """CLIPood's margin metric softmax: CE over logit_j = s·(f·t_j − λ·t_y·t_j), i.e. a margin
    s·λ·(1 − t_y·t_j) on every wrong class j (rows of `f` and `text` L2-normalised)."""
    logits = scale * (f - lam * text[labels]) @ text.t()
    return F.cross_entropy(logits, labels)


def beta_weight(i: int, total: int, beta: float) -> float:
    """The Beta moving average's weight of iterate i of 0…total (0 = the pre-trained start):
    Beta(β, β).pdf((i + 0.5)/(total + 1))."""
    return float(stats.beta(beta, beta).pdf((i + 0.5) / (total + 1)))


class BetaAverage(nn.Module):
    """The Beta moving average of a set of parameters, kept in fp32 buffers (saved in the
    trainer's checkpoints with the method's other buffers): starts at the parameters' current
    values (iterate 0, weight w(0), given here or at the first `add` when the run's length is
    known only then); `add(params, w)` folds in the next iterate with weight w:
    avg ← (avg + r·θ)/(1 + r), r = w / Σ_{j<i} w(j)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], weight0: float | None = None):
        super().__init__()
        self.names = [n for n, _ in named]
        for n, p in named:
            self.register_buffer(self._key(n), p.detach().float().clone())
        # 0: w(0) not known yet (a Beta density is positive, so 0 is never a real sum)
        self.register_buffer("weight_sum", torch.tensor(weight0 or 0.0, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _key(name: str) -> str:
        return "avg__" + name.replace(".", "__")

    def average(self, name: str) -> torch.Tensor:
        return getattr(self, self._key(name))

    @torch.no_grad()
    def add(self, params: list[torch.Tensor], weight: float, weight0: float | None = None) -> None:
        if float(self.weight_sum) == 0:
            if weight0 is None:
                raise ValueError("BetaAverage: the start's weight w(0) was never given")
            self.weight_sum.fill_(weight0)
        r = weight / float(self.weight_sum)
        for n, p in zip(self.names, params):
            avg = self.average(n)
            avg.add_(p.detach().float(), alpha=r).div_(1 + r)
        self.weight_sum += weight
        self.count += 1


@dataclass(frozen=True)
class CLIPoodHparams(BaseHparams):
    lr: Float = 5e-6
    weight_decay: Float = 0.1
    warmup_steps: Int = 0
    lam: Float = 0.3  # λ, the margin's scale
    beta: Float = 0.5  # β of the Beta(β, β) moving average (0.5: domain shift; 0.1 their few-shot)

    def __post_init__(self):
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lam: {self.lam} must be >= 0")
        if self.beta <= 0:
            raise ValueError(f"beta: {self.beta} must be positive")


@register
class CLIPood(Method):
    """CLIPood (Shu et al., ICML 2023): margin metric softmax, Beta moving average evaluated.

    "CLIPood: Generalizing CLIP to Out-of-Distributions", code thuml/CLIPood (`main.py`,
    `engine.py`): the image encoder fine-tuned with the margin
    metric softmax against fixed class text features, logit_j = s·(f·t_j − λ·t_y·t_j), CE;
    and a Beta moving average (BMA) of the image encoder's weights over the run, the
    pre-trained start included: iterate i of 0…T weighs Beta(β, β).pdf((i + 0.5)/(T + 1)),
    folded in online (avg ← (avg + r·θ_i)/(1 + r), r = w(i)/Σ_{j<i} w(j)). The BMA is what
    is saved and evaluated (`trained_state`), and what WiSE-FT interpolates with θ_0.

    Defaults (the paper's domain-shift values, `CLIPoodHparams`): λ 0.3, β 0.5, AdamW lr 5e-6,
    wd 0.1, cosine without warm-up.

    Read in the official code (`engine.py::train`, `GeneralMovingAverage`; `main.py`): the
    loss is `f -= alpha·text_features[labels]; y = temperature·f @ text_featuresᵀ`, CE, with
    f normalised and the temperature CLIP's exp(logit_scale) unless given; the average starts
    at the pre-trained weights with weight w(0) and takes every optimiser step's weights; the
    image tower stays in eval mode while training (its norm layers frozen); the weights,
    and the average, are kept in fp16 between steps. Their run also reports a best-on-val
    checkpoint (not here: the protocol selects trials; the BMA of the whole run is saved).

    OPEN choices (baselines.md; ours):
    - class text features: our frozen prompt-ensemble zero-shot head (theirs: one template);
      s: the frozen pre-trained logit scale;
    - fp32 master weights and an fp32 average (their fp16 weights never move a weight of
      magnitude ≥ 2⁻⁶ at lr 5e-6: the method as written, not the rounding);
    - the image tower is put in eval mode at every loss call (BatchNorm of ResNet towers uses
      and keeps the pre-trained statistics; the ViTs' LayerNorm has none; no dropout in
      CLIP towers);
    - T is the run's number of optimiser steps (`Method.total_steps`, set by the trainer);
      with grad_accum the average takes one iterate per optimiser step;
    - SWA is refused for it (the trainer's rule: it saves its own average).

    DDP: no random draw in the loss; every rank holds the same weights after each step and
    keeps its own identical average. Resume: the average, its weight sum and count are
    buffers, in the trainer's checkpoint.

    Precision: the image tower in the trainer's precision (bf16 autocast on CUDA); features
    normalised, logits and CE in fp32 with autocast off; the average in fp32 (float64 weight
    sum).
    """

    name = "clipood"
    family = "robust"
    soups = True
    trains_clip = r"^visual\."
    Hparams = CLIPoodHparams
    weight_space = True

    def _visual(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.ctx.model.named_parameters() if n.startswith("visual.")]

    def setup(self) -> None:
        freeze(self.root)
        unfreeze(self.ctx.model, lambda n, p: n.startswith("visual."))
        if "bma" not in self.extra:  # θ_0; its weight w(0) needs the run's length, given at the first step
            self.extra["bma"] = BetaAverage(self._visual())

    def loss(self, batch, step):
        model = self.ctx.model
        model.visual.eval()  # norm layers frozen, as in their training loop
        f = image_features(model, batch["image"])
        text = self.ctx.zeroshot_head.to(f.device, f.dtype)
        scale = model.logit_scale.exp().detach()
        return {"ce_loss": margin_metric_loss(f, text, batch["y"], scale, self.hp.lam)}

    def after_step(self, step: int) -> None:
        if not self.total_steps:
            raise ValueError("clipood: the run's number of steps (Method.total_steps) is not set; "
                             "train it through pipeline.training.train.fit")
        bma, total, beta = self.extra["bma"], self.total_steps, self.hp.beta
        bma.add([p for _, p in self._visual()], beta_weight(int(bma.count) + 1, total, beta),
                weight0=beta_weight(0, total, beta))

    def trained_state(self) -> dict[str, torch.Tensor]:
        bma = self.extra["bma"]
        return {f"clip.{n}": bma.average(n).detach().clone() for n in bma.names}

    def live_eval_model(self) -> EvalModel:
        model = copy.deepcopy(self.ctx.model)
        bma = self.extra["bma"]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in bma.names:
                    p.copy_(bma.average(n).to(p.dtype))
        return EvalModel(model)
