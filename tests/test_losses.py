"""Losses against slow direct formulas (reference/methods.md)."""

from __future__ import annotations

import math

import pipeline  # noqa: F401
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.losses import (AverageVector, average_vector_loss, classification_loss, clip_loss,
                             contrastive_loss, mpm_nce_loss, pairwise_vector_loss, sigmoid_loss)
from pipeline.methods import METHODS
from pipeline.training.train import fit
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


# ---- FLYP ---------------------------------------------------------------------------------


def slow_clip_loss(f, g, s):
    b = f.shape[0]
    total = 0.0
    for i in range(b):
        row = [s * float(f[i] @ g[j]) for j in range(b)]
        col = [s * float(g[i] @ f[j]) for j in range(b)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * b)


def test_clip_loss_matches_direct_formula():
    f, g = unit(7, 5, 0), unit(7, 5, 1)
    got = clip_loss(f, g, torch.tensor(10.0, dtype=torch.float64))
    assert float(got) == pytest.approx(slow_clip_loss(f, g, 10.0), rel=1e-10)


def slow_sigmoid_loss(f, g, s, b):
    n = f.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (s * float(f[i] @ g[j]) + b)))  # −log σ(z·logit)
    return total / n


@pytest.mark.parametrize("bias", [-10.0, 0.0, 3.0])
def test_sigmoid_loss_matches_direct_double_loop(bias):
    f, g = unit(6, 5, 7), unit(6, 5, 8)
    s = torch.tensor(10.0, dtype=torch.float64)
    got = sigmoid_loss(f, g, s, torch.tensor(bias, dtype=torch.float64))
    assert float(got) == pytest.approx(slow_sigmoid_loss(f, g, 10.0, bias), rel=1e-10)


def test_sigmoid_loss_runs_in_fp32_under_autocast_and_trains_the_bias():
    f, g = unit(4, 8, 9).float(), unit(4, 8, 10).float()
    bias = torch.tensor(-10.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sigmoid_loss(f.bfloat16(), g.bfloat16(), torch.tensor(10.0), bias)
    assert got.dtype == torch.float32
    want = slow_sigmoid_loss(f.bfloat16().double(), g.bfloat16().double(), 10.0, -10.0)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    got.backward()
    # at b = −10 every negative pair is already right and the positives are wrong: the
    # gradient raises the bias
    assert float(bias.grad) < 0


def test_contrastive_loss_picks_the_family_loss():
    f, g = unit(5, 4, 11), unit(5, 4, 12)
    s, b = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    assert torch.equal(contrastive_loss(f, g, s), clip_loss(f, g, s))
    assert torch.equal(contrastive_loss(f, g, s, b), sigmoid_loss(f, g, s, b))


def test_classification_loss_is_cross_entropy_of_scaled_head():
    f, h = unit(6, 4, 2), 20 * unit(3, 4, 3)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    direct = sum(-float(f[i] @ h[y[i]]) + math.log(sum(math.exp(float(f[i] @ h[c])) for c in range(3)))
                 for i in range(6)) / 6
    assert float(classification_loss(f, h, y)) == pytest.approx(direct, rel=1e-10)


# ---- DiVE ---------------------------------------------------------------------------------


def test_dive_vector_losses_match_direct_formulas():
    u, v, m = unit(5, 4, 4), unit(5, 4, 5), unit(1, 4, 6)[0]
    avl = sum(sum((u[j, k] - m[k]) ** 2 + (v[j, k] - m[k]) ** 2 for k in range(4)) for j in range(5)) / 5
    pvl = sum(sum((u[j, k] - v[j, k]) ** 2 for k in range(4)) for j in range(5)) / 5
    assert float(average_vector_loss(u, v, m)) == pytest.approx(float(avl), rel=1e-12)
    assert float(pairwise_vector_loss(u, v)) == pytest.approx(float(pvl), rel=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.99])
