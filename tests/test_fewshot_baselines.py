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
    with pytest.raises(ValueError, match="head_templates"):  # one fixed template: the knob does not apply
        CLIPLoRAHparams(head_templates=0)


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


# ---- LP++ ---------------------------------------------------------------------------------

from pipeline.methods.lp_pp import (BlockSGD, LPPlusPlus, LPPPHparams, blended_logits,  # noqa: E402
                                    class_sums, init_alpha, lp_pp_loss, step_alpha, step_w)

SHAPES = [(6, 3, 4), (20, 5, 16), (33, 7, 32)]  # (N, C, D)


def _support(n, c, d, seed):
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    y = torch.arange(n) % c  # every class present
    y = y[torch.randperm(n, generator=g)]
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    return f, y, text, g


@pytest.mark.parametrize("n,c,d", SHAPES)
def test_lp_pp_logits_init_and_step_sizes(n, c, d):
    f, y, text, g = _support(n, c, d, n + c + d)
    w, b, alpha = torch.randn(c, d, generator=g), torch.randn(c, generator=g), torch.rand(c, generator=g) * 5
    expected = torch.empty(n, c)
    for i in range(n):
        for k in range(c):
            expected[i, k] = float((w[k] * f[i]).sum() + b[k] + alpha[k] * (f[i] * text[k]).sum())
    torch.testing.assert_close(blended_logits(f, w, b, alpha, text), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(blended_logits(f, w, None, alpha, text), expected - b, rtol=0, atol=1e-5)
    torch.testing.assert_close(lp_pp_loss(f, w, b, alpha, text, y), F.cross_entropy(expected, y), rtol=0, atol=1e-5)
    # W init: per-class sums (shots × centroid), not means
    sums = torch.stack([f[y == k].sum(0) for k in range(c)])
    torch.testing.assert_close(class_sums(f, y, c), sums, rtol=0, atol=1e-5)
    # α init: 250 · mean over classes of (mean over the class's own samples of f·t_c)
    per_class = [float((f[y == k] @ text[k]).mean()) for k in range(c)]
    assert float(init_alpha(f, y, text, 250.0)) == pytest.approx(250 * sum(per_class) / c, abs=1e-5)
    # step sizes: 4N/λ_max(FᵀF) (numpy's eigh, independent) and N/(4·max_c Σ_i (f_i·t_c)²)
    import numpy as np

    fn = f.double().numpy()
    lam = np.linalg.eigh(fn.T @ fn)[0].max()
    assert step_w(f) == pytest.approx(4 * n / lam, rel=1e-9)
    col = [sum(float(f[i].double() @ text[k].double()) ** 2 for i in range(n)) for k in range(c)]
    assert step_alpha(f, text) == pytest.approx(n / (4 * max(col)), rel=1e-9)


def test_lp_pp_refuses_knobs_its_optimiser_ignores():
    for bad in ({"weight_decay": 0.1}, {"warmup_steps": 3}, {"alpha_every": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LPPPHparams(**bad)


def test_lp_pp_alpha_init_skips_absent_classes():
    f, y, text, _ = _support(12, 4, 8, 3)
    y = torch.where(y == 3, 0, y)  # class 3 has no support sample
    per_class = [float((f[y == k] @ text[k]).mean()) for k in range(3)]
    assert float(init_alpha(f, y, text, 1.0)) == pytest.approx(sum(per_class) / 3, abs=1e-6)


@pytest.mark.parametrize("every", [1, 3])
def test_block_sgd_matches_torch_sgd(every):
    """Momentum groups step as torch.optim.SGD; an `every` = k group steps on every k-th call
    only, with that call's gradient."""
    g = torch.Generator().manual_seed(every)
    p0, q0 = torch.randn(4, 3, generator=g), torch.randn(5, generator=g)
    p, q = nn.Parameter(p0.clone()), nn.Parameter(q0.clone())
    p_ref, q_ref = nn.Parameter(p0.clone()), q0.clone()
    ours = BlockSGD([{"params": [p], "lr": 0.1, "momentum": 0.9}, {"params": [q], "lr": 0.05, "every": every}])
    ref = torch.optim.SGD([p_ref], lr=0.1, momentum=0.9)
    for call in range(1, 8):
        gp, gq = torch.randn(4, 3, generator=g), torch.randn(5, generator=g)
        p.grad, q.grad, p_ref.grad = gp.clone(), gq.clone(), gp.clone()
        ours.step()
        ref.step()
        if call % every == 0:
            q_ref = q_ref - 0.05 * gq
        torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(q.detach(), q_ref, rtol=0, atol=1e-6)
    state = ours.state_dict()  # resumable: step counts and momentum in the state
    assert {"calls", "momentum_buffer"} <= set(state["state"][0])


def test_lp_pp_trains_as_the_written_out_full_batch_loop():
    """fit() on LP++ = the official procedure written out: full batch every step, W by SGD
    (momentum 0.9) at 4N/λ_max, α by a plain step every 10 epochs, no clipping, no schedule;
    the evaluated head is W + diag(α)·T."""
    from pipeline.training.train import fit

    ctx = mf.context()
    method = LPPlusPlus(LPPPHparams(), ctx)
    steps = 23
    fit(method, mf.train_items(with_images=False), steps=steps, batch_size=4, seed=0,
        device=torch.device("cpu"), progress=False)

    model = mf.fresh_model().eval()
    with torch.no_grad():
        feats = F.normalize(model.encode_image(torch.stack([it["image"] for it in mf.train_items()])), dim=-1)
    y = torch.stack([it["y"] for it in mf.train_items()])
    text = ctx.zeroshot_head.float()
    c = text.shape[0]
    w = nn.Parameter(torch.stack([feats[y == k].sum(0) for k in range(c)]))
    a0 = 250 * torch.stack([(feats[y == k] @ text[k]).mean() for k in range(c)]).mean()
    alpha = nn.Parameter(a0 * torch.ones(c))
    lr_w = 4 * len(y) / float(torch.linalg.eigvalsh(feats.double().t() @ feats.double()).max())
    lr_a = len(y) / float(4 * ((feats.double() @ text.double().t()) ** 2).sum(0).max())
    opt = torch.optim.SGD([w], lr=lr_w, momentum=0.9)
    for epoch in range(steps):
        opt.zero_grad()
        alpha.grad = None
        loss = F.cross_entropy(feats @ w.t() + alpha * (feats @ text.t()), y)
        loss.backward()
        opt.step()
        if (epoch + 1) % 10 == 0:
            with torch.no_grad():
                alpha -= lr_a * alpha.grad
    probe = method.extra["probe"]
    torch.testing.assert_close(probe.weight.detach(), w.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probe.alpha.detach(), alpha.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alpha.detach(), a0 * torch.ones(c))  # α did step (epochs 10 and 20)
    head = method.live_eval_model().task_head(mf.class_tokens())
    torch.testing.assert_close(feats @ head.t(), feats @ w.detach().t() + alpha.detach() * (feats @ text.t()),
                               rtol=0, atol=1e-5)


# ---- CLAP ---------------------------------------------------------------------------------

from pipeline.methods.clap import (CLAP, CLAPHparams, clap_logits, clap_loss, constraint,  # noqa: E402
                                   constraint_weights, raw_text_means)


@pytest.mark.parametrize("n,c,d", SHAPES)
def test_clap_logits_constraint_and_class_weights(n, c, d):
    g = torch.Generator().manual_seed(n * c)
    f = torch.randn(n, d, generator=g) * 3  # unnormalised on purpose
    w = torch.randn(c, d, generator=g) * 2
    anchors = torch.randn(c, d, generator=g) * 5
    y = (torch.arange(n) % c)[torch.randperm(n, generator=g)]
    s = 37.0
    expected = torch.empty(n, c)
    for i in range(n):
        fi = f[i] / math.sqrt(float((f[i] ** 2).sum()))
        for k in range(c):
            wk = w[k] / math.sqrt(float((w[k] ** 2).sum()))
            expected[i, k] = s * float((fi * wk).sum())
    torch.testing.assert_close(clap_logits(f, w, s), expected, rtol=0, atol=1e-4)
    lam = torch.rand(c, generator=g)
    reg = sum(float(lam[k]) * float(((w[k] - anchors[k]) ** 2).sum()) for k in range(c)) / c
    assert float(constraint(w, anchors, lam)) == pytest.approx(reg, rel=1e-5)
    ce, r = clap_loss(f, w, anchors, lam, y, s)
    torch.testing.assert_close(ce, F.cross_entropy(expected, y), rtol=0, atol=1e-5)
    assert float(r) == pytest.approx(reg, rel=1e-5)
    # λ_c: mean softmax probability of class c over the rows labelled c
    logits = torch.randn(n, c, generator=g) * 4
    weights = []
    for k in range(c):
        rows = [i for i in range(n) if int(y[i]) == k]
        probs = [math.exp(float(logits[i, k])) / sum(math.exp(float(v)) for v in logits[i]) for i in rows]
        weights.append(sum(probs) / len(probs))
    torch.testing.assert_close(constraint_weights(logits, y, c), torch.tensor(weights), rtol=0, atol=1e-5)
    # a class without rows is held fully (λ = 1)
    assert float(constraint_weights(logits, y, c + 1)[c]) == 1.0


def test_clap_text_anchors_are_unnormalised_template_means():
    model = mf.fresh_model().eval()
    tokens = mf.class_tokens()
    with torch.no_grad():
        per_template = torch.stack([model.encode_text(tokens[:, t]) for t in range(tokens.shape[1])], 1)
    anchors = raw_text_means(model, tokens, torch.device("cpu"), batch_size=3)
    torch.testing.assert_close(anchors, per_template.mean(1), rtol=0, atol=1e-5)
    assert not torch.allclose(anchors.norm(dim=-1), torch.ones(len(anchors)))


class _Augmented(torch.utils.data.Dataset):
    """Images with a fresh random shift per access (a stand-in for a random transform)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        item["image"] = item["image"] + 0.5 * torch.randn(item["image"].shape)
        return item

    def without_images(self):
        return mf.train_items(with_images=False)


def _clap(views=3, seed=0, rng_check=False):
    ctx = mf.context(seed=seed)
    ctx.train_set = _Augmented(ctx.train_set)
    method = CLAP(CLAPHparams(views=views), ctx)
    before = torch.get_rng_state()
    method.setup()
    if rng_check:  # the view draws leave the global RNG alone
        assert torch.equal(torch.get_rng_state(), before)
    return method


def test_clap_views_cached_once_seeded_and_loss_over_every_view():
    method = _clap(views=3, rng_check=True)
    feats = method.features
    v, n, d = feats.shape
    assert (v, n) == (3, 12)
    assert not torch.allclose(feats[0], feats[1])  # each view is its own augmentation draw
    torch.testing.assert_close(feats, _clap(views=3).features, rtol=0, atol=0)  # reproducible
    assert not torch.allclose(feats, _clap(views=3, seed=1).features)
    # λ from the zero-shot logits s·f̂·normalise(t̄)ᵀ over every view of every support sample
    y = method.labels
    zs = method.scale * feats.reshape(v * n, d) @ F.normalize(method.anchors, dim=-1).t()
    torch.testing.assert_close(method.weights, constraint_weights(zs, y.repeat(v), 3), rtol=0, atol=1e-5)
    # prototypes start at t̄; the loss of a batch covers all views of its samples
    torch.testing.assert_close(method.extra["prototypes"].weight.detach(), method.anchors, rtol=0, atol=0)
    with torch.no_grad():
        method.extra["prototypes"].weight.add_(0.3 * torch.randn(method.anchors.shape))
    idx = torch.tensor([4, 0, 7])
    terms = method.loss({"index": idx, "y": y[idx]}, 0)
    w = method.extra["prototypes"].weight.detach()
    rows = torch.cat([feats[k, idx] for k in range(v)])
    labels = torch.cat([y[idx]] * v)
    ce = F.cross_entropy(method.scale * F.normalize(rows, dim=-1) @ F.normalize(w, dim=-1).t(), labels)
    torch.testing.assert_close(terms["ce_loss"], ce, rtol=0, atol=1e-5)
    torch.testing.assert_close(terms["constraint_loss"], constraint(w, method.anchors, method.weights),
                               rtol=0, atol=1e-5)
    head = method.live_eval_model().task_head(mf.class_tokens())
    torch.testing.assert_close(head, method.scale * F.normalize(w, dim=-1), rtol=0, atol=1e-5)


def test_own_optimisers_schedule_only_groups_with_lr_scale():
    """Method.optimizer: CLAP's SGD group carries lr_scale, so the trainer runs its cosine
    schedule; LP++'s groups do not, so their data-driven step sizes stay fixed."""
    from pipeline.training.optim import scheduled_lr
    from pipeline.training.train import fit

    ctx = mf.context()
    ctx.train_set = _Augmented(ctx.train_set)
    clap = CLAP(CLAPHparams(views=2, lr=0.05, warmup_steps=1), ctx)
    res = fit(clap, mf.train_items(with_images=False), steps=4, batch_size=6, seed=0,
              device=torch.device("cpu"), progress=False)
    assert [h["lr"] for h in res.history] == pytest.approx([scheduled_lr(0.05, s, 4, 1) for s in range(4)])
    assert all("grad_norm" not in h for h in res.history)  # no clipping of a method's own optimiser
    lp = LPPlusPlus(LPPPHparams(), mf.context())
    res = fit(lp, mf.train_items(with_images=False), steps=3, batch_size=6, seed=0,
              device=torch.device("cpu"), progress=False)
    assert [h["lr"] for h in res.history] == pytest.approx([lp.steps[0]] * 3)


@pytest.mark.parametrize("name", ["clip_lora", "lp_pp", "clap", "maple", "vpt_deep", "adaptformer", "tip_adapter_f"])
def test_bf16_autocast_steps_are_finite_and_losses_fp32(name):
    """Under the trainer's bf16 autocast (CPU here): finite losses, computed in fp32 (the
    dropout attention path of clip_lora included; the prompts and adapters that the ViT
    methods put into bf16 residual streams)."""
    from pipeline.methods import METHODS
    from pipeline.training.train import fit

    cls = METHODS[name]
    ctx = mf.context()
    hp = cls.Hparams(**({"views": 2} if name in ("clap", "tip_adapter_f") else {}))
    method = cls(hp, ctx)
    train_set = ctx.train_set if cls.uses_images else mf.train_items(with_images=False)
    res = fit(method, train_set, steps=2, batch_size=6, seed=0, device=torch.device("cpu"),
              precision="bf16", progress=False)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    batch = {"image": mf.images(6), "y": torch.arange(6) % 3, "index": torch.arange(6)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.loss(batch, 0)
    assert all(t.dtype == torch.float32 for t in terms.values()), {k: t.dtype for k, t in terms.items()}


# ---- Tip-Adapter, Tip-Adapter-F -----------------------------------------------------------

from pipeline.methods.tip_adapter import (TipAdapter, TipClassifier, TipHparams, _view_seed,  # noqa: E402
                                          one_hot, search_grid, tip_logits)
from pipeline.methods.tip_adapter_f import TipAdapterF, TipFHparams, snapshot_steps, tip_f_loss  # noqa: E402


def _tip_reference(f, head, keys, labels, n_classes, alpha, beta):
    """Tip-Adapter's logits written out per image and class, in float64: s·f·h_c plus α times
    the sum, over the cache entries j of class c, of exp(−β (1 − f·k_j))."""
    f, head, keys = f.double(), head.double(), keys.double()
    out = torch.zeros(f.shape[0], n_classes, dtype=torch.float64)
    for i in range(f.shape[0]):
        for c in range(n_classes):
            cache = sum(math.exp(-beta * (1 - float(f[i] @ keys[j]))) for j in range(keys.shape[0]) if labels[j] == c)
            out[i, c] = float(f[i] @ head[c]) + alpha * cache
    return out


@pytest.mark.parametrize("n, m, c, d", [(1, 1, 1, 4), (5, 12, 3, 8), (7, 30, 10, 16)])
def test_tip_adapter_affinity_logits(n, m, c, d):
    g = torch.Generator().manual_seed(n * 100 + m)
    f = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    keys = F.normalize(torch.randn(m, d, generator=g), dim=-1)
    head = 5 * F.normalize(torch.randn(c, d, generator=g), dim=-1)  # the scaled zero-shot head
    labels = torch.randint(c, (m,), generator=g)
    values = one_hot(labels, c)
    assert values.shape == (m, c)  # a column per class, present or not
    for alpha, beta in [(1.17, 1.0), (0.1, 6.9), (2.5, 0.3)]:
        expected = _tip_reference(f, head, keys, labels, c, alpha, beta)
        torch.testing.assert_close(tip_logits(f, head, keys, values, alpha, beta).double(), expected,
                                   rtol=1e-5, atol=1e-5)
    # the classifier evaluation uses, at any setting and on new features (its memo of the last β)
    clf = TipClassifier(head, keys, values, {"alpha": 1.17, "beta": 1.0}, ())
    f2 = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    for feats, alpha, beta in [(f, 1.17, 1.0), (f, 0.5, 1.0), (f, 0.5, 3.0), (f2, 0.5, 3.0), (f, 0.5, 3.0)]:
        torch.testing.assert_close(clf.at(alpha=alpha, beta=beta)(feats).double(),
                                   _tip_reference(feats, head, keys, labels, c, alpha, beta), rtol=1e-5, atol=1e-5)
    # Tip-Adapter-F's loss: cross-entropy of the same logits
    y = torch.randint(c, (n,), generator=g)
    torch.testing.assert_close(tip_f_loss(f, head, keys, values, 1.17, 1.0, y).double(),
                               F.cross_entropy(_tip_reference(f, head, keys, labels, c, 1.17, 1.0), y),
                               rtol=1e-5, atol=1e-5)


def test_tip_adapter_grids_and_defaults():
    hp = TipHparams()
    assert (hp.views, hp.alpha, hp.beta) == (10, 1.17, 1.0)
    betas, alphas = search_grid(hp.beta_max, hp.beta_steps), search_grid(hp.alpha_max, hp.alpha_steps)
    assert len(betas) == 200 and len(alphas) == 20
    assert betas[0] == pytest.approx(0.1) and betas[-1] == pytest.approx(0.1 + 199 * 6.9 / 200)
    assert alphas[1] == pytest.approx(0.245) and max(alphas) < 3.0
    clf = TipAdapter.classifier(mf.fresh_model(), F.normalize(torch.randn(6, 24), dim=-1), torch.arange(6) % 3, hp,
                                mf.zeroshot_head(mf.fresh_model()))
    assert clf.setting == {"alpha": 1.17, "beta": 1.0}  # what the `none` protocol evaluates
    assert [list(s) for s in clf.search] == [["beta", "alpha"]]  # β outermost, as the code's search
    hf = TipFHparams()
    assert (hf.lr, hf.eps, hf.weight_decay, hf.epochs, hf.views) == (1e-3, 1e-4, 0.01, 20, 10)
    with pytest.raises(ValueError, match="beta_steps"):
        TipHparams(beta_steps=0)
    assert snapshot_steps(4, 3) == [2, 3, 4]
    assert snapshot_steps(2, 5) == [1, 1, 2, 2, 2]
    assert snapshot_steps(20, 20) == list(range(1, 21))


class _Counted(_Augmented):
    """_Augmented that counts its image accesses."""

    def __init__(self, base):
        super().__init__(base)
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def _tip(seed=0, views=10, cls=TipAdapter, **hp):
    ctx = mf.context(seed=seed)
    ctx.train_set = _Counted(ctx.train_set)
    method = cls((TipFHparams if cls is TipAdapterF else TipHparams)(views=views, **hp), ctx)
    return method, ctx


def test_tip_adapter_cache_is_the_mean_of_10_seeded_augmented_passes():
    method, ctx = _tip()
    before = torch.get_rng_state()
    method.setup()
    assert torch.equal(torch.get_rng_state(), before)  # the passes leave the global RNG alone
    n = len(ctx.train_set)
    assert ctx.train_set.reads == 10 * n  # 10 passes over the sample, each image once per pass
    keys = method.extra.cache_keys
    # independently: each pass seeded as the method's, the encoder's raw outputs averaged, then
    # normalised once
    model = mf.fresh_model()
    raw = []
    with torch.no_grad():
        for v in range(10):
            images = []
            for i in range(n):
                torch.manual_seed(_view_seed(0, v, i))
                images.append(ctx.train_set[i]["image"])
            x = torch.stack(images)
            raw.append(model.encode_image(x).float())
    raw = torch.stack(raw)
    torch.testing.assert_close(keys, F.normalize(raw.mean(0), dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(keys, F.normalize(F.normalize(raw, dim=-1).mean(0), dim=-1), atol=1e-4)
    assert not torch.allclose(raw[0], raw[1])  # each pass is its own augmentation draw
    assert torch.equal(method.extra.cache_labels, torch.arange(n) % 3)
    # deterministic: the same seed gives the same cache bit for bit, another seed another
    again, _ = _tip()
    again.setup()
    assert torch.equal(again.extra.cache_keys, keys)
    other, _ = _tip(seed=1)
    other.setup()
    assert not torch.allclose(other.extra.cache_keys, keys)
    # the evaluated model: the pre-trained towers, the cache classifier at the defaults
    state = method.trained_state()
    assert set(state) == {"extra.cache_keys", "extra.cache_labels"}
    ev = TipAdapter.eval_model(mf.fresh_model(), state, method.hp, ctx.zeroshot_head)
    f = ev.encode_image(mf.images(4, seed=9))
    s = model.logit_scale.exp()
    expected = _tip_reference(f, s * ctx.zeroshot_head, keys, method.extra.cache_labels, 3, 1.17, 1.0)
    torch.testing.assert_close(ev.task_head(mf.class_tokens())(f).double(), expected, rtol=1e-5, atol=1e-5)


def test_tip_adapter_f_trains_only_the_keys_and_snapshots_each_epoch():
    from pipeline.training.train import fit

    method, ctx = _tip(cls=TipAdapterF, views=2, epochs=3, lr=0.05)
    pre = mf.snapshot(ctx.model)
    seen = []
    step_hook = method.after_step

    def spy(step):
        step_hook(step)
        seen.append(method.extra["cache"].keys.detach().clone())

    method.after_step = spy
    fit(method, mf.train_items(with_images=False), steps=4, batch_size=6, seed=0, device=torch.device("cpu"),
        progress=False)
    assert all(torch.equal(pre[k], v) for k, v in mf.snapshot(ctx.model).items())  # CLIP bit-identical
    assert [n for n, p in method.extra.named_parameters() if p.requires_grad] == ["cache.keys"]
    init, _ = _tip(cls=TipAdapterF, views=2, epochs=3)
    init.setup()
    keys0 = init.extra["cache"].keys.detach()
    assert not torch.allclose(method.extra["cache"].keys.detach(), keys0)  # the keys trained
    assert torch.equal(method.extra.cache_labels, init.extra.cache_labels)  # the values did not
    torch.testing.assert_close(method.head, init.head, rtol=0, atol=0)  # nor the zero-shot head
    snaps = method.extra.snapshots
    for e, at in enumerate(snapshot_steps(4, 3)):  # after steps 2, 3, 4
        assert torch.equal(snaps[e], seen[at - 1]), e
    state = method.trained_state()
    assert set(state) == {"extra.snapshots", "extra.cache_labels"}
    clf = TipAdapterF.eval_model(mf.fresh_model(), state, method.hp, ctx.zeroshot_head).task_head(mf.class_tokens())
    assert clf.setting == {"alpha": 1.17, "beta": 1.0, "epoch": 3}  # `none`: the last epoch, the defaults
    assert [list(s) for s in clf.search] == [["epoch"], ["beta", "alpha"]]
    f = F.normalize(torch.randn(5, keys0.shape[1]), dim=-1)
    s = mf.fresh_model().logit_scale.exp()
    for epoch in (1, 3):
        expected = _tip_reference(f, s * ctx.zeroshot_head, snaps[epoch - 1], method.labels, 3, 0.7, 2.0)
        torch.testing.assert_close(clf.at(epoch=epoch, alpha=0.7, beta=2.0)(f).double(), expected,
                                   rtol=1e-5, atol=1e-5)
    # a step's loss covers every cached view of its samples
    idx = torch.tensor([4, 0, 7])
    terms = method.loss({"index": idx, "y": method.labels[idx]}, 0)
    rows = torch.cat([method.view_features[k, idx] for k in range(2)])
    expected = F.cross_entropy(_tip_reference(rows, method.head, method.extra["cache"].keys.detach(), method.labels,
                                              3, 1.17, 1.0), method.labels[idx].repeat(2))
    torch.testing.assert_close(terms["ce_loss"].double(), expected, rtol=1e-5, atol=1e-5)
