"""CaRot (Oh et al., NeurIPS 2024, arXiv 2311.01723; code MLAI-Yonsei/CaRot)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core import dist
from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.common import image_features, sample_class_prompts, text_features
from pipeline.methods.flyp import FLYP, FLYPHparams
from pipeline.models.losses import fp32_loss, upcast


@fp32_loss
def orthogonality_loss(w_v: torch.Tensor) -> torch.Tensor:
    """‖W_vᵀW_v − I‖_F (Frobenius norm, not squared) of the visual projection W_v, stored as
    open_clip stores `visual.proj`: [width, embed_dim], so W_vᵀW_v is embed_dim × embed_dim."""
    gram = w_v.t() @ w_v
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


@fp32_loss
def cross_projection_loss(w_v: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """‖W_v W_tᵀ‖_F (not squared), both projections [tower width, embed_dim] (open_clip's
    `visual.proj`, `text_projection`)."""
    return torch.linalg.matrix_norm(w_v @ w_t.t())


@fp32_loss
def self_distillation_loss(student_image: torch.Tensor, student_text: torch.Tensor, student_scale: torch.Tensor,
                           teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                           teacher_scale: torch.Tensor) -> torch.Tensor:
    """D = −mean_i Σ_j [softmax(T_img)_ij log softmax(S_img)_ij + softmax(T_txt)_ij log softmax(S_txt)_ij]:
    S_img = s·F Gᵀ the student's B×B logits (S_txt = its transpose), T the teacher's on the
    same batch with the teacher's own scale, no gradient through T (rows L2-normalised)."""
    s_img = student_scale * student_image @ student_text.t()
    with torch.no_grad():
        t_img = teacher_scale * teacher_image @ teacher_text.t()
    per_row = (F.softmax(t_img, 1) * F.log_softmax(s_img, 1)).sum(1) \
        + (F.softmax(t_img.t(), 1) * F.log_softmax(s_img.t(), 1)).sum(1)
    return -per_row.mean()


def teacher_momentum(step: int, total: int, start: float, end: float, warmup: float) -> float:
    """The EMA momentum m after optimiser step `step` (0-based) of `total`: linear from `start`
    at step 0 to `end` at ⌈warmup·total⌉, then `end` (their `m_sche_src`, `m_sche_tar`, `m_warm_up`)."""
    ramp = warmup * total
    if step < ramp:
        return start + (end - start) * step / ramp
    return end


def teacher_updates_at(step: int, every: int) -> bool:
    """Whether the teacher takes an EMA step after optimiser step `step` (0-based): every
    `every`-th step from step 0 on (their `step % ema_up_freq == 0`)."""
    return step % every == 0


