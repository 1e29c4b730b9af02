"""bf16 autocast computes what fp32 computes (issue #17), checked with CPU autocast, which
runs matmuls in bf16 as CUDA autocast does: every loss in `pipeline.losses` gives, under
autocast, the fp32 loss of the same features.
"""

from __future__ import annotations

import pipeline  # noqa: F401
import pytest
import torch
import torch.nn.functional as F

from pipeline import losses
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)



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
    }


@pytest.mark.parametrize("inputs", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["flyp", "mpm_nce", "classification", "dive"])
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


@pytest.mark.parametrize("name", ["flyp", "mpm_nce", "classification"])
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
