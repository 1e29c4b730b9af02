"""bf16 autocast computes what fp32 computes (issue #17), checked with CPU autocast, which
runs matmuls in bf16 as CUDA autocast does:
- every loss in `pipeline.models.losses` gives, under autocast, the fp32 loss of the same features;
- DiVE's regulariser and its gradient are zero at θ = θ_pre under autocast as in fp32.
"""

from __future__ import annotations

import pipeline  # noqa: F401
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import carot
from pipeline.models import losses
from pipeline.methods.common import image_features, sample_class_prompts, text_features
from pipeline.methods.dive import DiVE, DiVEHparams
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

CPU = torch.device("cpu")


def bf16_autocast(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def near_pairs(n: int = 16, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image/text features around one common direction, matching pairs closer than the
    rest: every logit at scale 100 lies near 100 (cos ≈ 0.98–1), where bf16 steps are 0.5
    apart, with gaps of a few units between them, so the loss is O(1)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(d, generator=g)
    f = F.normalize(centre / d**0.5 + 0.2 * torch.randn(n, d, generator=g) / d**0.5, dim=-1)
    t = F.normalize(f + 0.05 * torch.randn(n, d, generator=g) / d**0.5, dim=-1)
    return f, t


def dive_loss(f, g, f_pre, g_pre, m, lam=1000.0):
    """DiVE's loss as a function of features: FLYP on the first half, λ(AVL + PVL) on the rest."""
    n = f.shape[0] // 2
    u, v = losses.difference_vectors(f[n:], g[n:], f_pre, g_pre)
    reg = losses.average_vector_loss(u, v, m) + losses.pairwise_vector_loss(u, v)
    return losses.clip_loss(f[:n], g[:n], torch.tensor(100.0)) + lam * reg


def near_orthonormal(width: int = 96, embed: int = 64) -> torch.Tensor:
    """A [width, embed] projection with orthonormal columns plus 1e-3 noise."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(width, embed, generator=g))
    return q + 1e-3 * torch.randn(width, embed, generator=g)


def loss_cases(f, g):
    y = torch.arange(f.shape[0]) % 5  # repeated labels: MPM-NCE's multi-positive case
    n = f.shape[0] // 2
    # reference rows a little away from their "pre-trained" copies, as after some steps
    f_pre = F.normalize(f[n:] + 0.003 * torch.roll(f[n:], 1, 1), dim=-1).float()
    g_pre = F.normalize(g[n:] + 0.003 * torch.roll(g[n:], 1, 1), dim=-1).float()
    m = (f[n:].float() - f_pre).mean(0)
    return {
        "flyp": (losses.clip_loss, (f, g, torch.tensor(100.0))),
        "mpm_nce": (losses.mpm_nce_loss, (f, g, y, 0.01)),
        "classification": (losses.classification_loss, (f, 100.0 * g[:5], y)),
        "dive": (dive_loss, (f, g, f_pre, g_pre, m)),
        # CaRot: distillation against a teacher a little away from the student, both at scale 100;
        # the orthogonality term of a nearly orthonormal projection (a small difference of O(1) sums)
        "carot_distill": (carot.self_distillation_loss,
                          (f, g, torch.tensor(100.0), f_pre.repeat(2, 1), g_pre.repeat(2, 1), torch.tensor(100.0))),
        "carot_orth": (carot.orthogonality_loss, (near_orthonormal(),)),
    }


@pytest.mark.parametrize("inputs", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["flyp", "mpm_nce", "classification", "dive", "carot_distill", "carot_orth"])
def test_losses_under_autocast_match_fp32(name, inputs):
    """Same features, same loss to 1e-3 relative: features as an fp32 forward gives them, or
    in bf16 as a bf16 forward would (upcast, not rounded further)."""
    f, g = near_pairs()
    if inputs == "bf16":
        f, g = f.bfloat16(), g.bfloat16()
    fn, args = loss_cases(f, g)[name]
    want = fn(*[losses.upcast(a) for a in args])
    with bf16_autocast():
        got = fn(*args)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-3)


@pytest.mark.parametrize("name", ["flyp", "mpm_nce", "classification", "carot_distill", "carot_orth"])
def test_the_check_sees_bf16_logits(name):
    """The same losses without `fp32_loss` (their `.float()` casts only) differ by more than
    1e-3 under autocast: the comparison above can fail."""
    f, g = near_pairs()
    fn, args = loss_cases(f, g)[name]
    want = float(fn(*args))
    with bf16_autocast():
        bare = float(fn.__wrapped__(*args))
    assert abs(bare - want) > 1e-3 * abs(want), (bare, want)


def test_fp32_loss_turns_autocast_off_and_keeps_float64():
    @losses.fp32_loss
    def probe(x):
        return torch.is_autocast_enabled("cpu"), x.dtype, (x @ x.t()).dtype

    with bf16_autocast():
        assert probe(torch.ones(2, 2, dtype=torch.bfloat16)) == (False, torch.float32, torch.float32)
        assert probe(torch.ones(2, 2, dtype=torch.float64)) == (False, torch.float64, torch.float64)
        assert torch.is_autocast_enabled("cpu")  # restored on the way out


# ---- DiVE at θ = θ_pre ----------------------------------------------------------------------


def dive_at_pretrained(bf16: bool, same_path_cache: bool) -> dict:
    """λ(AVL + PVL) and the gradient norms of it and of the FLYP term at the pre-trained
    weights, one DiVE loss (B' = every reference row, m = 0) under bf16 autocast or not.

    `same_path_cache`: f_pre / g_pre from an fp32 forward without autocast (as the embed
    stage's cache) in train mode with the rows in the batch layout the loss uses (in its own
    batch under bf16, in the target rows' batch in fp32: `DiVE.embed`), so that u = v = 0
    exactly when the loss embeds the reference rows in fp32; otherwise the embed stage's way
    (eval mode), which differs by kernel rounding (~1e-7)."""
    model = mf.fresh_model()
    ctx = mf.context(model, reference=True)
    method = DiVE(DiVEHparams(ref_batch_size=len(ctx.reference)), ctx)
    method.setup()
    method.root.train()
    rows, size = method.reference_rows(0)
    assert size == len(ctx.reference) and rows.tolist() == list(range(size))
    items = [ctx.train_set[i] for i in range(6)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    if same_path_cache:
        ref = ctx.reference
        with torch.no_grad():  # fp32, no autocast: what the cache holds
            if bf16:  # the loss embeds the reference rows in a batch of their own
                images = torch.stack([ref.images[int(j)] for j in rows])
                pre = image_features(model, images), text_features(model, ref.tokens[rows])
            else:  # the loss embeds them in the target rows' batch
                torch.manual_seed(0)  # the loss below draws the same templates
                tokens = sample_class_prompts(ctx.class_tokens, batch["y"])
                pre = method.embed(batch["image"], tokens, rows, CPU)[2:]
        ref.image_pre, ref.text_pre = (x.clone() for x in pre)
    torch.manual_seed(0)
    with bf16_autocast(bf16):
        terms = method.loss(batch, 0)
    reg = terms["avl_loss"] + terms["pvl_loss"]
    params = [p for p in method.root.parameters() if p.requires_grad]
    g_reg = torch.autograd.grad(reg, params, retain_graph=True, allow_unused=True)
    g_flyp = torch.autograd.grad(terms["flyp_loss"], params, allow_unused=True)
    return {"reg": float(reg.detach()),
            "grad_reg_max": max(float(x.abs().max()) for x in g_reg if x is not None),
            "grad_flyp_max": max(float(x.abs().max()) for x in g_flyp if x is not None)}


@pytest.mark.parametrize("bf16", [False, True])
def test_dive_regulariser_and_gradient_are_zero_at_pretrained_weights(bf16):
    """Before the reference rows ran in fp32, bf16 autocast gave here λ(AVL + PVL) = 0.086
    and a largest regulariser gradient entry of 40 against FLYP's 1.4 (the rows' bf16
    rounding against the fp32 cache); fp32 gave 0 and 0, as now both do."""
    r = dive_at_pretrained(bf16, same_path_cache=True)
    assert abs(r["reg"]) <= 1e-6
    assert r["grad_reg_max"] <= 1e-6
    assert r["grad_flyp_max"] > 1e-2  # the step does compute something


def test_dive_with_the_embed_stage_cache_is_rounding_only():
    """With the cache computed as the embed stage does (eval-mode kernels), u is fp32 kernel
    rounding in both precisions: λ(AVL + PVL) ≤ 1e-6 and its gradient far below FLYP's."""
    for bf16 in (False, True):
        r = dive_at_pretrained(bf16, same_path_cache=False)
        assert abs(r["reg"]) <= 1e-6, (bf16, r)
        assert r["grad_reg_max"] <= 1e-2 * r["grad_flyp_max"], (bf16, r)