def projections(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W_v, W_t) as [tower width, embed_dim] matrices, or None when the image tower has no such
    projection (a timm tower: SigLIP, EVA-02). W_v: open_clip's `visual.proj` (ViT), or a
    ResNet tower's attention-pool output layer `visual.attnpool.c_proj` (its weight is
    [embed, width]: transposed, as their code does for RN models). W_t: `text_projection` (on
    the model, or on `model.text` for CoCa / custom text towers; a Linear's weight transposed)."""
    visual = model.visual
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        w_v = visual.proj
    elif isinstance(getattr(getattr(visual, "attnpool", None), "c_proj", None), nn.Linear):
        w_v = visual.attnpool.c_proj.weight.t()
    else:
        return None
    text = getattr(model, "text", None)
    proj = getattr(text, "text_projection", None) if text is not None else getattr(model, "text_projection", None)
    if isinstance(proj, nn.Linear):
        proj = proj.weight.t()
    if not isinstance(proj, torch.Tensor):
        return None
    return w_v, proj


class FrozenCopy(nn.Module):
    """A copy of a model whose parameters are buffers: it runs forward like the model, takes no
    gradient and no optimiser step, and its weights are saved with the method's other buffers
    in the trainer's checkpoints (`Method.extra`), not as method-owned parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model)
        for module in self.model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                del module._parameters[name]
                module.register_buffer(name, p.detach().clone())

    def tensors(self, names: list[str]) -> list[torch.Tensor]:
        found = dict(self.model.named_buffers())
        return [found[n] for n in names]


@dataclass(frozen=True)
class CaRotHparams(FLYPHparams):
    lr: Float = 1e-5  # the paper's (ImageNet, 10 epochs, batch 512)
    weight_decay: Float = 0.1
    beta_orth: Float = 0.2  # β_o, the orthogonality constraint on W_v
    beta_cross: Float = 0.05  # β_x, ‖W_v W_tᵀ‖_F (their run script's --cross_fnorm)
    beta_distill: Float = 1.5  # β_d, the self-distillation
    momentum_start: Float = 0.05  # the teacher's EMA momentum at step 0 ...
    momentum_end: Float = 0.9  # ... ramped linearly to this
    momentum_warmup: Float = 0.2  # over this share of the run's steps
    teacher_updates: Int = 50  # EMA steps per run: every max(1, ⌊steps / this⌋) optimiser steps

    def __post_init__(self):
        super().__post_init__()
        for key in ("beta_orth", "beta_cross", "beta_distill"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: {getattr(self, key)} must be >= 0")
        for key in ("momentum_start", "momentum_end"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key}: {getattr(self, key)} must lie in [0, 1]")
        if not 0 <= self.momentum_warmup <= 1:
            raise ValueError(f"momentum_warmup: {self.momentum_warmup} must lie in [0, 1]")
        if self.teacher_updates < 1:
            raise ValueError(f"teacher_updates: {self.teacher_updates} must be positive")


@register
class CaRot(FLYP):
    """CaRot (Oh et al., NeurIPS 2024, arXiv 2311.01723; code MLAI-Yonsei/CaRot): FLYP + orthogonal visual projection + EMA self-distillation.

    "Towards Calibrated Robust Fine-Tuning of Vision-Language Models", code MLAI-Yonsei/CaRot
    (`src/models/carot_loss.py`, `src/args.py`, `example_scripts/carot.sh`). Both towers and
    the logit scale train, as FLYP, with
      L = L_FLYP + β_o ‖W_vᵀW_v − I‖_F + β_x ‖W_v W_tᵀ‖_F + β_d D,
    W_v = `visual.proj`, W_t = `text_projection` ([width, embed] as open_clip stores them;
    Frobenius norms, not squared), D the cross-entropy of the student's image→text and
    text→image softmax (B×B logits of the batch) against an EMA teacher's on the same batch
    (its own logit scale, no gradient; `self_distillation_loss`).

    Teacher: a copy of the pre-trained model; after optimiser step t (0-based) with
    t mod e = 0, θ_T ← m·θ_T + (1 − m)·θ_S over every parameter (logit scale included), m
    ramped linearly from 0.05 at step 0 to 0.9 at 20 % of the run, then 0.9
    (`teacher_momentum`). The **student** is saved, evaluated and WiSE-FT-interpolated
    (`weight_space`: the student's weights live in the pre-trained space; WiSE-FT applies as
    for FLYP). The teacher is never saved in the weights; it is in the trainer's checkpoints
    (buffers), so a resumed run continues the same teacher.

    Defaults (`CaRotHparams`, their `carot.sh` and `args.py`): β_o 0.2, β_x 0.05, β_d 1.5, AdamW
    lr 1e-5, wd 0.1; m 0.05 → 0.9 over 20 % of the steps. The warm-up steps are FLYP's few-shot
    default (6; theirs 500 of ~25k).

    Read in the official code (`carot_loss.py`): the orthogonality term is
    `((proj.T @ proj − I)**2).sum()**0.5` and the cross term `‖proj @ text_projection.T‖_F`, both
    added to the CLIP loss; a ResNet tower uses `attnpool.c_proj.weight.T` instead of `proj`;
    the distillation is skipped at step 0 (`if step > 0`: the teacher equals the student, so
    its gradient is zero anyway); the teacher is updated after the optimiser step when
    `step % ema_up_freq == 0` (step 0 included; their `step == total` branch is never reached),
    with m = src + (tar − src)·step/(warm·total) below warm·total steps, over
    `model.parameters()`; `ema_up_freq` 500 of ~25k steps (10 ImageNet epochs at batch 512),
    i.e. ~50 teacher updates per run. Their code evaluates and saves the student (the teacher
    is saved beside it); it evaluates after the last epoch (no selection on a test split in
    this loop).

    OPEN choices (baselines.md; ours):
    - e = max(1, ⌊T / teacher_updates⌋) with teacher_updates 50: their count of teacher updates
      per run, not their 500 steps (a few-shot run has tens of steps);
    - no distillation term at step 0, as theirs (logged as 0);
    - the teacher runs in eval mode (a ResNet tower's BatchNorm statistics stay the EMA'd ones;
      the ViT towers have no BatchNorm or dropout, so this changes nothing for them) and in the
      trainer's precision; its logits are computed in fp32;
    - the L_FLYP term is FLYP's (the family's contrastive loss: SigLIP's sigmoid loss for a
      model with a logit bias; but such towers are refused, below), with one template drawn
      per image as FLYP; the distillation uses softmax logits as theirs;
    - DDP: the teacher's features are gathered like the student's, so both logit matrices are
      over the global batch (the single-process loss); every rank holds the same student after
      a step, so the teachers stay equal without communication;
    - grad_accum: the distillation and the contrastive term are per micro-batch (their
      negatives are the micro-batch, as FLYP's); the projection terms, which do not depend on
      the batch, are added once per step (micro-batch 0, times the count the trainer divides
      by); the teacher takes one EMA step per optimiser step;
    - SWA is refused (the trainer's rule for a method with its own `trained_state`: the saved
      state leaves the teacher out).

    Model families: needs an image tower with a linear output projection (`projections`):
    open_clip's ViT (`visual.proj`; CLIP, CoCa) or ModifiedResNet (`attnpool.c_proj`); timm
    image towers (SigLIP, EVA-02) have none and are refused in `check`.

    Precision: both towers (student and teacher) in the trainer's precision (bf16 autocast on
    CUDA); features normalised, logits, the three regularisers and their sum in fp32 with
    autocast off (`fp32_loss`).
    """

    name = "carot"
    family = "robust"
    soups = True
    Hparams = CaRotHparams

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        if projections(model) is None:
            tower = type(model.visual).__name__
            trunk = getattr(model.visual, "trunk", None)
            what = f"{tower} (timm {type(trunk).__name__})" if trunk is not None else tower
            raise ValueError(
                f"carot constrains the image tower's linear output projection (open_clip's visual.proj, or a "
                f"ResNet's attnpool.c_proj) and the text projection; this model's image tower {what} has none "
                "(a timm tower). Allowed: archs with open_clip's own image tower (ViT-B-32, ViT-B-16, ViT-L-14, RN50, "
                "coca_ViT-B-32, ...)")

    def setup(self) -> None:
        super().setup()
        if "teacher" not in self.extra:
            self.extra["teacher"] = FrozenCopy(self.ctx.model)
        self._names = [n for n, _ in self.ctx.model.named_parameters()]

    def every(self) -> int:
        return max(1, (self.total_steps or 1) // self.hp.teacher_updates)

    def loss(self, batch, step):
        model = self.ctx.model
        device = batch["y"].device
        tokens = sample_class_prompts(self.ctx.class_tokens, batch["y"])
        f, g = image_features(model, batch["image"]), text_features(model, tokens)
        terms = {"flyp_loss": self.contrastive_loss(f, g)}
        zero = torch.zeros((), device=device)
        if self.micro.index == 0:
            w_v, w_t = projections(model)
            count = self.micro.count  # the trainer divides each micro-batch's loss by the count
            terms["orth_loss"] = self.hp.beta_orth * count * orthogonality_loss(w_v)
            terms["cross_loss"] = self.hp.beta_cross * count * cross_projection_loss(w_v, w_t)
        else:
            terms["orth_loss"] = terms["cross_loss"] = zero
        if step == 0 or self.hp.beta_distill == 0:
            terms["distill_loss"] = zero
            return terms
        teacher = self.extra["teacher"].model.eval()
        with torch.no_grad():
            f_t, g_t = image_features(teacher, batch["image"]), text_features(teacher, tokens)
            s_t = upcast(teacher.logit_scale.exp())
        s = upcast(model.logit_scale.exp())
        terms["distill_loss"] = self.hp.beta_distill * self_distillation_loss(
            dist.gather(upcast(f)), dist.gather(upcast(g)), s, dist.gather(f_t), dist.gather(g_t), s_t)
        return terms

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        super().after_step(step)  # the logit-scale clamp, before the teacher reads the student
        if not self.total_steps:
            raise ValueError("carot: the run's number of steps (Method.total_steps) is not set; "
                             "train it through pipeline.training.train.fit")
        if not teacher_updates_at(step, self.every()):
            return
        hp = self.hp
        m = teacher_momentum(step, self.total_steps, hp.momentum_start, hp.momentum_end, hp.momentum_warmup)
        student = [p for _, p in self.ctx.model.named_parameters()]
        for t, s in zip(self.extra["teacher"].tensors(self._names), student):
            t.mul_(m).add_(s.detach().to(t.dtype), alpha=1 - m)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The student's trained weights (the teacher is not saved)."""
        return {n: p.detach() for n, p in self.root.named_parameters() if p.requires_grad}
