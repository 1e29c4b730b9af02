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


# Model Stock: the top-level keys that take the plain average of the two fine-tuned models (the
# text tower's positional embedding, its projection and final norm, the token embedding and the
# logit scale; `visual.positional_embedding` is merged like every other tensor)
MODEL_STOCK_AVERAGED = ("positional_embedding", "text_projection", "logit_scale")
MODEL_STOCK_AVERAGED_PREFIXES = ("token_embedding.", "ln_final.")


def model_stock_averaged(key: str) -> bool:
    """Whether Model Stock takes the plain average for `key` (an open_clip state-dict name)."""
    return key in MODEL_STOCK_AVERAGED or key.startswith(MODEL_STOCK_AVERAGED_PREFIXES)


def model_stock_ratio(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Model Stock's interpolation ratio for one tensor, in float32:
    cos = ⟨w1−w0, w2−w0⟩ / (‖w1−w0‖‖w2−w0‖ + 1e-8) clamped to [−1, 1], t = 2cos/(cos + 1)
    clamped to [0, 1] (OPEN, ours: the authors' notebook does not clamp t, which is negative
    for cos < 0 and unbounded as cos → −1; for cos ≤ 0 the clamp gives t = 0, the pre-trained
    tensor)."""
    d1 = (w1.float() - w0.float()).flatten()
    d2 = (w2.float() - w0.float()).flatten()
    cos = (d1 @ d2 / (d1.norm() * d2.norm() + 1e-8)).clamp(-1.0, 1.0)
    if cos <= 0:
        return torch.zeros((), dtype=torch.float32, device=cos.device)
    return (2 * cos / (cos + 1)).clamp(0.0, 1.0)


def model_stock_merge(w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor],
                      w2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models",
    ECCV 2024; merge from the authors' notebook, no released code): two fine-tuned models w1,
    w2 of the same recipe and the pre-trained w0, per tensor
    w = t·(w1 + w2)/2 + (1 − t)·w0 with t = `model_stock_ratio` (fp32, clamped).

    The keys of `model_stock_averaged`, any key absent from w0 and any tensor whose shape
    differs from w0's take the plain average (w1 + w2)/2; non-floating tensors are w1's
    (w1 and w2 must agree on them). w1 and w2 must have the same keys and shapes. A trained
    head merges with w0 = the head's pre-trained value (the caller puts it in w0 under the
    head's key). Results keep w1's dtype.
    """
    if set(w1) != set(w2):
        raise KeyError(f"model stock: the two fine-tuned state dicts differ: only in the first "
                       f"{sorted(set(w1) - set(w2))[:5]}, only in the second {sorted(set(w2) - set(w1))[:5]}")
    out = {}
    for k, a in w1.items():
        b = w2[k]
        if a.shape != b.shape:
            raise ValueError(f"model stock: {k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise ValueError(f"model stock: {k}: non-floating tensors differ between the two models")
            out[k] = a.clone()
            continue
        mean = (a.float() + b.to(a.device).float()) / 2
        base = w0.get(k)
        if model_stock_averaged(k) or base is None or base.shape != a.shape:
            out[k] = mean.to(a.dtype)
            continue
        base = base.to(a.device).float()
        t = model_stock_ratio(base, a, b.to(a.device))
        out[k] = (t * mean + (1 - t) * base).to(a.dtype)
    return out


def uniform_soup(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A uniform model soup (Wortsman et al., "Model soups", ICML 2022): the mean of the
    states, per tensor, computed in float32 and returned in the first state's dtype.

    Every state must have the same keys and shapes (the ingredients are one architecture's
    tensors); a non-floating tensor (a counter, an index buffer) is the first state's, and
    must be equal in every state. One state returns a copy of it."""
    if not states:
        raise ValueError("a soup needs at least one state")
    first = states[0]
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(first):
            raise KeyError(f"soup: ingredient {i} has other tensors than ingredient 0: only in 0 "
                           f"{sorted(set(first) - set(s))[:5]}, only in {i} {sorted(set(s) - set(first))[:5]}")
        for k, v in s.items():
            if v.shape != first[k].shape:
                raise ValueError(f"soup: {k}: shape {tuple(v.shape)} in ingredient {i}, "
                                 f"{tuple(first[k].shape)} in ingredient 0")
    out = {}
    for k, a in first.items():
        if not a.is_floating_point():
            for i, s in enumerate(states[1:], 1):
                if not torch.equal(s[k], a):
                    raise ValueError(f"soup: {k}: non-floating tensor differs between ingredients 0 and {i}")
            out[k] = a.clone()
            continue
        total = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
        for s in states:
            total += s[k].to(a.device).float()
        out[k] = (total / len(states)).to(a.dtype)
    return out
