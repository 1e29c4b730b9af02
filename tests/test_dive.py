"""DiVE with gradient accumulation: one reference draw and one update of the average vector m
per optimiser step, the regulariser weighted so that the step's gradient is that of
grad_accum 1 at the same global batch (the rule in DiVE's docstring)."""

from __future__ import annotations

import pipeline  # noqa: F401
import pytest
import torch

from pipeline.methods.dive import DiVE, DiVEHparams
from pipeline.training.train import fit
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)


class RegulariserOnly(DiVE):
    """DiVE without its FLYP term: what is left must not depend on grad_accum at all (a
    contrastive loss over micro-batches is not the full-batch one, so FLYP's part cannot)."""

    def contrastive_loss(self, f, g):
        return 0.0 * (f.sum() + g.sum())  # exact zero gradients, and a graph for backward


def _double(items: list) -> mf.ListDataset:
    return mf.ListDataset([{k: v.double() if v.is_floating_point() else v for k, v in it.items()}
                           if isinstance(it, dict) else it.double() for it in items])


def train(cls, grad_accum: int, steps: int, **hp) -> tuple[dict, list[dict], torch.Tensor, dict]:
    """In float64: in an fp32 forward the reference rows share the target rows' batch, whose
    size differs with grad_accum, so their values differ by ~1e-7 of rounding, which Adam
    turns into lr-sized steps on weights whose gradient is exactly zero in exact arithmetic
    (the attention key bias); float64 keeps that far below Adam's eps."""
    model = mf.fresh_model()
    ctx = mf.context(model, reference=True)  # f_pre / g_pre of the unperturbed weights
    model.double()
    ctx.train_set = _double([ctx.train_set[i] for i in range(len(ctx.train_set))])
    ctx.reference.images = _double([ctx.reference.images[i] for i in range(len(ctx.reference))])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from θ_pre, so that the regulariser acts from step 1
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    start = mf.snapshot(model)
    hp = {"lr": 1e-3, "warmup_steps": 0, "ref_batch_size": 4, "momentum": 0.5, **hp}
    method = cls(cls.Hparams(**hp), ctx)
    method.setup()
    method.extra.double()
    res = fit(method, ctx.train_set, steps=steps, batch_size=6, seed=2, device=torch.device("cpu"),
              grad_accum=grad_accum, progress=False)
    return mf.snapshot(model), res.history, method.extra["avg"].m.clone(), start


def test_regulariser_is_the_same_with_grad_accum_2():
    """m after 3 steps and the weights equal between grad_accum 1 and 2 (regulariser only),
    while the steps moved both by far more than the tolerance."""
    w1, h1, m1, start = train(RegulariserOnly, 1, steps=3)
    w2, h2, m2, _ = train(RegulariserOnly, 2, steps=3)
    assert float(m1.abs().max()) > 1e-3
    torch.testing.assert_close(m2, m1, rtol=0, atol=1e-7)
    moved = 0.0
    for n, w in w1.items():
        torch.testing.assert_close(w2[n], w, rtol=0, atol=1e-6, msg=n)
        moved = max(moved, float((w - start[n]).abs().max()))
    assert moved > 1e-3  # 1000× the tolerance
    for a, b in zip(h1, h2, strict=True):  # the logged regulariser is the grad_accum 1 one
        assert b["avl_loss"] == pytest.approx(a["avl_loss"], rel=1e-5)
        assert b["pvl_loss"] == pytest.approx(a["pvl_loss"], rel=1e-5)


def test_full_dive_updates_m_once_per_step():
    """With the FLYP term on, the first step's m and regulariser are those of grad_accum 1
    (same weights, same reference batch, one update); two updates, or a second reference
    batch, would change m."""
    _, h1, m1, _ = train(DiVE, 1, steps=1)
    _, h2, m2, _ = train(DiVE, 2, steps=1)
    assert float(m1.abs().max()) > 1e-3
    torch.testing.assert_close(m2, m1, rtol=0, atol=1e-7)
    assert h2[0]["avl_loss"] == pytest.approx(h1[0]["avl_loss"], rel=1e-5)
    assert h2[0]["pvl_loss"] == pytest.approx(h1[0]["pvl_loss"], rel=1e-5)
    assert h2[0]["flyp_loss"] != pytest.approx(h1[0]["flyp_loss"], rel=1e-3)  # micro-batch negatives


def test_reference_batch_is_a_function_of_seed_and_step():
    """The same rows for a step whatever RNG the FLYP term or data loading used, different
    rows across steps and seeds."""
    ctx = mf.context(reference=True)
    ctx.reference = mf.reference_data(ctx.model, n=12)
    method = DiVE(DiVEHparams(ref_batch_size=4), ctx)
    torch.manual_seed(0)
    a = method.reference_rows(3)[0]
    torch.rand(100)
    assert torch.equal(method.reference_rows(3)[0], a)
    assert a.tolist() == sorted(a.tolist()) and len(set(a.tolist())) == 4
    others = [method.reference_rows(s)[0].tolist() for s in range(8)]
    assert len({tuple(o) for o in others}) > 4
    ctx.seed = 1
    assert [method.reference_rows(s)[0].tolist() for s in range(8)] != others
