"""The real wilds 2.0.0 classes read the tiny fixtures through the pipeline's loading API."""

import math
import sys
import urllib.error

import pytest
import torch
from PIL import Image

import pipeline  # noqa: F401  (stub `outdated` before wilds)
from pipeline.data import scatter
from pipeline.data.datasets import (
    DATASETS,
    DatasetMissingError,
    get_spec,
    load_dataset,
    load_prompts,
    official_eval,
    task_labels,
)

from .wilds_fixtures import FIXTURES

REAL = sorted(FIXTURES)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Each fixture written once and loaded once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            root = FIXTURES[name](tmp_path_factory.mktemp(name))
            cache[name] = (root, load_dataset(name, root))
        return cache[name]

    return get


def _half_right(y: torch.Tensor, n_classes: int, seed: int = 0) -> torch.Tensor:
    """Predictions that are right about half the time, so metrics are neither 0 nor 1."""
    g = torch.Generator().manual_seed(seed)
    wrong = (y + torch.randint(1, n_classes, y.shape, generator=g)) % n_classes
    return torch.where(torch.rand(y.shape, generator=g) < 0.5, y, wrong)


@pytest.mark.parametrize("name", REAL)
def test_every_split_of_the_spec_loads_images(loaded, name):
    _, dataset = loaded(name)
    spec = DATASETS[name]
    splits = {spec.train_split, *spec.val_splits, *spec.id_splits, *spec.ood_splits}
    for split in splits:
        subset = dataset.get_subset(split)
        assert len(subset) > 0, split
        x, y, metadata = subset[0]
        assert isinstance(x, Image.Image)
        assert 0 <= int(y) < dataset.n_classes
        assert metadata.shape == (len(dataset.metadata_fields),)
    assert len(set(dataset.y_array[dataset.get_subset(spec.train_split).indices].tolist())) > 1
    assert spec.val_splits and all("test" not in s for s in spec.val_splits)


@pytest.mark.parametrize("name", REAL)
def test_shipped_prompts_match_the_loaded_class_count(loaded, name):
    _, dataset = loaded(name)
    assert len(load_prompts(name, n_classes=dataset.n_classes).classnames) == dataset.n_classes


@pytest.mark.parametrize("name", REAL)
def test_official_eval_reports_the_spec_metrics(loaded, name):
    _, dataset = loaded(name)
    spec = DATASETS[name]
    for split in spec.eval_splits:
        idx = dataset.get_subset(split).indices
        y = dataset.y_array[idx]
        pred = _half_right(y, dataset.n_classes)
        results = official_eval(dataset, pred, y, dataset.metadata_array[idx])
        for key in (spec.metric, *spec.extra_metrics):
            assert key in results, (split, key, sorted(results))
            assert isinstance(results[key], float) and 0.0 <= results[key] <= 1.0
        assert all(isinstance(v, float) and not math.isnan(v) for v in results.values())
        if name in DIRECT:  # (fmow, camelyon17 and iwildcam: their own tests below)
            want = DIRECT[name](dataset, pred, y, dataset.metadata_array[idx])
            assert {k: results[k] for k in want} == pytest.approx(want), (name, split)


def _group_accuracies(dataset, pred, y, metadata, fields) -> dict[tuple, float]:
    """Accuracy per combination of the metadata `fields` present in the split, counted here."""
    cols = metadata[:, [dataset.metadata_fields.index(f) for f in fields]]
    groups = {tuple(int(v) for v in row) for row in cols}
    return {g: (pred[mask] == y[mask]).float().mean().item()
            for g in groups for mask in [(cols == torch.tensor(g)).all(1)]}


def _waterbirds(dataset, pred, y, metadata) -> dict[str, float]:
    """Worst (background, bird) group, and the groups' accuracies weighted by the official
    training split's group sizes (Sagawa et al. 2020: 3498 landbirds on land, 184 on water,
    56 waterbirds on land, 1057 on water); a group absent from the split counts 0."""
    acc = _group_accuracies(dataset, pred, y, metadata, ("background", "y"))
    assert len(acc) >= 2
    train_sizes = {(0, 0): 3498, (1, 0): 184, (0, 1): 56, (1, 1): 1057}  # (background, y): 0 land, 1 water
    adj = sum(acc.get(g, 0.0) * n for g, n in train_sizes.items()) / sum(train_sizes.values())
    return {"acc_wg": min(acc.values()), "adj_acc_avg": adj}