def test_average_vector_is_an_ema_from_zero(momentum):
    avg = AverageVector(3, momentum)
    means = [torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = torch.zeros(3)
    for x in means:
        expected = momentum * expected + (1 - momentum) * x
        got = avg.update(x)
        torch.testing.assert_close(got, expected)
    got.add_(1.0)  # a returned copy: the state does not move with it
    torch.testing.assert_close(avg.m, expected)


def test_dive_without_regulariser_is_flyp_step_for_step():
    """λ = 0: the reference rows add exact zeros to the gradients and DiVE's reference draw has
    its own generator, so DiVE follows FLYP step for step. Not bit for bit: in an fp32 forward
    DiVE runs the target and reference rows through each tower in one batch, and a larger
    matmul may round differently (~1e-7), which AdamW can turn into a step of a few lr on the
    rare weights whose gradient is ~0. So: same losses to 1e-5, and all but a handful of
    weights equal to 1e-6, while λ = 1000 moves a large share of them (the check can tell the
    two apart). (Under bf16 autocast the reference rows have their own fp32 forward.)"""
    weights, losses = {}, {}
    for name, lam in (("flyp", None), ("dive", 0.0), ("dive", 1000.0)):
        model = mf.fresh_model()
        ctx = mf.context(model, reference=True)
        cls = METHODS[name]
        # lr 1e-5 (the paper's recipe): the tolerances below are a few lr
        hp = cls.Hparams(lr=1e-5, warmup_steps=10) if lam is None else cls.Hparams(lr=1e-5, warmup_steps=10, lam=lam)
        res = fit(cls(hp, ctx), ctx.train_set, steps=3, batch_size=6, seed=5,
                  device=torch.device("cpu"), progress=False)
        weights[lam] = mf.snapshot(model)
        losses[lam] = [h["flyp_loss"] for h in res.history]
    assert losses[0.0] == pytest.approx(losses[None], rel=1e-5)
    total = sum(w.numel() for w in weights[None].values())

    def moved(lam):  # weights that differ from FLYP's by more than 1e-6
        return sum(int(((weights[lam][n] - w).abs() > 1e-6).sum()) for n, w in weights[None].items())

    for n, w in weights[None].items():
        torch.testing.assert_close(weights[0.0][n], w, rtol=0, atol=1e-5, msg=n)
    assert moved(0.0) < 1e-4 * total, moved(0.0)  # measured 14 of 1.7M
    assert moved(1000.0) > 1e-2 * total, moved(1000.0)  # measured 89k of 1.7M


# ---- MPM-NCE ------------------------------------------------------------------------------


def slow_mpm_nce(f, g, y, tau, delta, eps):
    """Direct double loop over the definition in reference/methods.md."""
    b = f.shape[0]

    def direction(a, c):
        total = 0.0
        for i in range(b):
            pos = [j for j in range(b) if y[j] == y[i]]
            neg = [j for j in range(b) if y[j] != y[i]]
            logits = [(float(a[i] @ c[j]) + (0.0 if j in pos else delta)) / tau for j in range(b)]
            lse = math.log(sum(math.exp(v) for v in logits))
            for j in range(b):
                if j in pos:
                    t = (1 - eps) / len(pos) if neg else 1.0 / len(pos)
                else:
                    t = eps / len(neg)
                total += -t * (logits[j] - lse)
        return total / b

    return 0.5 * (direction(f, g) + direction(g, f))


def test_mpm_nce_reduces_to_clip_loss():
    f, g = unit(6, 8, 7), unit(6, 8, 8)
    y = torch.arange(6)
    tau = 0.05
    got = mpm_nce_loss(f, g, y, tau, margin=0.0, smoothing=0.0)
    torch.testing.assert_close(got, clip_loss(f, g, torch.tensor(1 / tau, dtype=torch.float64)))


@pytest.mark.parametrize("labels", [[0, 0, 1, 2, 2, 2, 3], [1, 1, 1, 1], [0, 1, 2, 3], [4, 0, 4, 1, 0]])
@pytest.mark.parametrize("delta,eps", [(0.05, 0.02), (0.0, 0.1), (0.2, 0.0)])
def test_mpm_nce_matches_direct_double_loop(labels, delta, eps):
    n = len(labels)
    f, g = unit(n, 6, 9), unit(n, 6, 10)
    y = torch.tensor(labels)
    got = mpm_nce_loss(f, g, y, tau=0.1, margin=delta, smoothing=eps)
    assert float(got) == pytest.approx(slow_mpm_nce(f, g, labels, 0.1, delta, eps), rel=1e-10)


def test_mpm_nce_targets_are_distributions_in_both_directions():
    """Unequal positive-set sizes: with ε > 0 each anchor's target must still sum to 1, in
    the text->image direction too (its negatives share ε by the anchor's own count)."""
    f = unit(3, 4, 11)
    y = torch.tensor([0, 0, 1])
    # perfectly separated, huge scale: the loss is the targets' entropy plus the missing
    # mass on the negatives; a mis-normalised target changes it
    got = mpm_nce_loss(f, f, y, tau=0.1, margin=0.0, smoothing=0.3)
    assert float(got) == pytest.approx(slow_mpm_nce(f, f, [0, 0, 1], 0.1, 0.0, 0.3), rel=1e-10)


def test_mpm_nce_gradient_flows_to_both_towers():
    f = unit(4, 5, 12).requires_grad_(True)
    g = unit(4, 5, 13).requires_grad_(True)
    mpm_nce_loss(f, g, torch.tensor([0, 1, 0, 2]), tau=0.01).backward()
    assert f.grad.abs().sum() > 0 and g.grad.abs().sum() > 0
