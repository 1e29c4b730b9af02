"""CoOp and CoCoOp against independent implementations written here, on the tiny real open_clip
CLIP: the prompt built the CoOp code's way ([SOT] + context + the frozen embeddings of the
class name, "." and [EOT], concatenated, through the text transformer and pooled at the EOT
token), CoCoOp's meta-net shift added to every context vector per image, the chunked
checkpointed path equal to one forward (loss and gradients), the trainable-parameter
contract, and the fp32 loss under bf16 autocast."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

import pipeline  # noqa: F401
from pipeline.methods import METHODS
from pipeline.methods.cocoop import conditioned_features, conditioned_logits
from pipeline.methods.coop import prompt_head, prompt_tokens
from pipeline.training.train import fit
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)


def tokenizer():
    return open_clip.get_tokenizer(mf.register_tiny())


def reference_text(model, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The CoOp code's TextEncoder on open_clip's CLIP: prompt embeddings + positions, the
    causal transformer, ln_final, the EOT (argmax) position, the projection; normalised."""
    x = embeddings + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)  # batch-first in open_clip 3
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


def reference_prompts(model, ctx: torch.Tensor, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [C, L, w], tokens [C, L]) the CoOp code's way: the token embeddings of
    "<prefix> <name>." with rows 1 … M replaced by the context (prefix = SOT row, suffix =
    the rows after the context)."""
    tokens = tokenizer()([f"{prefix} {c}." for c in mf.CLASSES])
    emb = model.token_embedding(tokens)
    m = ctx.shape[-2]
    ctx = ctx if ctx.dim() == 3 else ctx.expand(len(mf.CLASSES), -1, -1)
    return torch.cat([emb[:, :1], ctx, emb[:, 1 + m:]], dim=1), tokens


def method(name: str, seed: int = 0, **hp):
    cls = METHODS[name]
    ctx = mf.context(mf.fresh_model(), seed=seed)
    m = cls(cls.Hparams(**hp), ctx)
    m.setup()
    return m


def test_prompt_tokens_place_the_context_after_sot():
    tokens, start, m = prompt_tokens(tokenizer(), mf.CLASSES, "X X X")
    assert (start, m) == (1, 3)
    assert torch.equal(tokens, tokenizer()([f"X X X {c}." for c in mf.CLASSES]))
    x = tokenizer()(["X"])[0, 1]
    assert (tokens[:, 1:4] == x).all() and (tokens[:, 4] != x).all()
    with pytest.raises(ValueError, match="does not fit the text tower.s 16-token context"):
        method("coop")  # the tiny tower's 16 positions: SOT + 16 + name + EOT do not fit


@pytest.mark.parametrize("csc", [False, True])
def test_coop_head_is_the_spliced_prompt_pooled_at_eot(csc):
    m = method("coop", n_ctx=4, csc=csc)
    prompt = m.extra["prompt"]
    with torch.no_grad():
        prompt.ctx.add_(0.3 * torch.randn(prompt.ctx.shape, generator=torch.Generator().manual_seed(1)))
        want = reference_text(m.ctx.model, *reference_prompts(m.ctx.model, prompt.ctx, "X X X X"))
        got = prompt_head(m.ctx.model, prompt)
    assert prompt.ctx.shape == ((3, 4, 32) if csc else (4, 32))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the context matters (a splice at the wrong rows, or none, would not see it)
    with torch.no_grad():
        plain = reference_text(m.ctx.model, m.ctx.model.token_embedding(prompt.tokens), prompt.tokens)
    assert (got - plain).abs().max() > 1e-3
    # the loss: CE of s·f·gᵀ with the frozen scale
    batch = {k: torch.stack([m.ctx.train_set[i][k] for i in range(6)]) for k in ("image", "y")}
    with torch.no_grad():
        f = F.normalize(m.ctx.model.encode_image(batch["image"]), dim=-1)
        ref = F.cross_entropy(m.ctx.model.logit_scale.exp() * f @ want.t(), batch["y"])
        torch.testing.assert_close(m.loss(batch, 0)["ce_loss"], ref, rtol=1e-5, atol=1e-6)


def test_coop_init_from_words_is_their_token_embeddings():
    m = method("coop", n_ctx=4, ctx_init="a photo of a")
    prompt = m.extra["prompt"]
    tok = tokenizer()(["a photo of a"])
    torch.testing.assert_close(prompt.ctx, m.ctx.model.token_embedding(tok)[0, 1:5], rtol=0, atol=0)
    assert torch.equal(prompt.tokens, tokenizer()([f"a photo of a {c}." for c in mf.CLASSES]))
    # at init the head is the zero-shot head of the template "a photo of a {c}."
    with torch.no_grad():
        want = F.normalize(m.ctx.model.encode_text(prompt.tokens), dim=-1)
        torch.testing.assert_close(prompt_head(m.ctx.model, prompt), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="n_ctx: 3, but ctx_init 'a photo of a' is 4 tokens"):
        method("coop", n_ctx=3, ctx_init="a photo of a")
    with pytest.raises(ValueError, match="csc"):
        METHODS["coop"].Hparams(csc=True, ctx_init="a photo of a")


def test_cocoop_shift_is_added_to_every_context_vector_per_image():
    m = method("cocoop")
    prompt, net = m.extra["prompt"], m.extra["meta_net"]
    model = m.ctx.model
    assert prompt.ctx.shape == (4, 32)  # "a photo of a"
    assert (net.linear1.in_features, net.linear1.out_features, net.linear2.out_features) == (24, 1, 32)
    with torch.no_grad():
        for p in net.parameters():  # away from the init, so that the shift is large
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        f = F.normalize(model.encode_image(mf.images(3, seed=5)), dim=-1)
        # π(f) written out: Linear → ReLU → Linear
        shift = torch.relu(f @ net.linear1.weight.t() + net.linear1.bias) @ net.linear2.weight.t() + net.linear2.bias
        want = []
        for b in range(3):
            emb, tokens = reference_prompts(model, prompt.ctx + shift[b], "a photo of a")
            text = reference_text(model, emb, tokens)
            want.append(model.logit_scale.exp() * f[b] @ text.t())
        want = torch.stack(want)
        text = conditioned_features(model, prompt, net, f)
        got = conditioned_logits(f, text, model.logit_scale.exp())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # each image's prompts differ (a shift shared by the batch, or none, would not)
        assert (text[0] - text[1]).abs().max() > 1e-3
        # the evaluation head computes the same logits from the image features
        ev = m.live_eval_model()
        torch.testing.assert_close(ev.task_head(mf.class_tokens())(f), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,hp", [("coop", {"n_ctx": 4}), ("coop", {"n_ctx": 2, "csc": True}), ("cocoop", {})])
def test_chunked_checkpointed_path_equals_one_forward(name, hp):
    """Chunks of one prompt under checkpointing (a 1-byte budget) give the loss and the
    gradients of one forward over every prompt (in float64: only summation order differs)."""
    out = {}
    for budget in (None, 1):
        m = method(name, **hp)
        m.ctx.model.double()
        m.extra.double()
        m.ctx.prompt_memory_bytes = budget
        batch = {k: torch.stack([m.ctx.train_set[i][k] for i in range(4)]) for k in ("image", "y")}
        batch["image"] = batch["image"].double()
        loss = m.loss(batch, 0)["ce_loss"]
        loss.backward()
        out[budget] = (loss.detach(), {n: p.grad.clone() for n, p in m.extra.named_parameters()})
    torch.testing.assert_close(out[1][0], out[None][0], rtol=1e-12, atol=1e-12)
    assert set(out[1][1]) == set(out[None][1])
    for n, g in out[None][1].items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(out[1][1][n], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,hp,trained", [("coop", {"n_ctx": 4}, {"prompt.ctx"}),
                                             ("cocoop", {}, {"prompt.ctx", "meta_net.linear1.weight",
                                                             "meta_net.linear1.bias", "meta_net.linear2.weight",
                                                             "meta_net.linear2.bias"})])
def test_only_the_context_and_meta_net_train(name, hp, trained):
    cls = METHODS[name]
    model = mf.fresh_model()
    ctx = mf.context(model)
    m = cls(cls.Hparams(lr=0.5, **hp), ctx)
    before = mf.snapshot(model)
    m.setup()
    start = {n: p.detach().clone() for n, p in m.extra.named_parameters()}
    buffers = {n: b.clone() for n, b in m.extra.named_buffers()}
    fit(m, ctx.train_set, steps=2, batch_size=6, seed=0, device=torch.device("cpu"), progress=False)
    after = mf.snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {n for n, p in m.extra.named_parameters() if p.requires_grad} == trained
    assert {n for n, p in m.extra.named_parameters() if not torch.equal(p, start[n])} == trained
    assert all(torch.equal(b, buffers[n]) for n, b in m.extra.named_buffers())  # tokens, start
    assert set(m.trained_state()) == {f"extra.{n}" for n in trained} | {"extra.prompt.tokens", "extra.prompt.start"}


@pytest.mark.parametrize("name,hp", [("coop", {"n_ctx": 4}), ("cocoop", {})])
def test_loss_is_fp32_under_bf16_autocast(name, hp):
    m = method(name, **hp)
    batch = {k: torch.stack([m.ctx.train_set[i][k] for i in range(4)]) for k in ("image", "y")}
    ref = m.loss(batch, 0)["ce_loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.loss(batch, 0)["ce_loss"]
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())  # bf16 forwards, not a different loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
               for p in m.extra.parameters())


def test_refuses_a_text_tower_without_token_embedding():
    class NoTokens(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="cocoop splices learned context vectors.*NoTokens"):
        METHODS["cocoop"].check_model(NoTokens())


def test_a_prompt_cut_by_the_context_length_is_refused():
    # the tiny tower has 16 positions: SOT + 12 context + "circle" + "." + EOT = 16 fits exactly
    tokens, _, _ = prompt_tokens(tokenizer(), mf.CLASSES, " ".join(["X"] * 12))
    assert (tokens[:, -1] == tokenizer()([""])[0, 1]).all()  # the EOT in the last position
    with pytest.raises(ValueError, match="the prompt '(X ){13}circle.' does not fit the text tower's 16-token"):
        prompt_tokens(tokenizer(), mf.CLASSES, " ".join(["X"] * 13))
    m = method("cocoop")
    with pytest.raises(ValueError, match="n_ctx: 3, but ctx_init 'a photo of a' is 4 tokens"):
        METHODS["cocoop"].check_task(METHODS["cocoop"].Hparams(n_ctx=3), m.ctx.model, tokenizer(), mf.CLASSES)
    METHODS["cocoop"].check_task(METHODS["cocoop"].Hparams(), m.ctx.model, tokenizer(), mf.CLASSES)
