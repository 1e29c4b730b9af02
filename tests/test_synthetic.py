"""The built-in synthetic WILDS-style dataset and caption corpus (pipeline/data/synthetic.py)."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

import pipeline  # noqa: F401
from pipeline.data import synthetic as syn
import pipeline.data.synthetic.dataset  # noqa: F401  (syn.dataset, patched below)
from pipeline.data.synthetic import SyntheticConfig, SyntheticDataset, generate_corpus, generate_dataset

# Fewer corpus images than `small()`: these tests compare every file byte for byte.
CFG = dataclasses.replace(SyntheticConfig.small(), n_corpus=400)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, CFG, workers=1)
    return root


@pytest.fixture(scope="module")
def dataset(root) -> SyntheticDataset:
    return SyntheticDataset(root_dir=str(root))


def test_generation_is_deterministic_per_seed(root, tmp_path):
    first = _tree(root / syn.FOLDER)
    again = generate_dataset(tmp_path / "again", CFG, workers=2)  # the worker count must not matter
    assert _tree(again) == first
    other = _tree(generate_dataset(tmp_path / "other", dataclasses.replace(CFG, seed=1), workers=1))
    assert other["metadata.csv"] != first["metadata.csv"]
    images = [k for k in first if k.startswith("images/")]
    assert sum(first[k] != other[k] for k in images) > 0.9 * len(images)
    held, held_other = ([k for k in tree if k.startswith("heldout/")] for tree in (first, other))
    assert len(held) == len(held_other) == CFG.n_heldout and set(held) != set(held_other)


def test_heldout_shapes_are_a_class_folder_the_task_never_shows(root, dataset):
    """The held-out shapes: equally many per shape, in heldout/<shape>/, never a class or a
    file of any split; the corpus names them as often as the task's shapes."""
    from pipeline.data.folder import ImageFolderDataset
    from pipeline.data.synthetic.render import _corpus_items

    folder = ImageFolderDataset(root / syn.FOLDER / "heldout")
    assert folder.classes == tuple(sorted(syn.HELDOUT_SHAPES))
    assert torch.bincount(folder.y_array).tolist() == [CFG.n_heldout // len(syn.HELDOUT_SHAPES)] * len(syn.HELDOUT_SHAPES)
    assert not set(syn.HELDOUT_SHAPES) & set(dataset.attributes["y"])
    assert not any(str(f).startswith("heldout") for f in dataset._input_array)
    counts = np.bincount([i.shape for i in _corpus_items(SyntheticConfig())], minlength=len(syn.ALL_SHAPES))
    assert counts.min() > 0.97 * counts.mean() and counts.max() < 1.03 * counts.mean()  # all shapes alike


def test_metadata_columns_and_files(root):
    folder = root / syn.FOLDER
    assert (folder / f"RELEASE_v{syn.VERSION}.txt").is_file()
    with open(folder / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"filename", "y", "split", "domain", "colour", "size", "texture"} <= set(rows[0])
    assert len(rows) == sum(CFG.split_size(s) for s in syn.SPLITS)
    assert {r["split"] for r in rows} == set(syn.SPLITS)
    for r in rows[:50]:
        assert (folder / r["filename"]).is_file()


def test_dataset_splits_domains_and_inputs(dataset):
    assert dataset.n_classes == len(syn.SHAPES)
    assert dataset.metadata_fields[:5] == ["domain", "colour", "size", "texture", "y"]
    fields = dataset.metadata_fields
    domains = {}
    for split in ("train", "id_val", "id_test", "val", "test"):
        subset = dataset.get_subset(split)
        assert len(subset) == CFG.split_size(split) > 0
        domains[split] = set(subset.metadata_array[:, fields.index("domain")].tolist())
        y = subset.metadata_array[:, fields.index("y")]
        assert torch.equal(y, subset.y_array)
    id_domains = domains["train"] | domains["id_val"] | domains["id_test"]
    ood_domains = domains["val"] | domains["test"]
    assert id_domains and ood_domains and not id_domains & ood_domains
    names = dataset.metadata_map["domain"]
    assert {names[d] for d in id_domains} <= set(CFG.id_domains)
    assert {names[d] for d in ood_domains} <= set(CFG.ood_domains)

    x, y, metadata = dataset.get_subset("test")[0]
    assert isinstance(x, Image.Image) and x.mode == "RGB" and x.size == (CFG.image_size, CFG.image_size)
    assert int(y) == int(metadata[fields.index("y")])


def test_spurious_colour_holds_in_id_only(dataset):
    fields = dataset.metadata_fields
    meta = dataset.metadata_array
    preferred = meta[:, fields.index("colour")] == meta[:, fields.index("y")] % len(syn.COLOURS)
    split = torch.as_tensor(dataset.split_array)
    id_mask = torch.isin(split, torch.tensor([dataset.split_dict[s] for s in syn.ID_SPLITS]))
    assert preferred[id_mask].float().mean() > 0.45  # spurious 0.5 + uniform share
    assert preferred[~id_mask].float().mean() < 0.3  # uniform: 1/6


@pytest.mark.parametrize("split", ["id_test", "test"])
def test_eval_matches_direct_computation(dataset, split):
    subset = dataset.get_subset(split)
    y_true = subset.y_array
    metadata = subset.metadata_array
    gen = torch.Generator().manual_seed(0)
    # Random predictions that are right about half the time, so accuracy varies by domain.
    y_pred = torch.where(torch.rand(len(y_true), generator=gen) < 0.5, y_true,
                         torch.randint(0, dataset.n_classes, (len(y_true),), generator=gen))
    results, text = dataset.eval(y_pred, y_true, metadata)

    correct = (y_pred == y_true).float()
    assert results["acc_avg"] == pytest.approx(correct.mean().item())
    expected_f1 = f1_score(y_true.numpy(), y_pred.numpy(), average="macro", labels=np.unique(y_true.numpy()))
    assert results["F1-macro_all"] == pytest.approx(expected_f1)
    domain = metadata[:, dataset.metadata_fields.index("domain")]
    per_domain = [correct[domain == d].mean().item() for d in domain.unique()]
    assert results["acc_worst_domain"] == pytest.approx(min(per_domain))
    name = dataset.metadata_map["domain"][int(domain[0])]
    assert results[f"acc_domain:{name}"] == pytest.approx(correct[domain == domain[0]].mean().item())
    assert "acc_wg" not in results and isinstance(text, str)

    # Scores plus a prediction_fn give the same numbers as labels.
    scores = torch.nn.functional.one_hot(y_pred, dataset.n_classes).float()
    same, _ = dataset.eval(scores, y_true, metadata, prediction_fn=lambda s: s.argmax(-1))
    assert same == results


def test_corpus_csv(tmp_path):
    cfg = dataclasses.replace(CFG, n_corpus=300)
    csv_path = generate_corpus(tmp_path / "corpus", cfg, workers=1)
    assert csv_path == tmp_path / "corpus" / "corpus.csv"
    assert csv_path.read_text().splitlines()[0] == "filepath,title,label"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == cfg.n_corpus
    for row in rows:
        assert (csv_path.parent / row["filepath"]).is_file()
        assert row["title"].strip()
        # the label (what a vision-only model pre-trains on) is the shape the caption names
        assert row["label"] in syn.ALL_SHAPES and row["label"] in row["title"], row
    titles = [r["title"] for r in rows]
    assert sum(any(s in t for s in syn.ALL_SHAPES) for t in titles) > 0.8 * len(titles)
    assert sum(any(s in t for s in syn.HELDOUT_SHAPES) for t in titles) > 0.2 * len(titles)  # 4 of 12 shapes
    assert len(set(titles)) > 0.5 * len(titles)  # varied phrasings
    # Deterministic too, whatever the worker count.
    again = generate_corpus(tmp_path / "again", cfg, workers=2)
    assert _tree(again.parent) == _tree(csv_path.parent)


def test_corpus_covers_every_background_and_combination():
    attributes = len(syn.ALL_SHAPES) * len(syn.COLOURS) * len(syn.SIZES) * len(syn.TEXTURES)
    n_scenes = attributes * len(CFG.domains)
    # a share of 0.5 and n = 2 × one full cycle of the scenes: studio items cover every
    # attribute combination len(domains) times, scene items every (attributes, background) once
    items = syn._corpus_items(dataclasses.replace(CFG, n_corpus=2 * n_scenes, corpus_studio=0.5))
    studio = len(CFG.domains)
    scenes = [(i.shape, i.colour, i.size, i.texture, i.domain) for i in items if i.domain != studio]
    plain = [(i.shape, i.colour, i.size, i.texture) for i in items if i.domain == studio]
    assert len(scenes) == len(plain) == n_scenes
    assert len(set(scenes)) == n_scenes
    assert all(count == len(CFG.domains) for count in collections.Counter(plain).values())
    assert len(set(plain)) == attributes
    assert CFG.corpus_backgrounds[studio] == syn.STUDIO


def test_caption_rates_name_attributes_that_often():
    cfg = dataclasses.replace(CFG, caption_rates=(1.0, 0.0, 0.0, 0.0, 1.0))
    rng = np.random.default_rng(0)
    item = syn._Item(shape=3, colour=0, size=0, texture=1, domain=0)
    for _ in range(20):
        title = syn._caption(item, cfg, rng)
        assert "star" in title and CFG.domains[0] in title
        assert "red" not in title and "striped" not in title and "stripes" not in title
    with pytest.raises(ValueError, match="caption_rates"):
        dataclasses.replace(CFG, caption_rates=(1.0, 0.5))


def test_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        SyntheticDataset(root_dir=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert str(tmp_path / "nowhere" / syn.FOLDER) in message
    assert "prepare" in message


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = syn._render

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 50:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(syn.dataset, "_render", failing)  # the writer's own reference
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, CFG, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_prompt_file_matches_the_vocabulary():
    from pipeline.data.datasets import load_prompts

    prompts = load_prompts("synthetic", n_classes=len(syn.SHAPES))
    assert prompts.classnames == syn.SHAPES
    assert load_prompts("synthetic", task="colour").classnames == tuple(syn.COLOURS)
    assert load_prompts("synthetic", task="texture").classnames == syn.TEXTURES
    held = load_prompts("synthetic", task="heldout")
    assert held.classnames == syn.HELDOUT_SHAPES and held.templates == prompts.templates  # phrased as the task
    data = json.loads((Path(syn.__file__).parents[1] / "prompts" / "synthetic.json").read_text())
    for task in data["tasks"].values():
        assert all("{c}" in t for t in task.get("templates", data["templates"]))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="id_domains"):
        SyntheticConfig(id_domains=("grass", "moon"))
    with pytest.raises(ValueError, match="only once"):
        SyntheticConfig(id_domains=("grass",), ood_domains=("grass",))
    with pytest.raises(ValueError, match="spurious"):
        SyntheticConfig(spurious=1.5)


# ---------------------------------------------------------------------------------------------
# the family of tasks (`label`)

# Digests of CFG's files as the generator wrote them before `label` existed: the shape task
# (the default) must stay byte-identical, images and labels.
SHAPE_TASK_METADATA_SHA256 = "dc68db714972830399a87ca9abfcde36237e39041aa1697a4c5571d6211ff322"
SHAPE_TASK_IMAGES_SHA256 = "2521e0cea77d433ea65e32833f8007f3dac2fb23c9498ec682d298260d6277fd"


def test_the_shape_task_is_the_historic_dataset(root):
    import hashlib

    folder = root / syn.FOLDER
    assert hashlib.sha256((folder / "metadata.csv").read_bytes()).hexdigest() == SHAPE_TASK_METADATA_SHA256
    images = hashlib.sha256()
    for path in sorted((folder / "images").glob("*.png")):
        images.update(path.read_bytes())
    assert images.hexdigest() == SHAPE_TASK_IMAGES_SHA256


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, SyntheticDataset]:
    """A small dataset per non-default label."""
    out = {}
    for label in ("colour", "texture", "size"):
        root = tmp_path_factory.mktemp(f"synthetic-{label}")
        cfg = dataclasses.replace(CFG, label=label, n_train=600, n_heldout=4, n_val=50, n_id_val=50)
        generate_dataset(root, cfg, workers=1)
        out[label] = SyntheticDataset(root_dir=str(root))
    return out


