"""Transferability scores from the model-selection literature, beside IIMM in the embed stage.

Each score is a pure function of features [N, D] (a tensor or an array) and integer labels
[N], computed in float64, returning a float; higher means "the features suit the task
better". The embed stage computes them on the pre-trained model's L2-normalised image
embeddings of its seeded train subsample (`embed.iimm_samples` images, the same as IIMM's).

OPEN (ours), for every score: the features are the normalised embeddings (what IIMM and the
zero-shot head use), not a penultimate layer as in the papers; only the classes present in
`labels` count (a class absent from the subsample has no features to score).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _inputs(features: Any, labels: Any, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """float64 features [N, D], labels re-indexed to 0..K−1 [N], and K."""
    if hasattr(features, "detach"):
        features = features.detach().cpu().double().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.ndim != 1 or f.shape[0] != y.shape[0]:
        raise ValueError(f"{name} needs features [N, D] and labels [N]; got {f.shape} and {y.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name}: the features contain NaN or infinite values")
    classes, y = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{name} needs at least 2 classes in the labels; got {len(classes)}")
    return f, y, len(classes)


def h_score(features: Any, labels: Any, rtol: float = 1e-10) -> float:
    """H-score (Bao et al. 2019, "An information-theoretic approach to transferability in
    task transfer learning", ICIP):

        H(f) = tr( cov(f)⁻¹ cov(E[f | y]) ),

    cov(f) the covariance of the features, cov(E[f | y]) that of each sample's class mean
    (the between-class covariance Σ_k (n_k/N)(μ_k − μ)(μ_k − μ)ᵀ). Both use the 1/N
    normaliser (the ratio does not depend on it). 0 ≤ H ≤ min(D, K − 1); invariant to any
    invertible affine map of the features and to relabelling the classes. With N − 1 ≤ D
    the features span every centred labelling and H = K − 1 whatever the labels: the score
    needs N well above D (`embed.iimm_samples`, 2000 images by default).

    cov(f)⁻¹ is the Moore–Penrose pseudo-inverse, as in the authors' code (`pinv(rcond=1e-15)`,
    which cuts eigenvalues below 1e-15 of the largest), here through the eigendecomposition
    of cov(f). OPEN (ours): the cut is `rtol` = 1e-10 of the largest eigenvalue, so directions the features do not span (N ≤ D, collinear features)
    count zero instead of rounding noise divided by 1e-15; we do not use the shrinkage
    estimator of Ibrahim et al. 2022, which changes the score's value, not only its stability.
    """
    f, y, k = _inputs(features, labels, "h_score")
    f = f - f.mean(0)
    n = f.shape[0]
    onehot = np.eye(k)[y]
    counts = onehot.sum(0)
    means = (onehot.T @ f) / counts[:, None]  # [K, D], already centred
    cov = f.T @ f / n
    between = means.T @ (means * (counts / n)[:, None])
    w, v = np.linalg.eigh(cov)
    keep = w > rtol * w.max()
    # tr(cov⁺ between) = Σ over kept eigenpairs of vᵀ between v / w
    return float((np.einsum("di,de,ei->i", v[:, keep], between, v[:, keep]) / w[keep]).sum())


def logme(features: Any, labels: Any, tol: float = 1e-12, max_iter: int = 100_000) -> float:
    """LogME (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
    Learning", ICML): per class k, Bayesian linear regression of the one-hot column y_k on the
    features F, w ~ N(0, α⁻¹ I_D), y_k | F, w ~ N(F w, β⁻¹ I_N), with log evidence

        L(α, β) = D/2 log α + N/2 log β − N/2 log 2π − β/2 ‖F m − y‖² − α/2 ‖m‖² − ½ log det A,
        A = α I + β FᵀF,  m = β A⁻¹ Fᵀ y;

    maximised over α, β by the paper's fixed point (Algorithm 1) through the SVD F = U S Vᵀ
    (σ_i = S_i²): γ = Σ β σ_i / (α + β σ_i), α ← γ / ‖m‖², β ← (N − γ) / ‖F m − y‖².
    LogME = the mean over classes of max L / N. Invariant to scaling and rotating the
    features (F → c F Q) and to relabelling the classes.

    OPEN (ours), numerical choices:
    - the start: the paper starts from α = β = 1, and the fixed point climbs the nearest
      peak. The evidence can have two peaks in λ = α/β (we met them with N ≤ D, where the
      lower one scored 0.03 per sample less, and with classes of 1–3 images, ~1e-4 less),
      and the climb can stall on a plateau. We start each class at the best of a
      log grid of λ ∈ [1e-8, 1e8] · σ_max (10 points per decade), where for each λ the
      best β is closed-form: β = N / yᵀ(I + F Fᵀ/λ)⁻¹y;
    - the iteration runs until a class's evidence per sample changes by less than `tol`
      (1e-12) in one step. The paper's code stops at a 1 % change of α/β or after 11 steps,
      short of the maximum on some inputs. A criterion on α, β would never stop where the
      evidence peaks as α → ∞ (features that explain nothing the prior would not, e.g. a
      class with one image among normalised features): there α grows without bound, but the
      evidence converges to its limit −½ (log(2π ‖y‖²/N) + 1) per sample;
    - no bias column and no centring (as the paper).
    Raises RuntimeError if a class has not converged after `max_iter` steps.
    """
    f, y, k = _inputs(features, labels, "logme")
    n, d = f.shape
    u, s_val, _ = np.linalg.svd(f, full_matrices=False)
    sig = s_val ** 2  # eigenvalues of FᵀF; the D − len(sig) others are 0
    onehot = np.eye(k)[y]  # [N, K]
    z = u.T @ onehot  # [r, K]: y in the left singular basis
    perp = np.maximum(onehot.sum(0) - (z ** 2).sum(0), 0.0)  # ‖y‖² outside the column space of F

    def step(alpha: np.ndarray, beta: np.ndarray):
        """γ, ‖m‖², ‖F m − y‖² and the evidence per sample at (α, β), one per class."""
        denom = alpha[None] + beta[None] * sig[:, None]  # [r, K]
        gamma = (beta[None] * sig[:, None] / denom).sum(0)
        m2 = ((beta[None] * s_val[:, None] * z / denom) ** 2).sum(0)
        res = perp + ((alpha[None] / denom * z) ** 2).sum(0)
        log_det = np.log(denom).sum(0) + (d - len(sig)) * np.log(alpha)  # log det A
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - n / 2 * math.log(2 * math.pi)
                    - beta / 2 * res - alpha / 2 * m2 - log_det / 2)
        return gamma, m2, res, evidence / n

    # the start: for each λ on the grid, β maximised in closed form, then the best λ per class
    lam = sig.max() * np.logspace(-8, 8, 161)  # [G]
    z2 = z ** 2
    quad = np.stack([perp + z2.T @ (g / (g + sig)) for g in lam])  # [G, K]: yᵀ(I + FFᵀ/λ)⁻¹y
    log_det = np.log1p(sig[None] / lam[:, None]).sum(1)  # [G]: log det(I + FFᵀ/λ)
    best = (-n * np.log(quad) - log_det[:, None]).argmax(0)  # 2 × the evidence up to a constant
    beta = n / quad[best, np.arange(k)]
    alpha = lam[best] * beta
    value = np.full(k, -np.inf)  # evidence per sample at the previous step
    active = np.ones(k, dtype=bool)
    for _ in range(max_iter):
        gamma, m2, res, new_value = step(alpha, beta)
        converged = np.abs(new_value - value) < tol
        value = np.where(active, new_value, value)
        active &= ~converged
        if not active.any():
            break
        alpha = np.where(active, gamma / m2, alpha)
        beta = np.where(active, (n - gamma) / res, beta)
    else:
        raise RuntimeError(f"logme: the evidence maximisation did not converge in {max_iter} steps "
                           f"for {int(active.sum())} of {k} classes")
    return float(value.mean())


def gbc(features: Any, labels: Any, pca_dim: int = 64, var_floor: float = 1e-6) -> float:
    """Gaussian Bhattacharyya Coefficient (Pándy et al. 2022, "Transferability Estimation using
    Bhattacharyya Class Separability", CVPR): each class c a diagonal Gaussian
    N(μ_c, diag σ_c²) of the (PCA-reduced) features, and

        GBC = −Σ_{i≠j} BC(c_i, c_j),  BC = exp(−D_B),
        D_B = ⅛ Σ_d (μ_i − μ_j)² / σ̄² + ½ Σ_d log( σ̄² / √(σ_i² σ_j²) ),  σ̄² = (σ_i² + σ_j²)/2,

    the sum over ordered pairs (each unordered pair twice), as the paper. GBC ≤ 0; 0 = no
    two classes overlap. Invariant to rotating, shifting and scaling the features and to
    relabelling the classes.

    OPEN choices:
    - PCA dimension min(`pca_dim`, D, N − 1), `pca_dim` = 64 as the paper and its code
      (`pca_reduction = 64`). Our tiny model's D = 128 is reduced to 64; where D ≤ 64 the PCA
      is a rotation onto the principal axes, which still matters (the Gaussians are diagonal
      in those axes, not in the raw coordinates);
    - σ_c² is the maximum-likelihood variance (ddof 0, as the authors' code);
    - ours: classes with fewer than 2 samples are left out (their variance is 0);
    - ours: variances are floored at `var_floor` × the mean variance of the reduced features
      (the authors' code floors at an absolute 1e-4, sized for unnormalised ResNet features;
      on normalised embeddings 1e-4 is of the order of the signal). A relative floor keeps
      the score scale-free.
    """
    f, y, _ = _inputs(features, labels, "gbc")
    f = f - f.mean(0)
    dim = min(pca_dim, f.shape[1], f.shape[0] - 1)
    _, _, vt = np.linalg.svd(f, full_matrices=False)
    x = f @ vt[:dim].T
    counts = np.bincount(y)
    keep = np.flatnonzero(counts >= 2)
    if len(keep) < 2:
        raise ValueError(f"gbc needs at least 2 classes with 2 or more samples; got {len(keep)}")
    mu = np.stack([x[y == c].mean(0) for c in keep])  # [K, dim]
    var = np.stack([x[y == c].var(0) for c in keep])
    var = np.maximum(var, var_floor * x.var(0).mean())
    avg = (var[:, None] + var[None]) / 2  # [K, K, dim]
    log_var = np.log(var)
    dist = (((mu[:, None] - mu[None]) ** 2 / avg).sum(-1) / 8
            + (np.log(avg).sum(-1) - (log_var.sum(-1)[:, None] + log_var.sum(-1)[None]) / 2) / 2)
    bc = np.exp(-dist)
    np.fill_diagonal(bc, 0.0)
    return float(-bc.sum())


def _coding_rate(z: np.ndarray, eps: float) -> float:
    """½ log det(I_D + ZᵀZ / (n ε)) for Z [n, D], through the smaller Gram matrix
    (det(I + ZᵀZ c) = det(I + Z Zᵀ c))."""
    n = z.shape[0]
    gram = z @ z.T if n < z.shape[1] else z.T @ z
    return 0.5 * np.linalg.slogdet(np.eye(gram.shape[0]) + gram / (n * eps))[1]


def transrate(features: Any, labels: Any, eps: float = 1e-4) -> float:
    """TransRate (Huang et al. 2022, "Frustratingly Easy Transferability Estimation", ICML):
    the coding rate of the features minus their mean class-conditional coding rate,

        TrR = R(Z) − (1/K) Σ_k R(Z_k),  R(Z) = ½ log det(I_D + ZᵀZ / (n ε)),

    Z the features centred on their overall mean, Z_k the rows of class k (n_k of them,
    not re-centred), as the authors' released code (unweighted mean over classes,
    distortion ε = 1e-4). Invariant to rotating and shifting the features and to relabelling
    the classes; not to scaling them (ε is absolute). OPEN (ours): applied to normalised
    embeddings with the code's ε unchanged.
    """
    f, y, k = _inputs(features, labels, "transrate")
    z = f - f.mean(0)
    return float(_coding_rate(z, eps) - sum(_coding_rate(z[y == c], eps) for c in range(k)) / k)


def transfer_scores(features: Any, labels: Any) -> dict[str, float]:
    """Every score, keyed `transfer/<name>` (the embed stage's metrics)."""
    return {"transfer/h_score": h_score(features, labels), "transfer/logme": logme(features, labels),
            "transfer/gbc": gbc(features, labels), "transfer/transrate": transrate(features, labels)}
