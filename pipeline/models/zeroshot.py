"""The one zero-shot head builder (zero-shot eval, LP/FT init, FLYP/DiVE eval all use it), and
its differentiable twin for the methods that train the text tower through the class prompts
(BitFit, A-CLIP, LoRA, R-Adapter's CE).

The twin re-encodes every class prompt with gradient at every step, so without care its
activation memory grows with the number of classes (RxRx1: 1,139). Two exact measures keep
it bounded (same loss and gradients, up to float summation order):
- chunks under activation checkpointing: the prompts go through the text tower in chunks
  whose activations fit a memory budget (`prompt_chunk_size`, from the tower's shape); each
  chunk's activations are dropped after its forward and recomputed in the backward pass, so
  the peak holds one chunk's activations whatever the number of classes;
- trimming the padding: open_clip's own text transformer is causally masked and pools at the
  argmax of the token ids (the end-of-text token), so the positions after the longest prompt
  cannot reach any pooled output; they are cut off where that holds (`trims_exactly`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
    renormalised. Logits are then s · f(x) · Hᵀ.

    SigLIP's `logit_bias` b is left out on purpose: s·f·Hᵀ + b shifts every class logit of
    an image by the same constant, which changes neither the argmax nor a cross-entropy over
    the classes (softmax is shift-invariant), so every head, loss and metric built on this
    one is the same with or without it (it would matter only for per-class sigmoid
    probabilities, which nothing here uses)."""
    c, t, length = class_tokens.shape
    flat = class_tokens.reshape(c * t, length)
    parts = [F.normalize(encode_text(flat[i : i + batch_size]).float(), dim=-1)
             for i in range(0, flat.shape[0], batch_size)]
    emb = torch.cat(parts).view(c, t, -1).mean(1)
    return F.normalize(emb, dim=-1)


def build_head_with_grad(model: nn.Module, class_tokens: torch.Tensor,
                         chunk_size: int | None = None, trim: bool = True) -> torch.Tensor:
    """Same as `build_head` but differentiable (for methods that train the text tower).

    `chunk_size`: prompts per text forward (`encode_text_with_grad`); None = all at once.
    """
    c, t, length = class_tokens.shape
    emb = encode_text_with_grad(model, class_tokens.reshape(c * t, length), chunk_size, trim)
    emb = F.normalize(upcast(emb), dim=-1)  # bf16 upcast to fp32, float64 kept
    return F.normalize(emb.view(c, t, -1).mean(1), dim=-1)


def encode_text_with_grad(model: nn.Module, tokens: torch.Tensor, chunk_size: int | None = None,
                          trim: bool = True) -> torch.Tensor:
    """`model.encode_text(tokens)` [N, D], differentiable, in chunks of `chunk_size` prompts.

    With more than one chunk, each runs under `torch.utils.checkpoint` (non-reentrant: it
    replays autocast and the RNG state in the recomputation, so random draws in the tower
    repeat exactly): only the chunk outputs stay alive between forward and backward. With
    `trim`, the padding after the longest prompt of each chunk is cut off where that is
    provably exact (`trims_exactly`); the chunks are then formed from the prompts sorted by
    length, so that each carries little padding (the rows come back in their order).
    """
    exact = trim and trims_exactly(model)
    encode = functools.partial(_encode_trimmed, model) if exact else model.encode_text
    n = tokens.shape[0]
    if chunk_size is None or chunk_size >= n:
        return encode(tokens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size} must be >= 1")
    order = torch.argsort(tokens.argmax(dim=-1), stable=True) if exact else None
    if order is not None:
        tokens = tokens[order]
    out = torch.cat([checkpoint(encode, tokens[i : i + chunk_size], use_reentrant=False)
                     for i in range(0, n, chunk_size)])
    return out if order is None else out[torch.argsort(order)]


# ---- trimming the padding ------------------------------------------------------------------


def _text_tower(model: nn.Module) -> nn.Module | None:
    """The module that holds open_clip's own text transformer: the CLIP itself (the built-in
    tower) or its `text` (CustomTextCLIP with a TextTransformer); None for other towers
    (Hugging Face ones)."""
    from open_clip.transformer import TextTransformer, Transformer

    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        return text
    if isinstance(getattr(model, "transformer", None), Transformer) and hasattr(model, "positional_embedding"):
        return model
    return None


