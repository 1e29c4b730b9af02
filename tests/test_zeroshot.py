"""The class-prompt head with gradient (`pipeline.models.zeroshot`): chunked under activation
checkpointing and trimmed after the longest prompt, it gives the loss and gradients of one
full-context forward over every prompt; the memory estimate that sets the chunk size
matches the tensors autograd really keeps."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pipeline  # noqa: F401
import open_clip
import pytest
import torch

from pipeline.models.losses import classification_loss
from pipeline.methods import METHODS
from pipeline.methods.common import image_features
from pipeline.models.zeroshot import (build_head_with_grad, encode_text_with_grad, prompt_activation_bytes,
                               prompt_chunk_size, saved_activation_bytes, text_tower_shape,
                               trimmed_length, trims_exactly)
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

# 7 classes × 2 templates = 14 prompts of different lengths (3 to 10 of the 16 positions)
CLASSES = ["circle", "square", "triangle", "star", "hexagon", "big red ring with a hole", "x"]
CHUNKS = [1, 3, 5, 14, 20]  # 3 and 5 do not divide 14; 14 and 20 are one chunk
PROMPT_CE = ["aclip", "bitfit", "lora"]


@functools.cache
def class_tokens() -> torch.Tensor:
    tok = open_clip.get_tokenizer(mf.register_tiny())
    return torch.stack([tok([t.format(c) for t in mf.TEMPLATES]) for c in CLASSES])


def trained_method(name: str, seed: int = 0):
    """`name` set up on the tiny model, its trainable weights moved off their init (LoRA's B
    starts at zero, which would leave half its gradients trivially zero)."""
    cls = METHODS[name]
    model = mf.fresh_model()
    ctx = mf.context(model)
    ctx.class_tokens = class_tokens()
    method = cls(cls.Hparams(), ctx)
    torch.manual_seed(seed)  # LoRA's A init draws from the global RNG
    method.setup()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable(method):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return method


def trainable(method) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in method.root.named_parameters() if p.requires_grad]


def loss_and_grads(method, chunk_size, trim, autocast: bool = False):
    model = method.ctx.model
    method.root.zero_grad(set_to_none=True)
    x, y = mf.images(6, seed=2), torch.arange(6) % len(CLASSES)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        feats = image_features(model, x).float()
        head = build_head_with_grad(model, class_tokens(), chunk_size, trim)
        loss = classification_loss(feats, model.logit_scale.exp().float() * head, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable(method)}


@pytest.mark.parametrize("name", PROMPT_CE)
def test_chunked_and_trimmed_equal_one_full_forward(name):
    method = trained_method(name)
    ref_loss, ref_grads = loss_and_grads(method, None, trim=False)  # the code before chunking
    assert sum(float(g.abs().sum()) for n, g in ref_grads.items() if not n.startswith("clip.visual")) > 0
    for chunk, trim in [*((c, True) for c in CHUNKS), (3, False), (None, True)]:
        loss, grads = loss_and_grads(method, chunk, trim)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, msg=f"chunk {chunk} trim {trim}")
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"chunk {chunk} trim {trim} {n}: {m}")


def test_chunks_are_recomputed_in_backward_and_trimmed():
    """What runs: one text-transformer pass per chunk forward, one more per chunk in the
    backward pass (the recomputation), each on the chunk's own longest prompt only, the
    chunks formed from the prompts sorted by length."""
    method = trained_method("bitfit")
    lengths: list[tuple[int, int]] = []
    hook = method.ctx.model.transformer.register_forward_pre_hook(
        lambda mod, args: lengths.append(tuple(args[0].shape[:2])))
    try:
        loss_and_grads(method, 3, trim=True)
    finally:
        hook.remove()
    flat = class_tokens().reshape(14, -1)
    by_length = sorted(int(n) + 1 for n in flat.argmax(-1))
    expected = [(len(by_length[i:i + 3]), max(by_length[i:i + 3])) for i in range(0, 14, 3)]
    assert lengths[:5] == expected
    assert sorted(lengths[5:]) == sorted(expected)  # the backward recomputes every chunk
    assert max(n for _, n in expected) < flat.shape[1]
    # positions run: the sorted chunks keep less padding than chunks in class order would
    in_order = sum(len(flat[i:i + 3]) * trimmed_length(flat[i:i + 3]) for i in range(0, 14, 3))
    assert sum(b * n for b, n in expected) < in_order


def test_method_loss_honours_the_budget():
    """Through PromptCE.loss: a budget too small for two prompts chunks them one by one,
    with the same loss and gradients as no budget (all prompts in one forward)."""
    results = {}
    for budget in (None, 1):
        method = trained_method("lora")
        method.ctx.prompt_memory_bytes = budget
        calls = []
        hook = method.ctx.model.transformer.register_forward_pre_hook(lambda mod, args: calls.append(1))
        torch.manual_seed(0)  # the template draw
        batch = {"image": mf.images(6, seed=2), "y": torch.arange(6) % len(CLASSES)}
        loss = method.loss(batch, 0)["ce_loss"]
        loss.backward()
        hook.remove()
        results[budget] = (loss.detach(), {n: p.grad.clone() for n, p in trainable(method)}, len(calls))
    (l0, g0, n0), (l1, g1, n1) = results[None], results[1]
    assert (n0, n1) == (1, 2 * len(CLASSES))
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5)


def test_chunked_under_bf16_autocast():
    """The recomputation replays autocast (a chunk recomputed in fp32 would not match the
    tensors its forward saved, and checkpoint would raise). Chunked and trimmed under bf16,
    the loss and gradients are as far from the fp32 ones as one bf16 forward's are (bf16
    rounding, not a different computation)."""
    method = trained_method("bitfit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = encode_text_with_grad(method.ctx.model, class_tokens().reshape(14, -1), 3)
    assert feats.dtype == torch.bfloat16
    fp32_loss, fp32_grads = loss_and_grads(method, None, trim=False)
    ref_loss, ref_grads = loss_and_grads(method, None, trim=False, autocast=True)
    loss, grads = loss_and_grads(method, 3, trim=True, autocast=True)

    def err(g: dict) -> float:
        return float(sum((g[n] - fp32_grads[n]).square().sum() for n in g).sqrt())

    norm = float(sum(g.square().sum() for g in fp32_grads.values()).sqrt())
    print(f"bf16 vs fp32: loss {float(ref_loss - fp32_loss):.2e} unchunked, {float(loss - fp32_loss):.2e} "
          f"chunked; gradient error / norm {err(ref_grads) / norm:.2e}, {err(grads) / norm:.2e}")
    assert 0 < err(ref_grads) < 0.1 * norm  # bf16 did run, and is close
    assert abs(float(loss - fp32_loss)) <= 2 * abs(float(ref_loss - fp32_loss)) + 1e-3
    assert err(grads) <= 2 * err(ref_grads)


# ---- trimming: where it is exact, and only there -------------------------------------------


def register(folder: Path, name: str, text_cfg: dict, custom_text: bool) -> str:
    """The tiny config with `text_cfg` overrides, known to open_clip as `name`."""
    cfg = {**mf.CONFIG, "text_cfg": {**mf.CONFIG["text_cfg"], **text_cfg}}
    if custom_text:
        cfg["custom_text"] = True
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return name


@pytest.mark.parametrize("text_cfg, custom_text, exact", [
    ({}, False, True),  # CLIP, built-in tower: causal, argmax pooling
    ({}, True, True),  # CustomTextCLIP with a TextTransformer: the same
    ({"pool_type": "last"}, True, False),  # pools the last position: padding reaches it
    ({"no_causal_mask": True}, True, False),  # bidirectional
    ({"embed_cls": True}, True, False),  # CoCa-style class token appended after the padding
])
def test_trim_only_where_exact(text_cfg, custom_text, exact, tmp_path):
    arch = register(tmp_path, f"zeroshot-test-{tmp_path.name}", text_cfg, custom_text)
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    assert trims_exactly(model) is exact
    if not exact:
        return
    tokens = class_tokens().reshape(14, -1)
    full = model.encode_text(tokens)
    cut = encode_text_with_grad(model, tokens, trim=True)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    seen = []
    tower = model.text.transformer if custom_text else model.transformer
    hook = tower.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    encode_text_with_grad(model, tokens, trim=True)
    hook.remove()
    assert seen == [trimmed_length(tokens)] and seen[0] < tokens.shape[1]


def test_trim_refused_for_a_patched_encode_text():
    model = mf.fresh_model()
    model.encode_text = lambda tokens, normalize=False: type(model).encode_text(model, tokens)
    assert not trims_exactly(model)


# ---- the memory estimate ---------------------------------------------------------------------


def measured_per_prompt(model, tokens: torch.Tensor, autocast: bool) -> tuple[int, int]:
    """(bytes per prompt, bytes per chunk) autograd keeps for encode_text, from 1 and 3 prompts."""
    def saved(n):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return saved_activation_bytes(lambda: model.encode_text(tokens[:n]), model)
    one, three = saved(1), saved(3)
    per_prompt = (three - one) // 2
    return per_prompt, one - per_prompt


def check_estimate(model, tokens: torch.Tensor, autocast: bool) -> None:
    model.requires_grad_(True)  # the bound is for every weight trained
    shape = text_tower_shape(model)
    measured, measured_chunk = measured_per_prompt(model, tokens, autocast)
    est, est_chunk = prompt_activation_bytes(shape, tokens.shape[1], torch.bfloat16 if autocast else None)
    print(f"L={tokens.shape[1]} autocast={autocast}: estimate {est / 2**20:.2f} MiB, measured "
          f"{measured / 2**20:.2f} MiB per prompt; per chunk {est_chunk / 2**20:.2f} vs {measured_chunk / 2**20:.2f} MiB")
    assert measured <= est <= 1.15 * measured
    assert measured_chunk <= est_chunk + 64 * 2**10  # + the pooled-index and ln_final odds


@pytest.mark.parametrize("autocast", [False, True])
def test_estimate_matches_saved_tensors_tiny(autocast):
    model = mf.fresh_model()
    tokens = class_tokens().reshape(14, -1)
    check_estimate(model, tokens, autocast)


@pytest.mark.slow  # builds a ViT-B-32 (seconds)
@pytest.mark.parametrize("length, autocast", [(77, False), (18, False), (18, True)])
def test_estimate_matches_saved_tensors_vit_b32(length, autocast):
    """ViT-B-32's text tower at its full context and at RxRx1's trimmed length (18)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    tokens = open_clip.get_tokenizer("ViT-B-32")([f"a cell painting image of sirna {i}." for i in range(3)])
    if length < 77:
        model = _cut_context(model, length)
        tokens = tokens[:, :length]
    check_estimate(model, tokens, autocast)


