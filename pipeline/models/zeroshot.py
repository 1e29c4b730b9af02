"""The one zero-shot head builder (zero-shot eval, LP/FT init, FLYP/DiVE eval all use it)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.models.losses import upcast


def tokenize_prompts(tokenizer: Callable, texts: Sequence[Sequence[str]]) -> torch.Tensor:
    """Tokenise per-class prompt lists into a [C, T, L] tensor (T templates per class)."""
    n_templates = {len(t) for t in texts}
    if len(n_templates) != 1:
        raise ValueError("every class needs the same number of prompts")
    flat = [p for per_class in texts for p in per_class]
    tokens = tokenizer(flat)
    return tokens.view(len(texts), n_templates.pop(), -1)


@torch.no_grad()
def build_head(encode_text: Callable[[torch.Tensor], torch.Tensor], class_tokens: torch.Tensor,
               batch_size: int = 1024) -> torch.Tensor:
    """Zero-shot head H [C, D]: per class, the mean of its L2-normalised template embeddings,
    renormalised. Logits are then s · f(x) · Hᵀ."""
    c, t, length = class_tokens.shape
    flat = class_tokens.reshape(c * t, length)
    parts = [F.normalize(encode_text(flat[i : i + batch_size]).float(), dim=-1)
             for i in range(0, flat.shape[0], batch_size)]
    emb = torch.cat(parts).view(c, t, -1).mean(1)
    return F.normalize(emb, dim=-1)


def build_head_with_grad(encode_text: Callable, class_tokens: torch.Tensor) -> torch.Tensor:
    """Same as `build_head` but differentiable (for methods that train the text tower); a
    bf16 forward's output is upcast to fp32 before normalising, a float64 one kept."""
    c, t, length = class_tokens.shape
    emb = F.normalize(upcast(encode_text(class_tokens.reshape(c * t, length))), dim=-1)
    return F.normalize(emb.view(c, t, -1).mean(1), dim=-1)
