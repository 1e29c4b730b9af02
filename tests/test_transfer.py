"""Transferability scores against slow direct computations written from the definitions
(loops over classes and pairs, explicit inverses and determinants; for LogME a numerical
maximisation of the N-dimensional Gaussian evidence, not the fixed point), plus the
properties each score must have."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from pipeline.evaluation.transfer import gbc, h_score, logme, transfer_scores, transrate

SHAPES = [(60, 8, 4), (45, 12, 3), (24, 30, 3)]  # N, D, K; the last has N < D


def random_case(seed: int, n: int, d: int, k: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    labels[:k] = np.arange(k)  # every class present
    centres = rng.normal(size=(k, d))
    feats = centres[labels] * 0.7 + rng.normal(size=(n, d)) + rng.normal(size=d)
    return feats, labels


def rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ---- slow direct computations ----------------------------------------------------------------


def slow_h_score(f, y):
    n, d = f.shape
    mu = f.mean(0)
    cov = np.zeros((d, d))
    between = np.zeros((d, d))
    class_mean = {c: f[y == c].mean(0) for c in set(y.tolist())}
    for i in range(n):
        cov += np.outer(f[i] - mu, f[i] - mu) / n
        g = class_mean[int(y[i])] - mu
        between += np.outer(g, g) / n
    return float(np.trace(np.linalg.inv(cov) @ between))


def log_evidence(gram_eig, gram_vec, t, log_alpha, log_beta):
    """log N(t; 0, C), C = FFᵀ/α + I/β: the marginal likelihood of w ~ N(0, I/α),
    t ~ N(Fw, I/β). C is evaluated in the eigenbasis of the Gram matrix FFᵀ = V E Vᵀ
    (C = V (E/α + 1/β) Vᵀ), so that no huge or tiny α, β makes a solve ill-conditioned."""
    n = len(t)
    c = gram_eig / math.exp(log_alpha) + 1 / math.exp(log_beta)
    return -0.5 * (n * math.log(2 * math.pi) + np.log(c).sum() + ((gram_vec.T @ t) ** 2 / c).sum())


def gram_eigh(f):
    e, v = np.linalg.eigh(f @ f.T)
    return np.maximum(e, 0.0), v  # the N − D null eigenvalues are 0 up to rounding


def slow_logme_per_class(f, y):
    """Per class: (max log evidence / N, the maximising log α)."""
    n = f.shape[0]
    e, v = gram_eigh(f)
    grid = np.linspace(-12, 38, 26)
    bounds = [(-15.0, 40.0), (-15.0, 40.0)]  # α = e^40: the evidence is at its α → ∞ limit to ~1e-15
    per_class = []
    for c in sorted(set(y.tolist())):
        t = (y == c).astype(float)
        best = max(((a, b) for a in grid for b in grid), key=lambda p: log_evidence(e, v, t, *p))
        res = minimize(lambda p: -log_evidence(e, v, t, *p), np.array(best), method="Nelder-Mead", bounds=bounds,
                       options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 20000, "maxfev": 20000})
        per_class.append((-res.fun / n, res.x[0]))
    return per_class


def slow_logme(f, y):
    return float(np.mean([value for value, _ in slow_logme_per_class(f, y)]))


def slow_gbc(f, y, pca_dim=64, var_floor=1e-6):
    n, d = f.shape
    fc = f - f.mean(0)
    w, v = np.linalg.eigh(fc.T @ fc / n)
    order = np.argsort(w)[::-1][: min(pca_dim, d, n - 1)]
    x = fc @ v[:, order]
    floor = var_floor * x.var(0).mean()
    stats = {}
    for c in sorted(set(y.tolist())):
        rows = x[y == c]
        if len(rows) < 2:
            continue
        mean = rows.sum(0) / len(rows)
        var = ((rows - mean) ** 2).sum(0) / len(rows)
        stats[c] = (mean, np.diag(np.maximum(var, floor)))
    total = 0.0
    for ci, (mi, si) in stats.items():
        for cj, (mj, sj) in stats.items():
            if ci == cj:
                continue
            s = (si + sj) / 2
            diff = mi - mj
            db = diff @ np.linalg.inv(s) @ diff / 8 + 0.5 * math.log(
                np.linalg.det(s) / math.sqrt(np.linalg.det(si) * np.linalg.det(sj)))
            total += math.exp(-db)
    return -total


def slow_transrate(f, y, eps=1e-4):
    z = f - f.mean(0)
    d = z.shape[1]

    def rate(m):
        return 0.5 * math.log(np.linalg.det(np.eye(d) + m.T @ m / (m.shape[0] * eps)))

    classes = sorted(set(y.tolist()))
    return rate(z) - sum(rate(z[y == c]) for c in classes) / len(classes)


# ---- fast == slow ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_h_score_matches_direct(seed, shape):
    f, y = random_case(seed, *shape)
    assert h_score(f, y) == pytest.approx(slow_h_score(f, y), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_logme_matches_direct_maximisation(seed, shape):
    f, y = random_case(seed, *shape)
    assert logme(f, y) == pytest.approx(slow_logme(f, y), abs=1e-9)


def test_logme_where_the_evidence_peaks_at_infinite_alpha():
    """Pure-noise features: for some classes the evidence is maximised as α → ∞ (the fixed
    point's α diverges); the score takes that limit, −½(log(2π n_k/N) + 1), as the direct
    maximisation finds it."""
    rng = np.random.default_rng(0)
    f, y = rng.normal(size=(60, 8)), rng.integers(0, 4, 60)
    per_class = slow_logme_per_class(f, y)
    at_infinity = [c for c, (_, log_alpha) in enumerate(per_class) if log_alpha > 30.0]  # α > 1e13: the features add nothing
    assert at_infinity  # the case this test is about
    for c in at_infinity:
        assert per_class[c][0] == pytest.approx(-0.5 * (math.log(2 * math.pi * (y == c).sum() / 60) + 1), abs=1e-12)
    assert logme(f, y) == pytest.approx(np.mean([v for v, _ in per_class]), abs=1e-9)


def test_logme_takes_the_higher_of_two_evidence_peaks():
    """Here one class's evidence has two peaks in α/β; the fixed point from the paper's
    start α = β = 1 climbs the lower one (0.03 per sample lower), the score is the higher."""
    rng = np.random.default_rng(77)
    f = rng.normal(size=(30, 40)) + rng.normal(size=40)
    y = rng.integers(0, 3, 30)
    assert logme(f, y) == pytest.approx(slow_logme(f, y), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_gbc_matches_direct(seed, shape):
    f, y = random_case(seed, *shape)
    y[-1] = 7  # a class with one sample: left out by both
    assert gbc(f, y) == pytest.approx(slow_gbc(f, y), rel=1e-9)
    assert gbc(f, y, pca_dim=4) == pytest.approx(slow_gbc(f, y, pca_dim=4), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_transrate_matches_direct(seed, shape):
    f, y = random_case(seed, *shape)
    assert transrate(f, y) == pytest.approx(slow_transrate(f, y), rel=1e-9)


# ---- properties ------------------------------------------------------------------------------

SCORES = [h_score, logme, gbc, transrate]


@pytest.mark.parametrize("score", SCORES, ids=lambda s: s.__name__)
def test_separable_classes_score_higher_than_shuffled_labels(score):
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(4), 20)
    f = 3.0 * rng.normal(size=(4, 8))[y] + rng.normal(size=(80, 8))
    f /= np.linalg.norm(f, axis=1, keepdims=True)  # as the embed stage's features
    shuffled = rng.permutation(y)
    assert score(f, y) > score(f, shuffled) + 0.1 * abs(score(f, shuffled))


@pytest.mark.parametrize("score", SCORES, ids=lambda s: s.__name__)
def test_invariant_to_relabelling_the_classes(score):
    f, y = random_case(3, 60, 8, 4)
    renamed = np.array([12, 3, 40, 7])[y]  # another class id for each class, any integers
    assert score(f, renamed) == pytest.approx(score(f, y), rel=1e-10)


def test_h_score_affine_invariance_bounds_and_pseudo_inverse():
    f, y = random_case(4, 60, 8, 4)
    a = np.random.default_rng(4).normal(size=(8, 8))  # invertible (almost surely)
    h = h_score(f, y)
    assert h_score(f @ a + 5.0, y) == pytest.approx(h, rel=1e-8)
    assert 0.0 <= h <= 3.0  # ≤ K − 1: the between-class covariance has rank K − 1
    tight = np.repeat(np.eye(4, 8) * 10, 15, axis=0) + 1e-3 * np.random.default_rng(0).normal(size=(60, 8))
    assert h_score(tight, np.repeat(np.arange(4), 15)) == pytest.approx(3.0, abs=1e-3)
    # a duplicated feature makes cov(f) singular; the pseudo-inverse scores it as the features without it
    assert h_score(np.c_[f, f[:, :1]], y) == pytest.approx(h, rel=1e-8)


def test_h_score_with_fewer_samples_than_dimensions():
    """N − 1 ≤ D: the features span every centred labelling, so H = K − 1 for any labels;
    the pseudo-inverse gets it, as it gets the same features written in a basis of their
    span (where cov(f) is invertible). Inverting rounding noise would not."""
    f, y = random_case(11, 20, 30, 3)
    fc = f - f.mean(0)
    _, s, vt = np.linalg.svd(fc, full_matrices=False)
    span = fc @ vt[: int((s > 1e-10 * s[0]).sum())].T  # [20, 19]
    assert h_score(f, y) == pytest.approx(2.0, abs=1e-9)
    assert h_score(f, y) == pytest.approx(slow_h_score(span, y), abs=1e-9)


def test_logme_invariant_to_scaling_and_rotating_features():
    f, y = random_case(6, 60, 8, 4)
    assert logme(0.05 * f @ rotation(8, 1), y) == pytest.approx(logme(f, y), abs=1e-9)


def test_gbc_invariances_and_range():
    f, y = random_case(7, 60, 8, 4)
    g = gbc(f, y)
    assert gbc(3.0 * f @ rotation(8, 2) - 1.0, y) == pytest.approx(g, rel=1e-8)
    assert -12.0 <= g < 0.0  # each of the K(K−1) ordered pairs contributes a BC in (0, 1]
    far = np.repeat(100 * np.eye(4, 8), 15, axis=0) + np.random.default_rng(1).normal(size=(60, 8))
    assert gbc(far, np.repeat(np.arange(4), 15)) == pytest.approx(0.0, abs=1e-12)
    same = np.random.default_rng(2).normal(size=(4000, 2))  # every class the same distribution
    assert gbc(same, np.arange(4000) % 2) == pytest.approx(-2.0, abs=0.01)  # BC → 1 for each of 2 ordered pairs


def test_transrate_invariant_to_rotating_and_shifting_features():
    f, y = random_case(8, 60, 8, 4)
    assert transrate(f @ rotation(8, 3) + 2.0, y) == pytest.approx(transrate(f, y), rel=1e-9)


def test_tensors_and_arrays_give_the_same_scores():
    f, y = random_case(9, 60, 8, 4)
    ft = torch.from_numpy(f).float()
    from_tensor = transfer_scores(ft, torch.from_numpy(y))
    from_array = transfer_scores(ft.double().numpy(), y)
    assert from_tensor == pytest.approx(from_array, rel=1e-12)
    assert set(from_tensor) == {"transfer/h_score", "transfer/logme", "transfer/gbc", "transfer/transrate"}


@pytest.mark.parametrize("score", SCORES, ids=lambda s: s.__name__)
def test_bad_inputs_are_refused(score):
    f = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match="at least 2 classes"):
        score(f, np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match=r"features \[N, D\] and labels \[N\]"):
        score(f, np.arange(9) % 2)
    with pytest.raises(ValueError, match="NaN"):
        score(np.full((10, 4), np.nan), np.arange(10) % 2)


def test_gbc_needs_two_classes_with_two_samples():
    f = np.random.default_rng(0).normal(size=(5, 4))
    with pytest.raises(ValueError, match="2 classes with 2 or more samples"):
        gbc(f, np.array([0, 0, 1, 2, 3]))


def test_registered_for_the_embed_stage_on_the_train_subsample():
    from pipeline.evaluation.measures import MEASURES, MeasureInputs

    m = MEASURES["transfer"]
    assert m.stages == ("embed",)
    f, y = random_case(10, 60, 8, 4)
    out = m.compute(MeasureInputs(train_features=torch.from_numpy(f).float(), train_labels=torch.from_numpy(y)))
    assert set(out) == set(m.summary_keys)  # the report copies every one into its DVC metrics
    assert out["transfer/logme"] == pytest.approx(logme(torch.from_numpy(f).float(), y), rel=1e-12)


def test_the_report_and_mlflow_carry_the_scores():
    """DVC metrics (`zeroshot/transfer/...`, from the measure's summary_keys) and the embed
    run's MLflow page (`mlflow_metrics`) carry every score."""
    import pandas as pd

    from pipeline.report.tables import flat_metrics
    from pipeline.stages.common import mlflow_metrics

    f, y = random_case(12, 60, 8, 4)
    scores = transfer_scores(f, y)
    assert flat_metrics(pd.DataFrame(), scores) == {f"zeroshot/{k}": v for k, v in scores.items()}
    assert mlflow_metrics("synthetic", {**scores, "id_test/acc_avg": 0.5}) == {**scores, "id_test/acc_avg": 0.5}
