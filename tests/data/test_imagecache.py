"""The prepared image cache: evaluation from it is bit-identical to evaluation from the original
files (format raw), close with format jpeg; training augmentation differs by a resampling only;
the key follows the model's resize step and nothing else; a cache for another key is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline  # noqa: F401  (offline environment setup)
from pipeline import models
from pipeline.core.validation import parse
from pipeline.data.custom import CustomConfig, generate_dataset
from pipeline.data.datasets import load_dataset
from pipeline.data.imagecache import CacheMismatch, ImageCache, build, image_key, resize_step
from pipeline.data.torchdata import ImageFiles, LabeledImages


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """A custom dataset of real JPEG files larger than the model's input and not square (so the
    resize and the centre crop both do something), with a cache of each format."""
    tmp = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    lines = []
    for d, domain in enumerate(("a", "b", "c")):
        for label in ("cat", "dog"):
            (tmp / "img" / domain / label).mkdir(parents=True)
            for i in range(4):
                x = np.linspace(0, 255, 72)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))
                pixels = np.clip(x + rng.normal(0, 25, (45, 72, 3)), 0, 255).astype(np.uint8)
                path = tmp / "img" / domain / label / f"{i}.jpg"
                Image.fromarray(pixels).save(path, quality=90)
                lines.append(f"img/{domain}/{label}/{i}.jpg,{label},{domain}")
    (tmp / "data.csv").write_text("path,label,domain\n" + "\n".join(lines) + "\n")
    cfg = parse(CustomConfig, {"csv": str(tmp / "data.csv"), "id_domains": ["a", "b"], "ood_domains": ["c"]},
                "prepare.custom")
    generate_dataset(tmp / "wilds", cfg)
    dataset = load_dataset("custom", tmp / "wilds")
    clip = models.create("tiny-clip")
    rows = list(range(len(dataset)))
    caches = {}
    for fmt in ("raw", "jpeg"):
        key = image_key("custom", clip.preprocess_val, fmt, 95)
        build(tmp / fmt, key, resize_step(clip.preprocess_val), [("main", dataset.get_input, rows)])
        caches[fmt] = ImageCache.open(tmp / fmt, key)
    return dataset, clip, caches, tmp


def _eval_tensors(dataset, transform, num_workers=0) -> torch.Tensor:
    items = LabeledImages(dataset, range(len(dataset)), transform)
    loader = torch.utils.data.DataLoader(items, batch_size=8, num_workers=num_workers)
    return torch.cat([b["image"] for b in loader])


def test_a_raw_cache_evaluates_bit_identically(custom):
    dataset, clip, caches, _ = custom
    assert dataset.get_input(0).size == (72, 45)
    cached = caches["raw"].dataset("main", dataset)
    assert cached.get_input(0).size == (51, 32)  # the shorter side at the model's 32 px
    original = _eval_tensors(dataset, clip.preprocess_val)
    assert torch.equal(original, _eval_tensors(cached, clip.preprocess_val))
    # DataLoader workers map the file themselves (nothing but the path is pickled)
    assert torch.equal(original, _eval_tensors(cached, clip.preprocess_val, num_workers=1))
    # everything but the images is the dataset's own
    assert cached.split_dict == dataset.split_dict and torch.equal(cached.y_array, dataset.y_array)


def test_a_jpeg_cache_differs_by_its_encoding_only(custom):
    dataset, clip, caches, _ = custom
    original = _eval_tensors(dataset, clip.preprocess_val)
    cached = _eval_tensors(caches["jpeg"].dataset("main", dataset), clip.preprocess_val)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[None, :, None, None]
    err = ((cached - original) * std * 255).abs()  # in levels of 255
    # noisy pixels are JPEG's worst case: 2.7 levels on average here, 16 at most
    assert 0 < err.mean() < 4.0 and err.max() < 32, (err.mean(), err.max())


def test_training_crops_from_the_cache_are_the_same_augmentation(custom):
    """RandomResizedCrop takes the same relative box from the 32-px image instead of the
    original: the same draws, a resampling difference."""
    dataset, clip, caches, _ = custom
    cached = caches["raw"].dataset("main", dataset)
    diffs, spread = [], []
    for i in range(len(dataset)):
        torch.manual_seed(i)
        a = clip.preprocess_train(dataset.get_input(i).convert("RGB"))
        torch.manual_seed(i)
        b = clip.preprocess_train(cached.get_input(i))
        diffs.append((a - b).abs().mean())
        spread.append((a - clip.preprocess_train(dataset.get_input((i + 1) % len(dataset)).convert("RGB"))).abs().mean())
    assert torch.stack(diffs).mean() < 0.1 * torch.stack(spread).mean()


def test_reference_files_read_from_the_cache(custom, tmp_path):
    dataset, clip, _, _ = custom
    files = [tmp_path / f"{j}.jpg" for j in range(3)]
    for j, f in enumerate(files):
        dataset.get_input(j).save(f, quality=95)
    key = image_key("custom", clip.preprocess_val, "raw", 95)

    def source(j):
        return Image.open(files[j])

    build(tmp_path / "c", key, resize_step(clip.preprocess_val), [("reference", source, [0, 1, 2])])
    store = ImageCache.open(tmp_path / "c", key).store("reference")
    for j in range(3):
        assert torch.equal(ImageFiles(files, clip.preprocess_val)[j], ImageFiles(files, clip.preprocess_val, store)[j])


def test_the_key_follows_the_resize_step_only(tmp_path):
    import open_clip

    tiny = models.create("tiny-clip").preprocess_val
    cfg = json.loads((models.CONFIG_DIR / "tiny-clip.json").read_text())
    cfg["vision_cfg"]["width"] = 64  # another architecture, the same 32-px input
    (tmp_path / "tiny-clip-narrow.json").write_text(json.dumps(cfg))
    cfg["vision_cfg"]["image_size"] = 48
    (tmp_path / "tiny-clip-48.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    assert image_key("x", models.create("tiny-clip-narrow").preprocess_val, "raw", 95) == image_key("x", tiny, "raw", 95)
    bigger = image_key("x", models.create("tiny-clip-48").preprocess_val, "raw", 95)
    assert bigger != image_key("x", tiny, "raw", 95) and "size=48" in bigger["resize"]
    assert image_key("x", tiny, "raw", 95) != image_key("y", tiny, "raw", 95)
    assert image_key("x", tiny, "jpeg", 90) != image_key("x", tiny, "jpeg", 95)
    assert image_key("x", tiny, "none", 95) == {"dataset": "x", "format": "none"}


def test_a_cache_built_for_another_key_is_refused(custom):
    dataset, clip, _, tmp = custom
    other = image_key("custom", clip.preprocess_val, "jpeg", 80)
    with pytest.raises(CacheMismatch, match=r"dvc repro images"):
        ImageCache.open(tmp / "raw", other)
    with pytest.raises(FileNotFoundError, match=r"dvc repro images"):
        ImageCache.open(tmp / "nothing", other)
    store = ImageCache.open(tmp / "raw", image_key("custom", clip.preprocess_val, "raw", 95)).store("main")
    with pytest.raises(KeyError, match="row 999"):
        store.get(999)


def test_format_none_reads_the_originals(custom, tmp_path):
    dataset, clip, _, _ = custom
    key = image_key("custom", clip.preprocess_val, "none", 95)
    index = build(tmp_path / "none", key, None, [("main", dataset.get_input, [0, 1])])
    assert index["collections"] == {} and not list((tmp_path / "none").glob("*.bin"))
    assert ImageCache.open(tmp_path / "none", key).dataset("main", dataset) is dataset
