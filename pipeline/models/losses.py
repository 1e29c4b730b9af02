"""Losses as pure functions of L2-normalised embeddings (see reference/methods.md).

A class appears only where a loss keeps state across steps (DiVE's average vector).

Precision: every loss here is wrapped in `fp32_loss`, so it runs in float32 with autocast
off whatever the forward's precision. Casting the inputs with `.float()` is not enough under
autocast: it runs the similarity matmul in bf16 anyway, and at a logit scale of 100 near
cos ≈ 1 bf16 quantises the logits to ~0.4. Inputs already in float64 stay float64 (tests).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

_LOW = (torch.float16, torch.bfloat16)
Fn = TypeVar("Fn", bound=Callable)


def _device_type(args, kwargs) -> str:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def upcast(x):
    """float16/bfloat16 tensors to float32; anything else unchanged (float64 stays float64)."""
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in _LOW else x


@contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Autocast disabled for `device_type` (autocast state is per device type: disabling
    "cpu" does nothing to a CUDA autocast region, so name the tensors' device)."""
    with torch.autocast(device_type, enabled=False):
        yield


def fp32_loss(fn: Fn) -> Fn:
    """Run `fn` with autocast off for its inputs' device and its float16/bfloat16 tensor
    arguments cast to float32 (differentiably: the gradient flows back in the producer's
    dtype)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off(_device_type(args, kwargs)):
            return fn(*map(upcast, args), **{k: upcast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


@fp32_loss
def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP / FLYP loss: ½[CE(s·F Gᵀ, arange B) + CE(s·G Fᵀ, arange B)].

    Same-class pairs in the batch count as negatives (that is FLYP's definition).
    """
    logits = scale * image @ text.t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@fp32_loss
def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., ICCV 2023, arXiv 2303.15343):

        L = −(1/B) Σ_i Σ_j log σ(z_ij · (s · f_i·g_j + b)),  z_ij = +1 if i = j else −1,

    every image-text pair of the batch an independent binary problem, with the learned
    logit scale s = exp(logit_scale) and bias b (`logit_bias`). The sum over all B² pairs is
    divided by B, as in the paper and open_clip's `SigLipLoss`. Same-class pairs in the batch
    count as negatives (FLYP's definition, carried over).
    """
    logits = scale * image @ text.t() + bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The image-text loss the model was pre-trained with: `sigmoid_loss` for a model with a
    logit bias (SigLIP), the symmetric `clip_loss` otherwise (`bias` None)."""
    return clip_loss(image, text, scale) if bias is None else sigmoid_loss(image, text, scale, bias)


@fp32_loss
def classification_loss(features: torch.Tensor, head: torch.Tensor, labels: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of `features @ headᵀ` (head rows carry the logit scale)."""
    return F.cross_entropy(features @ head.t(), labels, label_smoothing=label_smoothing)


@fp32_loss
def mpm_nce_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, tau: float,
                 margin: float = 0.05, smoothing: float = 0.02) -> torch.Tensor:
    """R-Adapter's multi-positive margin NCE (Kim et al. 2024), both directions averaged.

    Positives P(i) = {j : y_j = y_i}; the margin δ is added to every negative similarity;
    soft targets ỹ_ij = (1−ε)·1[j∈P(i)]/|P(i)| + ε·1[j∉P(i)]/(B−|P(i)|). With ε = δ = 0 and
    unique labels this is the CLIP loss with scale 1/τ.
    """
    positive = labels[:, None] == labels[None, :]
    n_pos = positive.sum(1, keepdim=True).to(image.dtype)
    n_neg = (positive.shape[1] - n_pos).clamp_min(1)
    has_neg = n_pos < positive.shape[1]
    # a row whose batch holds no negative puts all its mass on the positives
    pos_mass = torch.where(has_neg, torch.full_like(n_pos, 1 - smoothing), torch.ones_like(n_pos))
    target = torch.where(positive, pos_mass / n_pos, smoothing / n_neg)
    sim = image @ text.t() + margin * (~positive).to(image.dtype)
    # Text t_i's positives are the images of its label: the same set P(i) as image i's, so
    # row i of the text->image targets is row i of `target` (not column i: the ε share of
    # a negative is ε/(B−|P(i)|) with the counts of the row's own anchor).
    loss_i = -(target * F.log_softmax(sim / tau, dim=1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(sim.t() / tau, dim=1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


@fp32_loss
def difference_vectors(f: torch.Tensor, g: torch.Tensor, f_pre: torch.Tensor,
                       g_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DiVE's u = f_ft − f_pre and v = g_ft − g_pre, in float32 (f_pre, g_pre: the fp32 cache).
    A difference of ~1e-2 rounding noise is what a bf16 f_ft would give at θ = θ_pre, hence
    the fine-tuned rows must come from an fp32 forward too (see DiVE's docstring)."""
    return f - f_pre.to(f.device, f.dtype), g - g_pre.to(g.device, g.dtype)


@fp32_loss
def average_vector_loss(u: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """DiVE AVL = (1/B') Σ_j (‖u_j − m‖² + ‖v_j − m‖²)."""
    return ((u - m).pow(2).sum(1) + (v - m).pow(2).sum(1)).mean()


@fp32_loss
def pairwise_vector_loss(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """DiVE PVL = (1/B') Σ_j ‖u_j − v_j‖²."""
    return (u - v).pow(2).sum(1).mean()


class AverageVector(nn.Module):
    """DiVE's average difference vector m: one EMA shared by both modalities.

    OPEN (ours): m ← α_m·m + (1−α_m)·mean_j[(u_j+v_j)/2], starting at 0, updated before it
    is used in the step's AVL, with no gradient through m. α_m = 0 gives the per-batch mean.
    `batch_mean` must already be averaged across ranks under DDP.
    """

    def __init__(self, dim: int, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("m", torch.zeros(dim))

    @torch.no_grad()
    def update(self, batch_mean: torch.Tensor) -> torch.Tensor:
        self.m.mul_(self.momentum).add_((1 - self.momentum) * batch_mean.to(self.m.dtype))
        return self.m.clone()
