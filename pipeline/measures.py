"""Task-difficulty and geometry measures as pure functions of embeddings."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr


def iimm(image: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
         name: str = "iimm") -> dict[str, float]:
    """Inter-Intra Modal Measure (arXiv 2407.15731) of the pre-trained model on target images.

    S_intra = mean_{i<j} f(x_i)·f(x_j);
    S_inter = mean_i (1/(C−1)) Σ_{c≠y_i} f(x_i)·t_c;   IIMM = ½(S_intra + S_inter).
    Inputs are L2-normalised; computed in float64. Keys `name`, `name/s_intra`,
    `name/s_inter`. Which class embeddings t_c are is the caller's choice: the embed stage
    reports the paper's (one template per class) as `iimm` and the prompt ensemble as
    `iimm_ensemble` (`pipeline.embed.iimm_measures`).
    """
    f = F.normalize(image.double(), dim=-1)
    t = F.normalize(class_text.double(), dim=-1)
    n, c = f.shape[0], t.shape[0]
    if n < 2 or c < 2:
        raise ValueError("IIMM needs at least 2 images and 2 classes")
    s = f.sum(0)
    # Σ_{i<j} f_i·f_j = (‖Σ f‖² − Σ‖f_i‖²) / 2
    intra = ((s @ s - (f * f).sum()) / 2) / (n * (n - 1) / 2)
    sims = f @ t.t()
    correct = sims.gather(1, labels.long().view(-1, 1)).squeeze(1)
    inter = ((sims.sum(1) - correct) / (c - 1)).mean()
    return {name: float(0.5 * (intra + inter)), f"{name}/s_intra": float(intra), f"{name}/s_inter": float(inter)}


def silhouette_cosine(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient under cosine distance (scikit-learn's convention:
    points alone in their cluster score 0)."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - xn @ xn.T
    np.fill_diagonal(dist, 0.0)
    clusters, inv = np.unique(labels, return_inverse=True)
    if len(clusters) < 2:
        raise ValueError("silhouette needs at least 2 clusters")
    onehot = np.eye(len(clusters))[inv]  # [N, K]
    sums = dist @ onehot  # distance of each point to each cluster, summed
    sizes = onehot.sum(0)
    own = inv
    own_size = sizes[own]
    a = np.where(own_size > 1, sums[np.arange(len(x)), own] / np.maximum(own_size - 1, 1), 0.0)
    mean_other = sums / sizes
    mean_other[np.arange(len(x)), own] = np.inf
    b = mean_other.min(1)
    s = np.where(own_size > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def silhouettes(image: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor) -> dict[str, float]:
    """Silhouette task-difficulty scores (arXiv 2402.09613) of zero-shot image and class-text
    embeddings, cosine distance. OPEN (ours): both cluster variants are reported —
    `silhouette/modality` (clusters: images vs class texts; high = wide modality gap) and
    `silhouette/class` (clusters: classes, each class text joining its images; high =
    images group around their class text, an easier task)."""
    f = image.double().cpu().numpy()
    t = class_text.double().cpu().numpy()
    x = np.concatenate([f, t])
    modality = np.concatenate([np.zeros(len(f)), np.ones(len(t))])
    classes = np.concatenate([labels.cpu().numpy(), np.arange(len(t))])
    return {"silhouette/modality": silhouette_cosine(x, modality),
            "silhouette/class": silhouette_cosine(x, classes)}


def rdm(z: torch.Tensor) -> torch.Tensor:
    z = F.normalize(z.double(), dim=-1)
    return 1.0 - z @ z.t()


def rsa(pre: torch.Tensor, fine: torch.Tensor) -> float:
    """Representational similarity: Spearman correlation of the upper triangles of the
    RDMs (1 − cosine) of the same samples under two models; 1 = geometry preserved."""
    if pre.shape[0] != fine.shape[0] or pre.shape[0] < 3:
        raise ValueError("RSA needs the same >= 3 samples under both models")
    iu = torch.triu_indices(pre.shape[0], pre.shape[0], offset=1)
    a = rdm(pre)[iu[0], iu[1]].cpu().numpy()
    b = rdm(fine)[iu[0], iu[1]].cpu().numpy()
    return float(spearmanr(a, b).statistic)
