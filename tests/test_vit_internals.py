"""The methods that edit open_clip's ViT internals (issue 29): MaPLe, VPT-deep, AdaptFormer.

Each construction against an independent forward written here (the towers' layers called one
by one, the prompts and the branch placed by hand), on a real open_clip CLIP with random
weights and towers of different widths and depths (image 48 wide, text 32; 3 layers each, so
that a prompt depth below the tower's leaves layers untouched); the trainable-parameter
contract (only the new parameters move, the CLIP bit-identical); the refusal of non-ViT
towers in `check_model` and in the check stage. The registry-wide contract and checkpoint
round trip are in tests/test_methods.py, the families in tests/test_families.py, bf16 in
tests/test_fewshot_baselines.py, DDP in tests/test_ddp.py."""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import pipeline  # noqa: F401  (first, as everywhere)
import open_clip
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import METHODS
from pipeline.methods.adaptformer import AdaptFormer, AdaptFormerHparams
from pipeline.methods.maple import MaPLe, MaPLeHparams, first_template
from pipeline.methods.vpt_deep import VPTDeep, VPTDeepHparams
from pipeline.training.train import fit
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

CPU = torch.device("cpu")
DEEP = "vit-internals-test-3layer"
RESNET = "vit-internals-test-resnet"
CONFIGS = {
    DEEP: {"embed_dim": 24,
           "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 24, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}},
    RESNET: {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
}
NAMES = ("maple", "vpt_deep", "adaptformer")


@functools.cache
def _register() -> None:
    folder = Path(tempfile.mkdtemp(prefix="vit-internals-configs-"))
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)


def deep_model(seed: int = 7) -> torch.nn.Module:
    _register()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(DEEP, pretrained=None).eval()


def context(model):
    ctx = mf.context(model)
    ctx.zeroshot_head = mf.zeroshot_head(model)
    return ctx


# ---- the towers written out ------------------------------------------------------------------


def ln(norm, x):
    """A LayerNorm module's function, without calling the module (whose hooks the methods use)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def block(blk, x, mask=None):
    """One residual block, batch first: x + Attn(LN₁ x), then + MLP(LN₂ ·)."""
    h = ln(blk.ln_1, x)
    x = x + blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    return x + blk.mlp(ln(blk.ln_2, x))


def image_forward(visual, images, prompts=None, branch=None):
    """The ViT image tower step by step. `prompts` [J, M, d]: appended before ln_pre (layer 1),
    written over the last M tokens of block j's input (j < J); `branch(j, x')` added beside
    block j's MLP. Pooled at the class token."""
    n = images.shape[0]
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(n, -1, -1), x], 1) + visual.positional_embedding
    m = 0
    if prompts is not None:
        m = prompts.shape[1]
        x = torch.cat([x, prompts[0].expand(n, -1, -1)], 1)
    x = ln(visual.ln_pre, x)
    for j, blk in enumerate(visual.transformer.resblocks):
        if prompts is not None and 1 <= j < prompts.shape[0]:
            x = torch.cat([x[:, :-m], prompts[j].expand(n, -1, -1)], 1)
        if branch is None:
            x = block(blk, x)
        else:
            h = ln(blk.ln_1, x)
            x1 = x + blk.attn(h, h, h, need_weights=False)[0]
            x = x1 + blk.mlp(ln(blk.ln_2, x1)) + branch(j, x1)
    return ln(visual.ln_post, x[:, 0]) @ visual.proj


def text_forward(model, tokens, prompts):
    """The CLIP text tower step by step with the text prompts [J, M, d_t] at positions 1..M:
    over the token embeddings (before the positional embedding), then over block j's input."""
    m = prompts.shape[1]
    x = F.embedding(tokens, model.token_embedding.weight)
    x = torch.cat([x[:, :1], prompts[0].expand(x.shape[0], -1, -1), x[:, 1 + m:]], 1)
    x = x + model.positional_embedding
    for j, blk in enumerate(model.transformer.resblocks):
        if 1 <= j < prompts.shape[0]:
            x = torch.cat([x[:, :1], prompts[j].expand(x.shape[0], -1, -1), x[:, 1 + m:]], 1)
        x = block(blk, x, model.attn_mask)
    x = ln(model.ln_final, x)
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ model.text_projection


def block_inputs(blocks):
    """Forward pre-hooks recording each block's input; returns (records, handles)."""
    seen: dict[int, torch.Tensor] = {}

    def rec(j):
        def hook(module, args, kwargs):
            seen[j] = args[0].detach().clone()
        return hook

    return seen, [b.register_forward_pre_hook(rec(j), with_kwargs=True) for j, b in enumerate(blocks)]


# ---- VPT-deep -------------------------------------------------------------------------------


@pytest.mark.parametrize("depth,n_ctx", [(0, 3), (2, 4), (1, 2)])
def test_vpt_prompts_replace_the_tokens_of_the_first_j_layers(depth, n_ctx):
    model = deep_model()
    method = VPTDeep(VPTDeepHparams(depth=depth, n_ctx=n_ctx), context(model))
    method.setup()
    prompts = method.extra["vpt"].prompts
    j_layers = 3 if depth == 0 else depth
    assert prompts.shape == (j_layers, n_ctx, 48)  # the image tower's width, not the text's
    with torch.no_grad():
        prompts.normal_()  # well away from the N(0, 0.02²) init: a mix-up shows
    x = mf.images(4, seed=2)
    seen, handles = block_inputs(model.visual.transformer.resblocks)
    with torch.no_grad():
        got = model.encode_image(x)
        want = image_forward(model.visual, x, prompts)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    n_image = 1 + (32 // 8) ** 2
    for j in range(3):
        assert seen[j].shape == (4, n_image + n_ctx, 48)
        tail = seen[j][:, n_image:]
        if 1 <= j < j_layers:  # replaced by layer j's own tokens
            torch.testing.assert_close(tail, prompts[j].detach().expand(4, -1, -1), rtol=0, atol=0)
        elif j >= j_layers:  # untouched: the previous block's outputs there
            assert not torch.allclose(tail, prompts[min(j, j_layers - 1)].detach().expand(4, -1, -1), atol=1e-3)
    # without the hooks, the pre-trained tower
    method.remove_adapters()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), image_forward(model.visual, x), rtol=1e-5, atol=1e-5)


# ---- MaPLe ----------------------------------------------------------------------------------


def _randomise(prompts, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prompts.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("depth,n_ctx", [(2, 2), (9, 2), (1, 3)])
def test_maple_couples_vision_prompts_to_text_prompts_per_layer(depth, n_ctx):
    model = deep_model()
    ctx = context(model)
    method = MaPLe(MaPLeHparams(depth=depth, n_ctx=n_ctx), ctx)
    method.setup()
    mp = method.extra["maple"]
    j_layers = min(depth, 3)
    assert mp.depth == j_layers and mp.ctx.shape == (n_ctx, 32)
    assert all(c.weight.shape == (48, 32) for c in mp.couple)  # text width → image width, from the model
    # layer 1's context starts as the embeddings of the template's first words ("a photo")
    torch.testing.assert_close(mp.ctx.detach(), model.token_embedding.weight[ctx.class_tokens[0, 0, 1:1 + n_ctx]],
                               rtol=0, atol=0)
    # layers 2..J's couplings start as copies of one Linear (their `_get_clones`)
    for c in mp.couple[2:]:
        assert torch.equal(c.weight, mp.couple[1].weight) and torch.equal(c.bias, mp.couple[1].bias)
    _randomise(mp)
    text_p = torch.stack([mp.ctx] + list(mp.deep)).detach()  # [J, M, 32]
    # the coupling computed here: P_v^j = P_t^j W_jᵀ + b_j
    vis_p = torch.stack([text_p[j] @ mp.couple[j].weight.detach().t() + mp.couple[j].bias.detach()
                         for j in range(j_layers)])
    x = mf.images(3, seed=4)
    tokens = first_template(ctx.class_tokens, n_ctx)[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), image_forward(model.visual, x, vis_p), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), text_forward(model, tokens, text_p), rtol=1e-5, atol=1e-5)
        # the loss: cross-entropy of s·f·gᵀ over the class prompts, written out
        batch = {"image": x, "y": torch.tensor([2, 0, 1])}
        got = method.loss(batch, 0)["ce_loss"]
        f = F.normalize(image_forward(model.visual, x, vis_p), dim=-1)
        g = F.normalize(text_forward(model, tokens, text_p), dim=-1)
        want = F.cross_entropy(model.logit_scale.exp() * f @ g.t(), batch["y"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    method.remove_adapters()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), image_forward(model.visual, x), rtol=1e-5, atol=1e-5)


def test_maple_text_prompts_per_layer_and_untouched_after_j():
    model = deep_model()
    method = MaPLe(MaPLeHparams(depth=2, n_ctx=2), context(model))
    method.setup()
    mp = method.extra["maple"]
    _randomise(mp, seed=3)
    tokens = mf.class_tokens()[:, 0]
    seen, handles = block_inputs(model.transformer.resblocks)
    with torch.no_grad():
        model.encode_text(tokens)
    for h in handles:
        h.remove()
    with torch.no_grad():
        want0 = mp.ctx + model.positional_embedding[1:3]  # layer 1: context + positional embedding
    torch.testing.assert_close(seen[0][:, 1:3], want0.expand(3, -1, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[1][:, 1:3], mp.deep[0].detach().expand(3, -1, -1), rtol=0, atol=0)
    # J = 2: block 2 gets block 1's outputs there, not a prompt
    assert not torch.allclose(seen[2][:, 1:3], mp.deep[0].detach().expand(3, -1, -1), atol=1e-3)
    # the start token and the class words are the model's own
    with torch.no_grad():
        plain = F.embedding(tokens, model.token_embedding.weight) + model.positional_embedding
    torch.testing.assert_close(seen[0][:, 3:], plain[:, 3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[0][:, 0], plain[:, 0], rtol=0, atol=1e-6)


def test_maple_refuses_a_first_template_that_starts_with_the_class_name():
    tok = open_clip.get_tokenizer(mf.register_tiny())
    from pipeline.models.zeroshot import tokenize_prompts

    bad = tokenize_prompts(tok, [[f"{c} in the wild.", f"a photo of a {c}."] for c in mf.CLASSES])
    with pytest.raises(ValueError, match=r"^maple: the first template .* n_ctx = 2 .* this one has 0"):
        first_template(bad, 2)
    good = tokenize_prompts(tok, [[f"a photo of {c}.", f"{c} in the wild."] for c in mf.CLASSES])
    assert first_template(good, 2).shape == (3, 1, good.shape[2])
    assert first_template(good, 3).shape == (3, 1, good.shape[2])
    with pytest.raises(ValueError, match="n_ctx = 4 .* this one has 3"):  # "a photo of {c}": 3 shared words
        first_template(good, 4)
    ctx = mf.context()
    ctx.class_tokens = bad
    method = MaPLe(MaPLeHparams(), ctx)
    with pytest.raises(ValueError, match="^maple: the first template"):
        method.setup()  # before any training step


# ---- AdaptFormer ----------------------------------------------------------------------------


@pytest.mark.parametrize("train_mode", [False, True])
def test_adaptformer_starts_as_the_pretrained_forward(train_mode):
    model = deep_model()
    x = mf.images(4, seed=5)
    with torch.no_grad():
        pre = model.encode_image(x)
    method = AdaptFormer(AdaptFormerHparams(), context(model))
    method.setup()
    method.root.train(train_mode)  # dropout on: the zero Up still gives a zero branch
    with torch.no_grad():
        got = model.encode_image(x)
    torch.testing.assert_close(got, pre, rtol=0, atol=1e-6)
    for a in method.extra["adapters"]:
        assert a.down.weight.shape == (64, 48) and a.up.weight.shape == (48, 64)  # width from the model
        assert not a.up.weight.any() and not a.up.bias.any() and not a.down.bias.any()
        assert a.down.weight.abs().max() <= 1 / math.sqrt(48) + 1e-7 and a.down.weight.std() > 0  # Kaiming(√5)


def test_adaptformer_branch_sits_beside_the_mlp_on_the_unnormalised_input():
    model = deep_model()
    hp = AdaptFormerHparams(bottleneck=5, scale=0.3)
    method = AdaptFormer(hp, context(model))
    method.setup()
    adapters = method.extra["adapters"]
    _randomise(adapters, seed=1)
    model.eval()

    def branch(j, x1):  # s · Up(ReLU(Down x')) on the block's x' = x + Attn(LN₁ x)
        a = adapters[j]
        return 0.3 * (F.relu(x1 @ a.down.weight.t() + a.down.bias) @ a.up.weight.t() + a.up.bias)

    x = mf.images(3, seed=6)
    with torch.no_grad():
        got = model.encode_image(x)
        torch.testing.assert_close(got, image_forward(model.visual, x, branch=branch), rtol=1e-5, atol=1e-5)
        # the other placements give something else (the check can fail)
        blocks = model.visual.transformer.resblocks
        on_ln2 = image_forward(model.visual, x, branch=lambda j, x1: branch(j, ln(blocks[j].ln_2, x1)))
        assert not torch.allclose(got, on_ln2, atol=1e-3)
        # α scales s at evaluation; α = 0 is the pre-trained tower with no hook at all
        state = method.trained_state()
        half = AdaptFormer.eval_model(deep_model(), state, hp, mf.zeroshot_head(model), alpha=0.5).eval()
        want = image_forward(model.visual, x, branch=lambda j, x1: 0.5 * branch(j, x1))
        torch.testing.assert_close(half.encode_image(x), F.normalize(want, dim=-1), rtol=1e-5, atol=1e-5)


def test_adaptformer_dropout_is_per_element_in_training_only():
    model = deep_model()
    method = AdaptFormer(AdaptFormerHparams(dropout=0.5), context(model))
    method.setup()
    _randomise(method.extra["adapters"], seed=2)
    x = mf.images(2, seed=1)
    with torch.no_grad():
        model.eval()
        a, b = model.encode_image(x), model.encode_image(x)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c = model.encode_image(x)
        torch.manual_seed(1)
        d = model.encode_image(x)
    assert not torch.allclose(c, d) and not torch.allclose(a, c)


# ---- the trainable-parameter contract -------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_only_the_new_parameters_train(name):
    cls = METHODS[name]
    model = deep_model()
    before = mf.snapshot(model)
    method = cls(cls.Hparams(lr=0.05, warmup_steps=0), context(model))
    method.setup()
    start = {n: p.detach().clone() for n, p in method.extra.named_parameters()}
    result = fit(method, method.ctx.train_set, steps=3, batch_size=6, seed=0, device=CPU, progress=False)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    after = mf.snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "a CLIP parameter moved"
    moved = {n for n, p in method.extra.named_parameters() if not torch.equal(start[n], p.detach())}
    assert moved == set(start), f"did not train: {sorted(set(start) - moved)}"
    assert result.trainable_params == sum(p.numel() for p in start.values())
    assert {n for n, p in method.root.named_parameters() if p.requires_grad} == {f"extra.{n}" for n in start}
    assert set(method.trained_state()) == {f"extra.{n}" for n in start}


# ---- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_resnet_image_tower_is_refused_naming_it(name):
    _register()
    model = open_clip.create_model(RESNET, pretrained=None)
    cls = METHODS[name]
    with pytest.raises(ValueError, match=rf"^{name} .*this model's image tower is ModifiedResNet\. Allowed: "):
        cls.check_model(model)
    with pytest.raises(ValueError, match=f"^{name} "):
        cls(cls.Hparams(), mf.context(model))


def test_check_stage_refuses_them_on_a_timm_tower(tmp_path):
    from pipeline.stages.check import check_params
    from tests.test_families import _params

    for name in NAMES:
        with pytest.raises(ValueError, match=rf"^{name} .* image tower is TimmModel \(timm Eva\)"):
            check_params(_params(tmp_path, "tiny-eva02", ["lp", name]))
    params = check_params(_params(tmp_path, "tiny-clip", ["lp", *NAMES]))
    assert list(params.finetune.methods) == ["lp", *NAMES]