def trims_exactly(model: nn.Module) -> bool:
    """True where cutting the token tensor after the longest prompt cannot change any output
    of `model.encode_text`: open_clip's stock `encode_text` over its own text transformer,
    under the causal mask (position i sees positions <= i only; every other layer acts per
    position), pooled at the argmax of the token ids. The pooled position p of every prompt
    is then kept, and so are all the positions it depends on; `argmax` of the cut row is
    still p (the prefix up to p is unchanged). Not for pooling at the last position or at
    a class token (CoCa), padding masks (bidirectional towers) or Hugging Face towers.
    """
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer

    tower = _text_tower(model)
    if tower is None or "encode_text" in vars(model):
        return False
    if isinstance(model, CLIP) and tower is model:
        stock = type(model).encode_text is CLIP.encode_text
        pool = model.text_pool_type
    elif isinstance(model, CustomTextCLIP) and tower is model.text:
        stock = (type(model).encode_text is CustomTextCLIP.encode_text
                 and type(tower).forward is TextTransformer.forward and "forward" not in vars(tower)
                 and tower.cls_emb is None and not tower.use_pad_mask)
        pool = tower.pool_type
    else:
        return False
    mask = tower.attn_mask
    n = tower.positional_embedding.shape[0]
    if not stock or pool != "argmax" or not isinstance(mask, torch.Tensor) or mask.shape != (n, n):
        return False
    causal = torch.full((n, n), float("-inf"), device=mask.device).triu_(1)
    return torch.equal(mask.float(), causal)


def trimmed_length(tokens: torch.Tensor) -> int:
    """Token positions to keep: up to the pooled (argmax) position of the longest prompt."""
    return int(tokens.argmax(dim=-1).max()) + 1


class _EncodeText(nn.Module):
    """`encode_text` as a module's forward, so that `torch.func.functional_call` can run it
    with the positional embedding and causal mask cut to the kept length."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def _encode_trimmed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` on the kept positions only (call where `trims_exactly`).

    open_clip 3.3's CLIP.encode_text adds its whole [context, width] positional embedding
    and passes its whole [context, context] mask, so a shorter token tensor would not fit:
    both are substituted by their leading slices for this call (functional_call; gradients
    reach the stored positional embedding through the slice). TextTransformer slices the
    positional embedding itself; only its mask is substituted.
    """
    length = trimmed_length(tokens)
    tower = _text_tower(model)
    if length >= tower.positional_embedding.shape[0]:
        return model.encode_text(tokens)
    prefix = "model." if tower is model else "model.text."
    cut = {prefix + "attn_mask": tower.attn_mask[:length, :length]}
    if tower is model:
        cut[prefix + "positional_embedding"] = model.positional_embedding[:length]
    return torch.func.functional_call(_EncodeText(model), cut, (tokens[:, :length],))


# ---- the memory budget ---------------------------------------------------------------------


@dataclass(frozen=True)
class TextTowerShape:
    context_length: int
    width: int  # d
    layers: int
    heads: int
    mlp_width: int  # m
    output_dim: int  # e, of the text projection (0: none)
    dtype: torch.dtype  # of the weights and the residual stream