def _rxrx1(dataset, pred, y, metadata) -> dict[str, float]:
    """Plain accuracy, each cell type's (the fixture's splits hold 2-4 images per cell type,
    so the worst alone is often 0 whatever the rows' alignment), and the worst."""
    acc = _group_accuracies(dataset, pred, y, metadata, ("cell_type",))
    assert len(acc) >= 2
    names = dataset.metadata_map["cell_type"]
    return {"acc_avg": (pred == y).float().mean().item(), "acc_wg": min(acc.values()),
            **{f"acc_cell_type:{names[g]}": a for (g,), a in acc.items()}}


DIRECT = {"waterbirds": _waterbirds, "rxrx1": _rxrx1}


def test_official_eval_accepts_scores(loaded):
    _, dataset = loaded("camelyon17")
    idx = dataset.get_subset("test").indices
    y = dataset.y_array[idx]
    scores = torch.nn.functional.one_hot(y, 2).float()
    assert official_eval(dataset, scores, y, dataset.metadata_array[idx])["acc_avg"] == 1.0


def test_fmow_worst_region_through_the_scatter_fallback(loaded, monkeypatch):
    """acc_worst_region is group-wise (torch_scatter); check it against a direct computation."""
    _, dataset = loaded("fmow")
    monkeypatch.setitem(sys.modules, "torch_scatter", scatter._fallback_module())
    assert scatter.using_fallback()
    idx = dataset.get_subset("test").indices
    y = dataset.y_array[idx]
    metadata = dataset.metadata_array[idx]
    pred = _half_right(y, 62, seed=3)
    results = official_eval(dataset, pred, y, metadata)

    regions = dataset._metadata_map["region"]
    region_of = metadata[:, dataset.metadata_fields.index("region")]
    per_region = {}
    for r, region in enumerate(regions):
        mask = region_of == r
        if mask.any() and region != "Other":  # wilds ignores the "Other" region
            per_region[region] = (pred[mask] == y[mask]).float().mean().item()
    assert len(per_region) >= 2
    assert results["acc_worst_region"] == pytest.approx(min(per_region.values()))
    for region, acc in per_region.items():
        assert results[f"acc_region:{region}"] == pytest.approx(acc)
    assert results["acc_avg"] == pytest.approx((pred == y).float().mean().item())


def test_camelyon17_acc_avg_and_worst_slide(loaded, monkeypatch):
    _, dataset = loaded("camelyon17")
    monkeypatch.setitem(sys.modules, "torch_scatter", scatter._fallback_module())
    assert "id_test" not in dataset.split_dict
    idx = dataset.get_subset("val").indices
    y = dataset.y_array[idx]
    metadata = dataset.metadata_array[idx]
    pred = _half_right(y, 2, seed=5)
    results = official_eval(dataset, pred, y, metadata)
    slide = metadata[:, dataset.metadata_fields.index("slide")]
    per_slide = [(pred[slide == s] == y[slide == s]).float().mean().item() for s in slide.unique()]
    assert results["acc_avg"] == pytest.approx((pred == y).float().mean().item())
    assert results["acc_wg"] == pytest.approx(min(per_slide))


def test_iwildcam_macro_f1(loaded):
    from sklearn.metrics import f1_score

    _, dataset = loaded("iwildcam")
    idx = dataset.get_subset("id_test").indices
    y = dataset.y_array[idx]
    pred = _half_right(y, dataset.n_classes, seed=7)
    results = official_eval(dataset, pred, y, dataset.metadata_array[idx])
    assert results["F1-macro_all"] == pytest.approx(
        f1_score(y.numpy(), pred.numpy(), average="macro", labels=torch.unique(y).numpy())
    )


