"""Task-difficulty and geometry measures as pure functions of embeddings, and the measure
registry that the embed and evaluate stages compute, MLflow logs and the report shows.

A new measure is its function plus one `register_measure(Measure(...))` (see CONTRIBUTING.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F


def iimm(image: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
         name: str = "iimm") -> dict[str, float]:
    """Inter-Intra Modal Measure (arXiv 2407.15731) of the pre-trained model on target images.

    S_intra = mean_{i<j} f(x_i)·f(x_j);
    S_inter = mean_i (1/(C−1)) Σ_{c≠y_i} f(x_i)·t_c;   IIMM = ½(S_intra + S_inter).
    Inputs are L2-normalised; computed in float64. Keys `name`, `name/s_intra`,
    `name/s_inter`. Which class embeddings t_c are is the caller's choice: the embed stage
    reports the paper's (one template per class) as `iimm` and the prompt ensemble as
    `iimm_ensemble` (`iimm_measures`).
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
    from scipy.stats import spearmanr  # here, not at import: scipy.stats costs ~1 s of every stage's start-up

    return float(spearmanr(a, b).statistic)


# ---------------------------------------------------------------------------------------------
# the registry: what the embed and evaluate stages compute, MLflow logs and the report shows


@dataclass(frozen=True)
class Column:
    """One per-run number the report aggregates over seeds, plots against the level and puts
    in its tables. `key`: the metrics key it reads; `reduce`: or a function of the whole
    metrics dict (e.g. the mean over tasks); `zero_shot`: its value for the pre-trained model
    when it is one by definition (RSA ≡ 1), else the k = 0 run's own value."""

    name: str
    label: str
    key: str | None = None
    reduce: Callable[[dict[str, float]], float] | None = None
    zero_shot: float | None = None
    description: str = ""
    highlight: bool = False  # the report names the best method at the largest level

    def read(self, metrics: dict[str, float], zero: bool) -> float:
        if zero and self.zero_shot is not None:
            return self.zero_shot
        if self.reduce is not None:
            return self.reduce(metrics)
        return metrics.get(self.key, math.nan)


@dataclass(frozen=True)
class Plot:
    """A figure of the measure's columns against the level of data: one panel per column,
    sharing a y range. `reference`: a constant line for the pre-trained model (None: the k = 0
    row's value)."""

    file: str
    title: str
    ylabels: tuple[str, ...]
    reference: float | None = None


@dataclass
class MeasureInputs:
    """What a measure may read; each stage fills what it has (the rest stays None)."""

    model: Any = None  # an EvalModel (normalised embeddings, zero-shot heads)
    device: Any = None
    batch_size: int = 256
    num_workers: int = 0
    transform: Any = None
    tasks: list = field(default_factory=list)  # zero-shot retention tasks (`zeroshot.Retention`)
    task_features: dict | None = None  # image embeddings by task name, already computed
    reference_images: Any = None  # preloaded reference images (tensor) or a dataset
    reference_image_pre: Any = None  # [R, D] pre-trained embeddings of the reference set
    reference_text_pre: Any = None
    reference_tokens: Any = None
    train_features: Any = None  # pre-trained embeddings of a train subsample (embed stage)
    train_labels: Any = None
    class_text: Any = None  # [C, D] normalised class-prompt embeddings (the zero-shot head)
    class_tokens: Any = None  # [C, T, L] tokenised class prompts (all templates)


@dataclass(frozen=True)
class Measure:
    """A registered measure. `stages`: 'embed' (the pre-trained model, once: task difficulty)
    and/or 'evaluate' (every fine-tuned model at every WiSE-FT α). `compute` returns flat
    `name/...` metrics; `columns` and `plot` are what the report shows; `summary_keys` are the
    embed-stage keys the report copies into its DVC metrics as `zeroshot/<key>`.
    `needs_text`: the measure reads the model's text tower (zero-shot heads, text embeddings);
    it is skipped for a model without one (a vision-only baseline), and the report says it
    does not apply instead of showing a number."""

    name: str
    stages: tuple[str, ...]
    compute: Callable[[MeasureInputs], dict[str, float]]
    columns: tuple[Column, ...] = ()
    plot: Plot | None = None
    summary_keys: tuple[str, ...] = ()
    needs_text: bool = False


MEASURES: dict[str, Measure] = {}


def register_measure(measure: Measure) -> Measure:
    for stage in measure.stages:
        if stage not in ("embed", "evaluate"):
            raise ValueError(f"measure {measure.name!r}: unknown stage {stage!r} (embed, evaluate)")
    if measure.name in MEASURES and MEASURES[measure.name] != measure:
        raise ValueError(f"measure name {measure.name!r} registered twice")
    MEASURES[measure.name] = measure
    return measure


def measures_for(stage: str) -> list[Measure]:
    return [m for m in MEASURES.values() if stage in m.stages]


