import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.metrics import silhouette_score

from pipeline.evaluation.measures import iimm, rsa, silhouette_cosine, silhouettes


def test_iimm_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    t = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    y = torch.randint(0, 5, (40,), generator=g)
    intra = np.mean([float(f[i] @ f[j]) for i in range(40) for j in range(i + 1, 40)])
    inter = np.mean([np.mean([float(f[i] @ t[c]) for c in range(5) if c != y[i]]) for i in range(40)])
    got = iimm(f, y, t)
    assert got["iimm/s_intra"] == pytest.approx(intra, abs=1e-6)
    assert got["iimm/s_inter"] == pytest.approx(inter, abs=1e-6)
    assert got["iimm"] == pytest.approx(0.5 * (intra + inter), abs=1e-6)


def test_silhouette_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    labels = rng.integers(0, 4, size=60)
    labels[0] = 9  # a singleton cluster scores 0, as in scikit-learn
    assert silhouette_cosine(x, labels) == pytest.approx(silhouette_score(x, labels, metric="cosine"), abs=1e-9)


def test_silhouette_variants_named():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(30, 8, generator=g)
    t = torch.randn(3, 8, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    out = silhouettes(f, y, t)
    x = torch.cat([f, t]).double().numpy()
    assert out["silhouette/modality"] == pytest.approx(
        silhouette_score(x, np.r_[np.zeros(30), np.ones(3)], metric="cosine"), abs=1e-9)
    assert out["silhouette/class"] == pytest.approx(
        silhouette_score(x, np.r_[y.numpy(), np.arange(3)], metric="cosine"), abs=1e-9)


def test_rsa():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(20, 8, generator=g)
    assert rsa(z, z) == pytest.approx(1.0)
    assert rsa(z, 3.0 * z) == pytest.approx(1.0)  # scale-free (cosine)
    other = torch.randn(20, 8, generator=g)
    zn, on = F.normalize(z, dim=-1), F.normalize(other, dim=-1)
    iu = np.triu_indices(20, 1)
    want = spearmanr((1 - zn @ zn.T).numpy()[iu], (1 - on @ on.T).numpy()[iu]).statistic
    assert rsa(z, other) == pytest.approx(want, abs=1e-9)


def test_iimm_paper_template_and_ensemble_are_both_reported_by_name():
    """`iimm` uses one template per class (the paper's definition: the prompt file's first),
    `iimm_ensemble` the prompt-ensemble head; S_intra is shared and reported once."""
    from pipeline.evaluation.measures import iimm_measures
    from pipeline.methods.base import EvalModel
    from pipeline.models.zeroshot import build_head
    from tests import methods_fixtures as mf

    model = EvalModel(mf.fresh_model()).eval()
    tokens = mf.class_tokens()  # 3 classes × 2 templates
    x = mf.images(12, seed=3)
    y = torch.arange(12) % 3
    with torch.no_grad():
        f = model.encode_image(x)
        ensemble = build_head(model.encode_text, tokens)
        first = build_head(model.encode_text, tokens[:, :1])
    got = iimm_measures(model, f, y, tokens, ensemble)
    assert set(got) == {"iimm", "iimm/s_intra", "iimm/s_inter", "iimm_ensemble", "iimm_ensemble/s_inter"}
    paper, ens = iimm(f, y, first), iimm(f, y, ensemble)
    for k in ("iimm", "iimm/s_intra", "iimm/s_inter"):
        assert got[k] == pytest.approx(paper[k], abs=1e-9)
    assert got["iimm_ensemble"] == pytest.approx(ens["iimm"], abs=1e-9)
    assert got["iimm_ensemble/s_inter"] == pytest.approx(ens["iimm/s_inter"], abs=1e-9)
    assert abs(got["iimm"] - got["iimm_ensemble"]) > 1e-4  # the two definitions differ here
