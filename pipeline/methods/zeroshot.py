"""Zero-shot CLIP (k = 0): the pre-trained model with the prompt-ensemble head. Nothing trains."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.validation import Settings
from pipeline.methods import register
from pipeline.methods.base import Method


@dataclass(frozen=True)
class NoHparams(Settings):
    """Nothing trains, so nothing to set."""


@register
class ZeroShot(Method):
    """Radford et al. 2021. Head = per class, the mean over templates of g(template(c)),
    renormalised; logits s·f(x)·Hᵀ. The embed stage evaluates it once as the k = 0 level,
    in fp32 without autocast, like every evaluation."""

    name = "zeroshot"
    family = "baseline"
    Hparams = NoHparams
    trains = False
    weight_space = False
