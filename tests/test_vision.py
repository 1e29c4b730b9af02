"""The vision-only backbone: the linear head through the pipeline's one classification rule,
weights files in timm's keys, the transforms it shares with the CLIP, and its pre-training on
a corpus's labels."""

from __future__ import annotations

import csv

import pipeline  # noqa: F401
import pytest
import torch
from safetensors.torch import save_file

from pipeline import models
from pipeline.models import vision
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)


def test_the_eval_model_computes_the_linear_heads_logits():
    torch.manual_seed(0)
    backbone = vision.build("tiny-vit", 32).eval()
    head = torch.nn.Linear(backbone.num_features, 5)
    x = torch.randn(7, 3, 32, 32)
    model = vision.VisionEvalModel(backbone, head.weight, head.bias)
    with torch.no_grad():
        logits = model.encode_image(x) @ model.task_head().t()  # split_metrics' rule
        torch.testing.assert_close(logits, head(backbone.encode_image(x)), rtol=1e-5, atol=1e-5)
    assert not model.has_text
    with pytest.raises(ValueError, match="no text tower"):
        model.zeroshot_head(torch.zeros(5, 1, 4, dtype=torch.long))


def test_a_timm_weights_file_loads_without_its_classifier(tmp_path):
    import timm

    torch.manual_seed(1)
    cfg = dict(vision.TINY_VIT)
    name = cfg.pop("model_name")
    full = timm.create_model(name, pretrained=False, num_classes=1000, img_size=32, **cfg)  # an ImageNet head
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    backbone = vision.build("tiny-vit", 32)
    vision.load_checked(backbone, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(x), full.forward_head(full.forward_features(x), pre_logits=True))


def test_weights_that_do_not_fit_name_the_key(tmp_path):
    other = vision.build("resnet18", 32)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.visual.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"vision\.pretrained: .*does not fit architecture 'tiny-vit'"):
        vision.load_checked(vision.build("tiny-vit", 32), path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match=r"^vision\.pretrained: .*not a readable weights file"):
        vision.load_checked(vision.build("tiny-vit", 32), garbage)
    with pytest.raises(ValueError, match=r"vision\.arch: unknown architecture 'no-such-net'"):
        vision.check_arch("no-such-net")


def test_it_sees_the_clips_pixels_with_its_own_normalisation():
    """Same resize, crop and augmentation as the CLIP (the image cache serves both), ImageNet's
    mean and std instead of CLIP's."""
    from PIL import Image
    from torchvision.transforms import Normalize

    clip = models.create("tiny-clip")
    v = vision.create("tiny-vit", clip)
    img = Image.new("RGB", (50, 40), (200, 30, 90))
    a, b = clip.preprocess_val(img), v.preprocess_val(img)
    clip_norm = next(t for t in clip.preprocess_val.transforms if isinstance(t, Normalize))
    mean, std = torch.tensor(vision.IMAGENET_MEAN)[:, None, None], torch.tensor(vision.IMAGENET_STD)[:, None, None]
    pixels = a * torch.tensor(clip_norm.std)[:, None, None] + torch.tensor(clip_norm.mean)[:, None, None]
    torch.testing.assert_close(b, (pixels - mean) / std, rtol=1e-5, atol=1e-5)
    assert [type(t) for t in v.preprocess_train.transforms] == [type(t) for t in clip.preprocess_train.transforms]
    assert v.model.visual.patch_embed.img_size == (clip.image_size, clip.image_size)


def _corpus(tmp_path, n=64, label=True):
    from PIL import Image

    (tmp_path / "img").mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        cls = i % 2  # a dark class and a bright one: learnable in a few steps
        pixel = torch.randint(0, 90, (3,), generator=g) + 160 * cls
        Image.new("RGB", (32, 32), tuple(int(v) for v in pixel)).save(tmp_path / "img" / f"{i}.png")
        rows.append((f"img/{i}.png", f"a {'bright' if cls else 'dark'} square", ["dark", "bright"][cls]))
    path = tmp_path / "corpus.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("filepath", "title", "label") if label else ("filepath", "title"))
        w.writerows(r if label else r[:2] for r in rows)
    return path


def test_pretraining_on_the_corpus_labels_learns_and_is_deterministic(tmp_path):
    from pipeline.training.pretrain import PretrainConfig, pretrain_vision

    corpus = _corpus(tmp_path)
    clip = models.create("tiny-clip")
    cfg = PretrainConfig(steps=30, batch_size=16, lr=1e-3, warmup=3)
    a = pretrain_vision("tiny-vit", clip, corpus, cfg, tmp_path / "a.safetensors", progress=False)
    b = pretrain_vision("tiny-vit", clip, corpus, cfg, tmp_path / "b.safetensors", progress=False)
    assert a["sha256"] == b["sha256"]  # same config, same bits
    assert a["classes"] == 2 and a["final_loss"] < a["first_loss"]
    backbone = vision.build("tiny-vit", 32)
    vision.load_checked(backbone, tmp_path / "a.safetensors")  # the saved backbone loads back


def test_a_corpus_without_labels_says_what_is_missing(tmp_path):
    from pipeline.training.pretrain import corpus_labels

    with pytest.raises(ValueError, match=r"pre-trains on the corpus's `label` column.*vision\.pretrained"):
        corpus_labels(_corpus(tmp_path, n=4, label=False))
