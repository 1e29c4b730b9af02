"""Parameter-efficient methods: trainable shares on the real ViT-B open_clip configs (random
weights, built only: no forward; the share is what the trainer reports: trainable
parameters, method-owned ones included, over the pre-trained model's), and the LoRA /
CLIP-Adapter mechanics on the tiny model."""

from __future__ import annotations

import functools

import pipeline  # noqa: F401
import open_clip
import pytest
import torch

from pipeline.methods import METHODS
from pipeline.methods.base import TaskContext, count_params
from pipeline.methods.clip_adapter import CLIPAdapter, CLIPAdapterHparams
from pipeline.methods.lora import LoRA, LoRAHparams
from pipeline.training.train import build_optimizer
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

slow = pytest.mark.slow  # building a ViT-B takes seconds on CPU


@functools.cache
def vit_b(arch: str) -> torch.nn.Module:
    return open_clip.create_model(arch, pretrained=None)


def share(name: str, arch: str, **hp) -> tuple[int, float]:
    model = vit_b(arch)
    embed_dim = model.text_projection.shape[1]
    ctx = TaskContext(model=model, class_tokens=torch.zeros(2, 1, 77, dtype=torch.long),
                      zeroshot_head=torch.nn.functional.normalize(torch.randn(2, embed_dim), dim=-1),
                      device=torch.device("cpu"))
    method = METHODS[name](METHODS[name].Hparams(**hp), ctx)
    method.setup()
    try:
        _, params = build_optimizer(method, torch.device("cpu"))  # what the trainer counts
        trainable = count_params(params)
        total = count_params(model.parameters())
        print(f"{name} {hp or ''} on {arch}: {trainable:,} trainable of {total:,} = {100 * trainable / total:.2f} %")
        return trainable, trainable / total
    finally:
        if hasattr(method, "remove_adapters"):  # the cached model is shared between tests
            method.remove_adapters()
        model.requires_grad_(True)


@slow
@pytest.mark.parametrize("arch", ["ViT-B-16", "ViT-B-32"])
def test_radapter_full_rank_share(arch):
    trainable, frac = share("radapter", arch, rank=0)
    # 24·768² + 24·512² adapter maps plus one σ per adapter
    assert trainable == 24 * 768**2 + 24 * 512**2 + 48
    assert 0.13 <= frac <= 0.14


@slow
def test_radapter_low_rank_is_small():
    trainable, frac = share("radapter", "ViT-B-32", rank=16)
    assert trainable == 24 * 2 * 16 * 768 + 24 * 2 * 16 * 512 + 48
    assert frac < 0.01


@slow
def test_aclip_share_vit_b32():
    trainable, frac = share("aclip", "ViT-B-32")
    assert trainable == 12 * 3 * 768**2 + 12 * 3 * 512**2  # ≈ 30.7 M
    assert frac == pytest.approx(0.20, abs=0.01)


@slow
def test_other_peft_shares_vit_b32():
    bitfit, _ = share("bitfit", "ViT-B-32")
    lora, _ = share("lora", "ViT-B-32")
    adapter, _ = share("clip_adapter", "ViT-B-32")
    # per block: in_proj 3d, out_proj d, c_fc 4d, c_proj d, ln_1 d, ln_2 d = 11d biases
    assert bitfit == 12 * 11 * 768 + 12 * 11 * 512
    assert lora == 12 * 4 * 8 * 768 + 12 * 4 * 8 * 512  # rank 8: A and B for Q and V
    assert adapter == 2 * 512 * 128  # 512 -> 128 -> 512, no biases


# ---- LoRA ---------------------------------------------------------------------------------


def _lora(**hp) -> LoRA:
    method = LoRA(LoRAHparams(**hp), mf.context())
    method.setup()
    return method


def test_lora_at_zero_update_is_the_base_model_and_removable():
    model = mf.fresh_model()
    model.requires_grad_(False)
    x, tok = mf.images(3), mf.class_tokens()[:, 0]
    with torch.no_grad():
        before = (model.encode_image(x), model.encode_text(tok))
    method = LoRA(LoRAHparams(), mf.context(model))
    method.setup()
    with torch.no_grad():
        during = (model.encode_image(x), model.encode_text(tok))
    method.remove_adapters()
    assert not any("forward" in m.__dict__ for m in model.modules())
    for a, b in zip(before, during):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lora_live_equals_merged_and_alpha_scales_the_update():
    method = _lora(rank=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in method.extra["lora"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = method.trained_state()
    assert all(k.startswith("extra.lora.") for k in state)
    live = method.live_eval_model().eval()
    zs = mf.zeroshot_head(mf.fresh_model())
    merged = LoRA.eval_model(mf.fresh_model(), state, method.hp, zs, alpha=1.0).eval()
    x, tok = mf.images(3, seed=1), mf.class_tokens()[:, 1]
    with torch.no_grad():
        for f in ("encode_image", "encode_text"):
            arg = x if f == "encode_image" else tok
            torch.testing.assert_close(getattr(merged, f)(arg), getattr(live, f)(arg), rtol=1e-5, atol=1e-5)
    half = LoRA.eval_model(mf.fresh_model(), state, method.hp, zs, alpha=0.5).model.state_dict()
    full = merged.model.state_dict()
    pre = mf.fresh_model().state_dict()
    for k in pre:
        if k.endswith("attn.in_proj_weight"):
            d = pre[k].shape[1]
            torch.testing.assert_close(half[k] - pre[k], 0.5 * (full[k] - pre[k]), rtol=1e-4, atol=1e-6)
            assert torch.equal(full[k][d:2 * d], pre[k][d:2 * d])  # K untouched
            assert not torch.equal(full[k][:d], pre[k][:d])
        else:
            assert torch.equal(full[k], pre[k]), k


# ---- CLIP-Adapter -------------------------------------------------------------------------


def test_clip_adapter_alpha_scales_the_mix():
    method = CLIPAdapter(CLIPAdapterHparams(ratio=0.2), mf.context())
    method.setup()
    state = method.trained_state()
    zs = mf.zeroshot_head(mf.fresh_model())
    model = mf.fresh_model()
    x = mf.images(3, seed=2)
    with torch.no_grad():
        raw = model.encode_image(x)
        a = method.extra["adapter"](raw)
        for alpha in (0.0, 0.5, 1.0):
            ev = CLIPAdapter.eval_model(mf.fresh_model(), state, method.hp, zs, alpha=alpha)
            r = 0.2 * alpha
            want = torch.nn.functional.normalize(r * a + (1 - r) * raw, dim=-1)
            torch.testing.assert_close(ev.encode_image(x), want, rtol=1e-5, atol=1e-6)