def _cut_context(model, length: int):
    """The same model with a `length`-position context (what trimming runs)."""
    with torch.no_grad():
        model.positional_embedding = torch.nn.Parameter(model.positional_embedding[:length].clone())
    model.attn_mask = model.attn_mask[:length, :length].clone()
    return model


def test_chunk_size_follows_the_budget():
    model = mf.fresh_model()
    tokens = class_tokens().reshape(14, -1)
    shape = text_tower_shape(model)
    per_prompt, per_chunk = prompt_activation_bytes(shape, trimmed_length(tokens))
    for k in (1, 2, 5, 1000):
        assert prompt_chunk_size(model, tokens, per_chunk + k * per_prompt) == k
        assert prompt_chunk_size(model, tokens, per_chunk + k * per_prompt - 1) == max(1, k - 1)
    assert prompt_chunk_size(model, tokens, 1) == 1
    # no trimming: the full context costs more per prompt, so fewer fit
    assert prompt_chunk_size(model, tokens, 50 * per_prompt, trim=False) < 50


def test_chunk_size_measured_for_other_towers(tmp_path):
    """A tower the formula does not describe (custom blocks with QK norms) is measured on
    one prompt; the measured size lets the chunk keep no more than the budget."""
    arch = register(tmp_path, "zeroshot-test-custom-blocks", {"block_type": "custom", "qk_norm": True}, True)
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    assert text_tower_shape(model) is None
    tokens = class_tokens().reshape(14, -1)
    one = saved_activation_bytes(lambda: encode_text_with_grad(model, tokens[:1]), model)
    assert one > 0
    chunk = prompt_chunk_size(model, tokens, 4 * one)
    assert chunk == 4
    assert saved_activation_bytes(lambda: encode_text_with_grad(model, tokens[:chunk]), model) <= 4 * one
