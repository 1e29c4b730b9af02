"""Weight-space operations as pure functions over state dicts."""

from __future__ import annotations

import torch


def wise_merge(zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
               alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT (Wortsman et al. 2022): θ_α = (1−α)·θ_zero-shot + α·θ_fine-tuned, per weight.

    Both dicts must have the same keys and shapes; α = 0 returns the zero-shot weights and
    α = 1 the fine-tuned ones exactly.
    """
    if set(zero_shot) != set(fine_tuned):
        only_a = sorted(set(zero_shot) - set(fine_tuned))[:5]
        only_b = sorted(set(fine_tuned) - set(zero_shot))[:5]
        raise KeyError(f"state dicts differ: only in zero-shot {only_a}, only in fine-tuned {only_b}")
    out = {}
    for k, a in zero_shot.items():
        b = fine_tuned[k]
        if a.shape != b.shape:
            raise ValueError(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if alpha == 1.0:
            out[k] = b.clone()
        elif alpha == 0.0:
            out[k] = a.clone()
        elif a.is_floating_point():
            out[k] = ((1 - alpha) * a.float() + alpha * b.to(a.device).float()).to(a.dtype)
        else:
            out[k] = b.clone()
    return out