@pytest.mark.parametrize("label", ["colour", "texture", "size"])
def test_a_label_is_y_with_its_own_classes_and_prompts(labelled, label):
    from pipeline.data.datasets import load_prompts

    ds = labelled[label]
    classes = syn.LABELS[label]
    assert ds.n_classes == len(classes) and ds.metadata_map["y"] == list(classes)
    fields = ds.metadata_fields
    assert {"domain", "colour", "size", "texture", "shape", "y"} <= set(fields)
    meta = ds.metadata_array
    assert torch.equal(ds.y_array, meta[:, fields.index(label)])  # y is that attribute
    assert set(ds.y_array.tolist()) == set(range(len(classes)))
    assert set(meta[:, fields.index("shape")].tolist()) <= set(range(len(syn.SHAPES)))
    # the zero-shot head's prompts: the label's class names, in label order
    prompts = load_prompts("synthetic", n_classes=ds.n_classes, dataset=ds)
    assert prompts.classnames == classes
    assert prompts.templates == load_prompts("synthetic", task=label).templates
    # retention tasks still find their prompts in the task's file (the shape too)
    assert load_prompts("synthetic", task="heldout", dataset=ds).classnames == syn.HELDOUT_SHAPES
    assert load_prompts("synthetic", task="shape", dataset=ds).classnames == syn.SHAPES