def text_tower_shape(model: nn.Module) -> TextTowerShape | None:
    """Shape of open_clip's own text transformer built of standard blocks (nn.MultiheadAttention
    and a two-layer MLP); None for anything else, whose activations the formula below does
    not describe (custom blocks with extra norms, Hugging Face towers)."""
    from open_clip.transformer import ResidualAttentionBlock

    tower = _text_tower(model)
    if tower is None:
        return None
    blocks = list(tower.transformer.resblocks)
    if not blocks or any(type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv") for b in blocks):
        return None
    proj = tower.text_projection
    output_dim = 0 if proj is None else (proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
    return TextTowerShape(context_length=tower.positional_embedding.shape[0], width=tower.transformer.width,
                          layers=len(blocks), heads=blocks[0].attn.num_heads,
                          mlp_width=blocks[0].mlp.c_fc.out_features, output_dim=output_dim,
                          dtype=tower.transformer.get_cast_dtype())


def prompt_activation_bytes(shape: TextTowerShape, length: int,
                            compute_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(bytes per prompt, bytes per chunk) of activations that one forward of `length`-token
    prompts through the text tower keeps for its backward pass, when every weight of the
    tower trains (an upper bound: BitFit and A-CLIP keep less, since a frozen weight's input
    is not needed for its gradient).

    Per prompt, with p = bytes of `shape.dtype` (the residual stream), c = bytes of the
    compute dtype (autocast's, else p), d = width, m = MLP width, h = heads, L = `length`:

        L · [layers · (2·d·p + (6·d + 2·m + h·L)·c + 4·h + 16) + d·p + 16] + d·c

    per block: the block input and the post-attention sum (the residual stream, 2·d at p);
    the LayerNorm outputs (2·d), Q, K and V (3·d), the attention output (d) and the MLP
    hidden before and after the GELU (2·m) at c; the attention probabilities (h·L at c) as
    the math SDPA kernel keeps them (the flash and memory-efficient kernels keep only h
    fp32 log-sum-exp values, 4·h); two fp32 mean/rstd pairs of the LayerNorms (16). Per
    prompt once: the final LayerNorm's input and statistics, the token ids (int64), the
    pooled feature before the projection. For ViT-B/32 (d 512, m 2048, h 8, 12 layers)
    in fp32 this is 16-17·d·4 bytes per position and block: 31 MiB per 77-token prompt
    (autograd saves 29 MiB), 6.9 MiB at the 18 tokens of RxRx1's longest prompt (6.8);
    checked in tests/test_zeroshot.py.

    Per chunk: the causal mask each block keeps (L² at c) and, under autocast (c != p), the
    low-precision copies of the weights (4·d² + 2·d·m per block, d·e for the projection)
    that autocast makes and autograd keeps.
    """
    p = torch.empty((), dtype=shape.dtype).element_size()
    c = torch.empty((), dtype=compute_dtype or shape.dtype).element_size()
    d, m, h, n = shape.width, shape.mlp_width, shape.heads, shape.layers
    block = 2 * d * p + (6 * d + 2 * m + h * length) * c + 4 * h + 16
    per_prompt = length * (n * block + d * p + 16) + d * c
    per_chunk = n * length * length * c
    if c != p:
        per_chunk += (n * (4 * d * d + 2 * d * m) + d * shape.output_dim) * c
    return per_prompt, per_chunk


def saved_activation_bytes(fn: Callable[[], torch.Tensor], module: nn.Module) -> int:
    """Bytes of the tensors autograd saves while `fn()` runs, counted once per storage,
    `module`'s own parameters excluded (they are held anyway). What the backward of `fn`
    needs, measured rather than estimated; the RNG is left as it was."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        ptr = x.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = x.untyped_storage().nbytes()
        return x

    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(seen.values())


def prompt_chunk_size(model: nn.Module, tokens: torch.Tensor, budget_bytes: int, trim: bool = True) -> int:
    """Prompts per chunk so that one chunk's activations fit `budget_bytes`, for `tokens` [N, L]
    encoded by `encode_text_with_grad` in the current autocast state; at least 1.

    For open_clip's standard text transformer, from `prompt_activation_bytes` at the length
    that will run (trimmed where exact); for any other tower, measured on one prompt
    (`saved_activation_bytes`, which then also counts what is per chunk: conservative).
    """
    device = tokens.device
    autocast = torch.is_autocast_enabled(device.type)
    compute_dtype = torch.get_autocast_dtype(device.type) if autocast else None
    shape = text_tower_shape(model)
    if shape is None:
        per_prompt = saved_activation_bytes(lambda: encode_text_with_grad(model, tokens[:1], None, trim), model)
        per_chunk = 0
    else:
        length = trimmed_length(tokens) if trim and trims_exactly(model) else tokens.shape[1]
        per_prompt, per_chunk = prompt_activation_bytes(shape, length, compute_dtype)
    return max(1, (budget_bytes - per_chunk) // max(per_prompt, 1))
