"""The few-shot field's baselines (issue 29): each head, loss or prompt construction against an
independent implementation written here, on random tensors of several shapes (atol 1e-5).
The trainable-parameter contract and the checkpoint round trip of each are in
tests/test_methods.py (it picks every registered method up)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.clip_lora import CLIPLoRA, CLIPLoRAHparams
from pipeline.methods.lora import LoRAHparams, LoRAQV, _self_attention
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

# ---- CLIP-LoRA ----------------------------------------------------------------------------


def test_clip_lora_recipe_defaults_and_scaling():
    hp = CLIPLoRAHparams()
    assert (hp.rank, hp.scale, hp.targets, hp.dropout, hp.lr, hp.weight_decay) == (2, 1.0, "qkv", 0.25, 2e-4, 1e-2)
    assert hp.multiplier == pytest.approx(1 / math.sqrt(2))
    assert CLIPLoRAHparams(rank=8, scale=2.0).multiplier == pytest.approx(2.0 / math.sqrt(8))
    # lora keeps its own defaults: Q and V, plain multiplier 0.2, no dropout
    base = LoRAHparams()
    assert (base.rank, base.multiplier, base.targets, base.dropout) == (8, 0.2, "qv", 0.0)
    for bad in ({"scaling": "alpha_r"}, {"targets": "qk"}, {"dropout": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoRAHparams(**bad)


@pytest.mark.parametrize("width,rank", [(8, 1), (16, 2), (12, 4)])
@pytest.mark.parametrize("targets", ["qv", "qkv"])
def test_lora_delta_and_branch(width, rank, targets):
    torch.manual_seed(width * rank)
    lora = LoRAQV(width, rank, 0.37, targets)
    for p in lora.parameters():
        nn.init.normal_(p)
    ab = {s: (getattr(lora, f"a_{s}"), getattr(lora, f"b_{s}")) for s in targets}
    blocks = [0.37 * ab[s][1] @ ab[s][0] if s in ab else torch.zeros(width, width) for s in "qkv"]
    expected = torch.cat(blocks)
    torch.testing.assert_close(lora.delta(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(lora.delta(0.5), 0.5 * expected, rtol=0, atol=1e-5)
    x = torch.randn(3, 5, width)
    torch.testing.assert_close(lora.branch(x), x @ expected.t(), rtol=0, atol=1e-4)


def _reference_attention(mha, x, mask, delta_in, delta):
    """Multi-head self-attention written out: per head softmax(q kᵀ/√dh + mask) v, with
    [q k v] = x Wᵀ + b + delta_in Δᵀ (the LoRA branch on its own input), then out_proj."""
    xb = x if mha.batch_first else x.transpose(0, 1)
    din = delta_in if mha.batch_first else delta_in.transpose(0, 1)
    n, length, d = xb.shape
    h = mha.num_heads
    qkv = xb @ mha.in_proj_weight.t() + mha.in_proj_bias + din @ delta.t()
    q, k, v = qkv.split(d, dim=-1)
    heads = lambda t: t.view(n, length, h, d // h).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    if mask is not None:
        add = torch.where(mask, float("-inf"), 0.0) if mask.dtype == torch.bool else mask
        scores = scores + (add.view(n, h, length, length) if add.ndim == 3 else add)
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(n, length, d)
    out = mha.out_proj(out)
    return out if mha.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("n,length,width,heads", [(2, 5, 8, 2), (3, 7, 16, 4), (1, 4, 12, 3)])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "float", "bool", "per_sample"])
def test_lora_dropout_attention_matches_reference(n, length, width, heads, batch_first, mask_kind):
    """The dropout path: the LoRA branch on x ⊙ keep / (1 − p), keep drawn per element."""
    torch.manual_seed(n + length + width)
    mha = nn.MultiheadAttention(width, heads, batch_first=batch_first)
    nn.init.normal_(mha.in_proj_bias)
    lora = LoRAQV(width, 2, 0.7, "qkv")
    for p in lora.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn((n, length, width) if batch_first else (length, n, width))
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    additive = torch.zeros(length, length).masked_fill(causal, float("-inf"))
    # per sample and head (CoCa's text tower): a random additive mask on top of the causal one
    per_sample = additive + torch.randn(n * heads, length, length)
    mask = {None: None, "bool": causal, "float": additive, "per_sample": per_sample}[mask_kind]
    p = 0.25
    torch.manual_seed(11)
    out, _ = _self_attention(mha, lora, p, x, x, x, need_weights=False, attn_mask=mask)
    torch.manual_seed(11)  # the same draw: one Bernoulli per element of the [N, L, d] input
    keep = torch.empty(n, length, width).bernoulli_(1 - p)
    keep = keep if batch_first else keep.transpose(0, 1)
    expected = _reference_attention(mha, x, mask, x * keep / (1 - p), lora.delta())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert 0 < keep.mean() < 1  # the draw dropped something and kept something
    # with nothing dropped it is nn.MultiheadAttention with the update folded into the weight
    with torch.no_grad():
        folded = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        folded.load_state_dict(mha.state_dict())
        folded.in_proj_weight += lora.delta()
    torch.testing.assert_close(_reference_attention(mha, x, mask, x, lora.delta()),
                               folded(x, x, x, need_weights=False, attn_mask=mask)[0], rtol=0, atol=1e-5)


def test_clip_lora_dropout_only_in_training_and_single_template():
    model = mf.fresh_model()
    method = CLIPLoRA(CLIPLoRAHparams(), mf.context(model))
    method.setup()
    with torch.no_grad():
        for lora in method.extra["lora"].values():
            for name, p in lora.named_parameters():
                if name.startswith("b_"):
                    nn.init.normal_(p, std=0.5)
    x = mf.images(3)
    model.eval()
    with torch.no_grad():
        a, b = model.encode_image(x), model.encode_image(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval: no dropout, the folded update
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        c = model.encode_image(x)
        torch.manual_seed(1)
        d = model.encode_image(x)
    assert not torch.allclose(c, d)  # training: a different mask per draw
    # the training head is the first template only, whatever the RNG
    tokens = method.ctx.class_tokens
    assert tokens.shape[1] > 1
    calls = []
    import pipeline.methods.clip_lora as cl

    real = cl.class_head_with_grad

    def spy(model_, class_tokens, n_templates, device, memory):
        calls.append((class_tokens.clone(), n_templates))
        return real(model_, class_tokens, n_templates, device, memory)

    cl.class_head_with_grad = spy
    try:
        batch = {"image": x, "y": torch.tensor([0, 1, 2])}
        method.loss(batch, 0)
    finally:
        cl.class_head_with_grad = real
    (seen, n_templates), = calls
    assert n_templates == 0 and torch.equal(seen, tokens[:, :1])
