"""SnD: Select and Distill (Yu et al., ECCV 2024, arXiv 2407.10247; code chu0802/SnD)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.core import dist
from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, Method, freeze, unfreeze
from pipeline.methods.common import image_features
from pipeline.methods.dive import DiVE
from pipeline.models.losses import autocast_off, classification_loss, fp32_loss


@fp32_loss
def snd_weights(f0: torch.Tensor, f_prev: torch.Tensor, kappa: float, tau: float) -> torch.Tensor:
    """SnD's per-sample selection weights w_i = σ(κ(‖f_0(x_i) − f_prev(x_i)‖ − τ))."""
    return torch.sigmoid(kappa * ((f0 - f_prev).norm(dim=1) - tau))


@fp32_loss
def snd_distill_loss(f: torch.Tensor, f0: torch.Tensor, f_prev: torch.Tensor, r_prev: float, r_pre: float,
                     kappa: float, tau: float) -> torch.Tensor:
    """SnD's distillation terms on a reference batch of images (all rows L2-normalised):
    r_prev · mean_i(w_i ‖f_i − f_prev,i‖²) + r_pre · mean_i((1 − w_i) ‖f_i − f_0,i‖²), the
    weights per sample (not the batch mean the official code's broadcasting gives)."""
    w = snd_weights(f0, f_prev, kappa, tau)
    d_prev = (f - f_prev).pow(2).sum(1)
    d_0 = (f - f0).pow(2).sum(1)
    return r_prev * (w * d_prev).mean() + r_pre * ((1 - w) * d_0).mean()


