"""Hooks into open_clip's own ViT towers, shared by the methods that edit a transformer's
internals (MaPLe, VPT-deep, AdaptFormer). Not a method.

- Which towers they accept: the image tower must be open_clip's `VisionTransformer` (a timm
  tower or a ModifiedResNet has no `ln_pre` / `transformer.resblocks` to hook), the text tower
  (MaPLe) open_clip's own text transformer (the CLIP's built-in one or a `TextTransformer`).
- Deep prompt tokens through forward hooks, no open_clip code copied: the first layer's
  prompts are appended to the image tokens as they enter `ln_pre` (after the positional
  embedding, as the MaPLe repository's VPT and MaPLe towers do), or written over the token
  embeddings at positions 1..M of a text; block j's forward pre-hook replaces the prompt
  positions of its input with layer j's prompts (the previous layer's outputs there are
  discarded); a forward hook on the image transformer drops the prompt tokens from its output,
  so that the pooling (class token, average, attentional pooler) sees the image tokens only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

MODEL_FAMILIES = ("README, 'Model families', lists the methods that fit each")


def vit_image_tower(model: nn.Module) -> nn.Module | None:
    """`model.visual` when it is open_clip's VisionTransformer with residual blocks, else None."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer) and len(getattr(visual.transformer, "resblocks", ())) > 0:
        return visual
    return None


def _image_kind(model: nn.Module) -> str:
    visual = getattr(model, "visual", None)
    kind = type(visual).__name__
    trunk = getattr(visual, "trunk", None)
    return kind + (f" (timm {type(trunk).__name__})" if trunk is not None else "")


def require_vit_image_tower(method: str, model: nn.Module, what: str) -> nn.Module:
    """The image tower, or ValueError (one sentence naming the method and the tower) when it is
    not open_clip's own VisionTransformer."""
    visual = vit_image_tower(model)
    if visual is None:
        raise ValueError(
            f"{method} {what} in the residual blocks of open_clip's own ViT image tower (VisionTransformer), and "
            f"this model's image tower is {_image_kind(model)}. Allowed: archs whose image tower is open_clip's "
            f"VisionTransformer (the CLIP ViT archs, CoCa); the SigLIP and EVA-02 configs build a timm image tower "
            f"(`vision_cfg.timm_model_name`), ResNet archs a ModifiedResNet ({MODEL_FAMILIES}).")
    return visual


class TextParts:
    """What the text hooks need of open_clip's own text transformer."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self.token_embedding = tower.token_embedding
        self.blocks = list(tower.transformer.resblocks)
        self.batch_first = getattr(tower.transformer, "batch_first", True)
        self.width = tower.transformer.width


def text_tower(model: nn.Module) -> TextParts | None:
    """The CLIP's built-in text transformer, or `model.text` when it is a TextTransformer
    (CustomTextCLIP, CoCa); None for anything else (Hugging Face towers)."""
    from open_clip.transformer import TextTransformer

    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        tower = text
    elif (isinstance(getattr(model, "token_embedding", None), nn.Embedding)
          and len(getattr(getattr(model, "transformer", None), "resblocks", ())) > 0):
        tower = model
    else:
        return None
    return TextParts(tower) if len(tower.transformer.resblocks) > 0 else None


def require_text_tower(method: str, model: nn.Module, what: str) -> TextParts:
    parts = text_tower(model)
    if parts is None:
        kind = type(getattr(model, "text", model)).__name__
        raise ValueError(
            f"{method} {what} in the residual blocks of open_clip's own text transformer, and this model's text "
            f"tower is {kind}. Allowed: archs whose text tower is open_clip's (the CLIP ViT archs, CoCa); Hugging "
            f"Face text towers (`text_cfg.hf_model_name`) have none ({MODEL_FAMILIES}).")
    return parts


def _replace(x: torch.Tensor, start: int, prompt: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """`x` with positions start..start+M−1 along `seq_dim` (a negative start counts from the
    end) replaced by `prompt` [M, d], the same for every sample."""
    m = prompt.shape[0]
    n_seq = x.shape[seq_dim]
    begin = start if start >= 0 else n_seq + start
    if begin < 0 or begin + m > n_seq:
        raise ValueError(f"a sequence of {n_seq} tokens has no positions {begin}..{begin + m - 1} for the prompts")
    p = prompt.to(x.dtype)
    p = p.unsqueeze(0).expand(x.shape[0], -1, -1) if seq_dim == 1 else p.unsqueeze(1).expand(-1, x.shape[1], -1)
    return torch.cat([x.narrow(seq_dim, 0, begin), p, x.narrow(seq_dim, begin + m, n_seq - begin - m)], dim=seq_dim)


def insert_visual_prompts(visual: nn.Module, prompt: Callable[[int], torch.Tensor], depth: int,
                          length: int) -> list:
    """Hooks that give `visual` (open_clip's VisionTransformer) `length` prompt tokens at each
    of its first `depth` blocks: `prompt(j)` [length, width] for block j (0-based) is appended
    after the image tokens before `ln_pre` (j = 0) or replaces the last `length` tokens of
    block j's input (j >= 1); blocks from `depth` on pass them through. The transformer's
    output loses them. Returns the hook handles."""
    blocks = visual.transformer.resblocks
    seq_dim = 1 if getattr(visual.transformer, "batch_first", True) else 0

    def append(module, args):
        x = args[0]  # [N, L, d]: the embeddings, batch first
        p = prompt(0).to(x.dtype)
        return (torch.cat([x, p.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1), *args[1:])

    def replace_at(j: int):
        def hook(module, args, kwargs):
            return (_replace(args[0], -length, prompt(j), seq_dim), *args[1:]), kwargs
        return hook

    def strip(module, args, output):
        return output[:, :-length]  # the transformer's output is batch first

    handles = [visual.ln_pre.register_forward_pre_hook(append)]
    for j in range(1, depth):
        handles.append(blocks[j].register_forward_pre_hook(replace_at(j), with_kwargs=True))
    handles.append(visual.transformer.register_forward_hook(strip))
    return handles


def insert_text_prompts(parts: TextParts, prompt: Callable[[int], torch.Tensor], depth: int) -> list:
    """Hooks that make token positions 1..M of every text the prompt positions of the first
    `depth` blocks: `prompt(0)` [M, width] replaces the token embeddings there (before the
    positional embedding is added), `prompt(j)` replaces block j's input there (j >= 1).
    Position 0 (the start-of-text token) and the rest of the text are kept. Returns the
    hook handles."""
    seq_dim = 1 if parts.batch_first else 0

    def embed(module, args, output):
        return _replace(output, 1, prompt(0), 1)  # [N, L, d]

    def replace_at(j: int):
        def hook(module, args, kwargs):
            return (_replace(args[0], 1, prompt(j), seq_dim), *args[1:]), kwargs
        return hook

    handles = [parts.token_embedding.register_forward_hook(embed)]
    for j in range(1, depth):
        handles.append(parts.blocks[j].register_forward_pre_hook(replace_at(j), with_kwargs=True))
    return handles


def remove(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