@pytest.mark.parametrize("label", ["colour", "texture", "size"])
def test_the_shortcut_of_a_label_holds_in_id_only(labelled, label):
    ds = labelled[label]
    shortcut = "shape" if label == "colour" else "colour"
    n = len(syn.LABELS[shortcut])
    assert ds.attributes["shortcut"] == shortcut
    fields = ds.metadata_fields
    meta = ds.metadata_array
    preferred = meta[:, fields.index(shortcut)] == meta[:, fields.index("y")] % n
    split = torch.as_tensor(ds.split_array)
    id_mask = torch.isin(split, torch.tensor([ds.split_dict[s] for s in syn.ID_SPLITS]))
    expected_id = CFG.spurious + (1 - CFG.spurious) / n
    assert abs(preferred[id_mask].float().mean().item() - expected_id) < 0.06
    assert abs(preferred[~id_mask].float().mean().item() - 1 / n) < 0.06


def test_the_corpus_is_the_same_for_every_label(tmp_path):
    cfg = dataclasses.replace(CFG, n_corpus=60)
    shape = _tree(generate_corpus(tmp_path / "shape", cfg, workers=1).parent)
    for label in ("colour", "size"):
        assert _tree(generate_corpus(tmp_path / label, dataclasses.replace(cfg, label=label), workers=1).parent) == shape


def test_prompt_file_names_every_label():
    from pipeline.data.datasets import load_prompts

    for label, classes in syn.LABELS.items():
        prompts = load_prompts("synthetic", task=None if label == "shape" else label)
        assert prompts.classnames == classes


def test_a_bad_label_names_the_key_and_the_allowed_values():
    from pipeline.core.validation import ParamsError, parse

    with pytest.raises(ParamsError) as err:
        parse(SyntheticConfig, {"label": "background"}, "prepare.synthetic")
    message = str(err.value)
    assert message.startswith("prepare.synthetic.label: 'background' is not allowed")
    assert all(label in message for label in ("shape", "colour", "texture", "size"))
    assert "domain" in message