@dataclass(frozen=True)
class SnDHparams(BaseHparams):
    lr: Float = 1e-5
    weight_decay: Float = 5e-4
    warmup_steps: Int = 0
    r_prev: Float = 9.0  # weight of the distillation to the previous-task model
    r_pre: Float = 0.5  # weight of the distillation to the pre-trained model
    tau: Float = 0.2  # τ, the selection threshold on ‖f_0 − f_prev‖
    kappa: Float = 6.0  # κ, the selection sharpness
    ref_batch_size: Int = 64  # B' (global): 2 × the default target batch (32), the paper's ratio

    def __post_init__(self):
        super().__post_init__()
        for key in ("r_prev", "r_pre", "tau", "kappa"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: {getattr(self, key)} must be >= 0")
        if self.ref_batch_size < 1:
            raise ValueError(f"ref_batch_size: {self.ref_batch_size} must be positive")


def single_task_coefficient(hp: SnDHparams) -> float:
    """The weight of mean_i ‖f_θ − f_0‖² when the previous-task model is the pre-trained one
    (single-task fine-tuning): every w_i = σ(−κτ), so r_prev·w + r_pre·(1 − w) (2.468 with the
    defaults)."""
    w = 1 / (1 + math.exp(hp.kappa * hp.tau))
    return hp.r_prev * w + hp.r_pre * (1 - w)


@register
class SnD(Method):
    """SnD (Yu et al., ECCV 2024): CE + selective dual-teacher feature distillation on references.

    "Select and Distill: Selective Dual-Teacher Knowledge Transfer for Continual Learning on
    Vision-Language Models", code chu0802/SnD, `snd_trainer.py`:
      L = CE(s·f_θ(x)·Hᵀ, y) + r_prev · mean_i(w_i d_prev,i) + r_pre · mean_i((1 − w_i) d_0,i)
    on a reference batch of images x_i, d_·,i = ‖f_θ(x_i) − f_·(x_i)‖² (normalised features),
    w_i = σ(κ(‖f_0(x_i) − f_prev(x_i)‖ − τ)). Only the image tower trains.

    Single-task fine-tuning (DiVE's setting and ours): the previous-task teacher is the
    pre-trained model, f_prev = f_0, both read from the embed stage's reference cache
    (`ReferenceData.image_pre`, never recomputed). The general form is computed
    (`snd_distill_loss`), so every w_i = σ(−κτ) = 0.2315 and the regulariser is
    2.468 · mean_i ‖f_θ(x_i) − f_0(x_i)‖² (`single_task_coefficient`, tested).

    Defaults (the paper's, `SnDHparams`): r_prev 9, r_pre 0.5, τ 0.2, κ 6; AdamW lr 1e-5,
    wd 5e-4, cosine, no warm-up; reference batch 2 × target batch (64 against the default 32);
    the last iterate is saved.

    OPEN choices (baselines.md):
    - the classifier is our frozen prompt-ensemble zero-shot head H scaled by the frozen
      pre-trained logit scale s (theirs: one template); text tower and s frozen;
    - the reference images and the sampler are DiVE's (`DiVE.reference_rows`: B' rows drawn
      uniformly without replacement once per optimiser step, seeded by (seed, step), the
      same on every DDP rank, each rank embedding its slice `[rank::world]`; evaluation
      transform, so the cached f_0 is the embedding of exactly those pixels), so DiVE,
      FLYP+replay and SnD differ only in the loss. The reference set holds image-caption
      pairs; SnD uses only the images;
    - per-sample weights w_i (their code broadcasts a (B,1) weight against a (B,) distance,
      which averages the weights over the batch; harmless here, all w equal; not reproduced);
    - grad_accum: the whole reference term in the step's first micro-batch, weighted by the
      micro-batch count (DiVE's rule), so it equals grad_accum 1's; the CE is per micro-batch;
    - DDP: each rank's mean over its reference slice is weighted by its share of B', so the
      averaged gradient is that of the one-process mean.

    Read in the official code (chu0802/SnD `snd_trainer.py::snd_loss`, `src/trainer/utils.py`):
    the per-sample distance is their `L2Loss(square=False)`, i.e. ‖x − y‖² (not squared
    again); w = σ(scale·(‖f_pre − f_prev‖ − threshold)) with scale 6, threshold 0.2;
    ratio_prev 9 multiplies the previous teacher's w-weighted term and ratio_pretrained 0.5 the
    (1 − w)-weighted pre-trained term; `scores.reshape(-1, 1) * loss` broadcasts to B×B (the
    batch-mean weight noted above). Not checked: whether their `encode` normalises the
    features (ours are L2-normalised, the scale τ = 0.2 is meant for).

    Precision: the target batch in the trainer's precision (bf16 autocast on CUDA), its logits
    and CE in fp32; the reference rows through the image tower in fp32 with autocast off (f_0
    is the fp32 cache: a bf16 f_θ would make d_0 rounding noise, DiVE's rule), the
    distillation terms fp32.
    """

    name = "snd"
    family = "robust"
    soups = True
    trains_clip = r"^visual\."
    Hparams = SnDHparams
    weight_space = True
    needs_reference = True
    reference_rows = DiVE.reference_rows

    def setup(self) -> None:
        freeze(self.root)
        unfreeze(self.ctx.model, lambda n, p: n.startswith("visual."))
        ref = self.ctx.reference
        if ref is None or len(ref) == 0:
            raise ValueError("snd needs reference data (the embed stage's reference cache)")

    def head(self, device: torch.device) -> torch.Tensor:
        scale = self.ctx.model.logit_scale.exp().detach().float()
        return (scale * self.ctx.zeroshot_head.float()).to(device)

    def loss(self, batch, step):
        model = self.ctx.model
        device = batch["y"].device
        f = image_features(model, batch["image"])
        terms = {"ce_loss": classification_loss(f, self.head(device).to(f.dtype), batch["y"])}
        if self.micro.index > 0:
            terms["distill_loss"] = torch.zeros((), device=device)
            return terms
        ref = self.ctx.reference
        local, size = self.reference_rows(step)
        x_ref = torch.stack([torch.as_tensor(ref.images[int(j)]) for j in local]).to(device)
        with autocast_off(device.type):
            f_ref = image_features(model, x_ref.to(batch["image"].dtype))
        f0 = ref.image_pre[local].to(device)
        share = len(local) * dist.world_size() / size
        hp = self.hp
        distill = snd_distill_loss(f_ref, f0, f0, hp.r_prev, hp.r_pre, hp.kappa, hp.tau)
        terms["distill_loss"] = distill * share * self.micro.count
        return terms