def test_task_labels_reads_y_and_metadata_columns(loaded):
    _, dataset = loaded("iwildcam")
    subset = dataset.get_subset("val")
    location = dataset.metadata_fields.index("location")
    assert torch.equal(task_labels(dataset, subset.indices, "y"), dataset.y_array[subset.indices].long())
    assert torch.equal(task_labels(dataset, subset, "location"), dataset.metadata_array[subset.indices, location])
    assert torch.equal(task_labels(dataset, torch.tensor([0, 1]), "y"), dataset.y_array[:2].long())
    with pytest.raises(ValueError, match="colour"):
        task_labels(dataset, subset.indices, "colour")


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(DatasetMissingError) as err:
        load_dataset("iwildcam", tmp_path, download=False)
    message = str(err.value)
    folder = tmp_path / "iwildcam_v2.0"
    assert str(folder) in message
    assert "RELEASE_v2.0.txt" in message
    assert "download" in message and "dataset.download: true" in message
    assert "wilds.download_datasets" in message
    assert isinstance(err.value, FileNotFoundError)
    assert not folder.exists()  # nothing was created on the way


def test_folder_without_release_marker_counts_as_missing(tmp_path):
    folder = tmp_path / "fmow_v1.1"
    folder.mkdir()
    (folder / "rgb_metadata.csv").write_text("split\n")
    with pytest.raises(DatasetMissingError, match="RELEASE_v1.1.txt"):
        load_dataset("fmow", tmp_path)


def test_failed_download_cleans_up_and_keeps_the_original_error(tmp_path, monkeypatch, capsys):
    """Offline, wilds prints the network error and leaves an empty folder (never a real download here)."""
    import wilds.datasets.download_utils as download_utils

    def offline(url, download_root, filename=None, remove_finished=False, size=None, **kwargs):
        download_root = __import__("pathlib").Path(download_root)
        download_root.mkdir(parents=True, exist_ok=True)
        (download_root / filename).write_bytes(b"")  # the empty partial archive urlretrieve leaves
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(download_utils, "download_and_extract_archive", offline)
    root = tmp_path / "data"
    root.mkdir()
    (root / "keep.txt").write_text("unrelated")
    with pytest.raises(DatasetMissingError) as err:
        load_dataset("waterbirds", root, download=True)
    message = str(err.value)
    assert "Name or service not known" in message
    assert str(root / "waterbirds_v1.0") in message and "dataset.download" in message
    assert err.value.__cause__ is not None
    assert not (root / "waterbirds_v1.0").exists()
    assert (root / "keep.txt").read_text() == "unrelated"
    assert "Downloading dataset" in capsys.readouterr().out  # wilds' own output still shown


def test_failed_download_removes_a_data_root_it_created(tmp_path, monkeypatch):
    import wilds.datasets.download_utils as download_utils

    def offline(url, download_root, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(download_utils, "download_and_extract_archive", offline)
    root = tmp_path / "new_root"
    with pytest.raises(DatasetMissingError, match="network unreachable"):
        load_dataset("camelyon17", root, download=True)
    assert not root.exists()


def test_unknown_dataset_names_the_params_key():
    with pytest.raises(ValueError) as err:
        get_spec("imagenet")
    message = str(err.value)
    assert "dataset.name" in message and "'imagenet'" in message
    assert all(name in message for name in DATASETS)
    with pytest.raises(ValueError, match="dataset.name"):
        load_dataset("imagenet", "/nonexistent")


def test_table_facts():
    assert set(DATASETS) == {"synthetic", "custom", "iwildcam", "fmow", "camelyon17", "rxrx1", "waterbirds"}
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert spec.ood_val == "val"  # the WILDS official (OOD) validation split
        assert spec.id_val in (None, "id_val")
        assert not set(spec.id_splits) & set(spec.ood_splits)
        assert spec.train_split == "train"
    synthetic = DATASETS["synthetic"]
    assert synthetic.folder("/d").as_posix() == "/d/synthetic_v1.0"
    assert [t.name for t in synthetic.retention_tasks] == ["synthetic/heldout-shapes", "synthetic/colour"]
    assert [t.kind for t in synthetic.retention_tasks] == ["folder", "dataset"]
    assert all(t.dataset == "synthetic" for t in synthetic.retention_tasks)
    assert DATASETS["camelyon17"].id_splits == ("id_val",)
    assert DATASETS["fmow"].metric == "acc_worst_region"