def compute_all(stage: str, inputs: MeasureInputs) -> dict[str, float]:
    """Every measure of `stage` that applies to `inputs.model` (those that need a text tower
    only where the model has one)."""
    text = getattr(inputs.model, "has_text", True)
    out: dict[str, float] = {}
    for m in measures_for(stage):
        if m.needs_text and not text:
            continue
        out.update(m.compute(inputs))
    return out


def text_columns() -> set[str]:
    """The report columns of measures that need a text tower (`Measure.needs_text`)."""
    return {c.name for m in MEASURES.values() if m.needs_text for c in m.columns}


def report_columns() -> list[Column]:
    return [c for m in MEASURES.values() for c in m.columns]


@torch.no_grad()
def iimm_measures(model, image: torch.Tensor, labels: torch.Tensor, class_tokens: torch.Tensor,
                  ensemble_head: torch.Tensor) -> dict[str, float]:
    """IIMM with two definitions of the class embeddings t_c, named:
    - `iimm` (`iimm/s_intra`, `iimm/s_inter`): the paper's. Its code (mit-ll/IIMM,
      `get_tokenized_captions`) embeds one caption template per dataset, e.g. "a satellite
      image of a {c}" for FMoW and "a photo of a {c}" for most others; here that is the
      first template of the dataset's prompt file (each shipped file lists its plainest
      caption first: "satellite photo of a {c}." for FMoW, "a photo of {c}." for iWildCam);
    - `iimm_ensemble` (`iimm_ensemble/s_inter`): t_c = the prompt-ensemble zero-shot head
      (the mean over every template), the head the pipeline classifies with. S_intra does
      not involve t_c, so it is only reported once.
    The ensemble's t_c lie closer to the mean text direction, which shifts S_inter, and so
    IIMM, against the paper's values; the paper's regression lines need `iimm`.
    """
    from pipeline.models.zeroshot import build_head

    device = model.scale.device
    single = build_head(model.encode_text, class_tokens[:, :1].to(device)).cpu()
    out = iimm(image, labels, single, "iimm")
    ensemble = iimm(image, labels, ensemble_head, "iimm_ensemble")
    del ensemble["iimm_ensemble/s_intra"]  # = iimm/s_intra
    return {**out, **ensemble}


def _iimm(x: MeasureInputs) -> dict[str, float]:
    return iimm_measures(x.model, x.train_features, x.train_labels, x.class_tokens, x.class_text)


def _silhouettes(x: MeasureInputs) -> dict[str, float]:
    return silhouettes(x.train_features, x.train_labels, x.class_text)


def _transfer(x: MeasureInputs) -> dict[str, float]:
    from pipeline.evaluation.transfer import transfer_scores

    return transfer_scores(x.train_features, x.train_labels)


def _retention(x: MeasureInputs) -> dict[str, float]:
    from pipeline.evaluation.zeroshot import retention_metrics

    return retention_metrics(x.model, x.tasks, x.transform, x.device, x.batch_size, x.num_workers,
                             features=x.task_features)


def _mean_retention(metrics: dict[str, float]) -> float:
    values = [v for k, v in metrics.items() if k.startswith("zs/") and k.endswith("/acc")]
    return float(np.mean(values)) if values else math.nan


def _rsa(x: MeasureInputs) -> dict[str, float]:
    from pipeline.models.encode import encode_images, encode_texts

    n = x.reference_tokens.shape[0]
    img = encode_images(x.model, x.reference_images, x.device, x.batch_size, desc="eval RSA")
    txt = encode_texts(x.model, x.reference_tokens, x.device)
    return {"rsa/image": rsa(x.reference_image_pre[:n], img), "rsa/text": rsa(x.reference_text_pre[:n], txt)}


register_measure(Measure("iimm", ("embed",), _iimm, summary_keys=(
    "iimm", "iimm/s_intra", "iimm/s_inter", "iimm_ensemble", "iimm_ensemble/s_inter")))
register_measure(Measure("silhouette", ("embed",), _silhouettes,
                         summary_keys=("silhouette/modality", "silhouette/class")))
register_measure(Measure("transfer", ("embed",), _transfer, summary_keys=(
    "transfer/h_score", "transfer/logme", "transfer/gbc", "transfer/transrate")))
register_measure(Measure(
    "retention", ("embed", "evaluate"), _retention,
    # the report's retention section shows the change per task (pipeline/report/retention.py)
    columns=(Column("zs", "ZS acc.", reduce=_mean_retention,
                    description="mean zero-shot accuracy on the retention tasks (changes per task: the retention section)"),),
    needs_text=True,
))
register_measure(Measure(
    "rsa", ("evaluate",), _rsa,
    columns=(Column("rsa_image", "RSA image", key="rsa/image", zero_shot=1.0,
                    description="similarity of the reference-set geometry to the pre-trained model (1 = unchanged)"),
             Column("rsa_text", "RSA text", key="rsa/text", zero_shot=1.0)),
    plot=Plot("rsa_vs_shots.png", "Representation drift: RSA of the reference-set geometry to the "
              "pre-trained model (1 = unchanged)",
              ("RSA to the pre-trained model (image)", "RSA to the pre-trained model (text)"), reference=1.0),
    needs_text=True,
))
