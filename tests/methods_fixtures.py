"""A tiny real open_clip CLIP (ViT image tower + text tower) and a TaskContext around it.

Registered under its own name from a temporary config directory, so the tests depend on no
config shipped in `pipeline/models/configs/`. The towers have different widths (48 / 32) so
that a method mixing them up fails.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pipeline  # noqa: F401  (first, as everywhere)
import open_clip
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.base import ReferenceData, TaskContext
from pipeline.models.zeroshot import build_head, tokenize_prompts

ARCH = "methods-test-tiny-vit"
CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASSES = ["circle", "square", "triangle"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
IMAGE_SIZE = CONFIG["vision_cfg"]["image_size"]


@functools.cache
def register_tiny() -> str:
    folder = Path(tempfile.mkdtemp(prefix="methods-configs-"))
    (folder / f"{ARCH}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder)
    return ARCH


@functools.cache
def _pretrained_state() -> dict[str, torch.Tensor]:
    register_tiny()
    with torch.random.fork_rng(devices=[]):  # fixed weights without moving the global RNG
        torch.manual_seed(1234)
        model = open_clip.create_model(ARCH, pretrained=None)
    return {k: v.clone() for k, v in model.state_dict().items()}


def fresh_model() -> torch.nn.Module:
    """The tiny model with the fixed "pre-trained" weights, in eval mode."""
    register_tiny()
    model = open_clip.create_model(ARCH, pretrained=None)
    model.load_state_dict(_pretrained_state())
    return model.eval()


@functools.cache
def _vision_state() -> dict[str, torch.Tensor]:
    from pipeline.models import vision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        model = vision.build("tiny-vit", IMAGE_SIZE)
    return {k: v.clone() for k, v in model.state_dict().items()}


def fresh_vision_model() -> torch.nn.Module:
    """The built-in tiny vision-only backbone (timm ViT) with fixed "pre-trained" weights."""
    from pipeline.models import vision

    model = vision.build("tiny-vit", IMAGE_SIZE)
    model.load_state_dict(_vision_state())
    return model.eval()


def fresh_for(method_cls) -> torch.nn.Module:
    """The pre-trained model a method starts from (its `backbone`)."""
    return fresh_vision_model() if method_cls.backbone == "vision" else fresh_model()


@functools.cache
def class_tokens() -> torch.Tensor:
    tok = open_clip.get_tokenizer(register_tiny())
    return tokenize_prompts(tok, [[t.format(c) for t in TEMPLATES] for c in CLASSES])


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def train_items(per_class: int = 4, seed: int = 0, with_images: bool = True) -> ListDataset:
    n = per_class * len(CLASSES)
    x = images(n, seed)
    items = []
    for i in range(n):
        item = {"y": torch.tensor(i % len(CLASSES)), "index": torch.tensor(i)}
        if with_images:
            item["image"] = x[i]
        items.append(item)
    return ListDataset(items)


@torch.no_grad()
def reference_data(model: torch.nn.Module, n: int = 6, seed: int = 1) -> ReferenceData:
    """Captioned reference pairs with the pre-trained embeddings precomputed (as the embed
    stage's cache would hold them)."""
    tok = open_clip.get_tokenizer(register_tiny())
    x = images(n, seed)
    tokens = tok([f"a picture of a {CLASSES[i % len(CLASSES)]} number {i}" for i in range(n)])
    was = model.training
    model.eval()
    image_pre = F.normalize(model.encode_image(x).float(), dim=-1)
    text_pre = F.normalize(model.encode_text(tokens).float(), dim=-1)
    model.train(was)
    return ReferenceData(images=ListDataset(list(x)), tokens=tokens, image_pre=image_pre, text_pre=text_pre)


def zeroshot_head(model: torch.nn.Module) -> torch.Tensor:
    was = model.training
    model.eval()
    head = build_head(model.encode_text, class_tokens())
    model.train(was)
    return head


def train_captions(n: int | None = None) -> torch.Tensor:
    """A caption of each `train_items()` sample (row i: item i), as a captioner would give."""
    n = len(train_items()) if n is None else n
    tok = open_clip.get_tokenizer(register_tiny())
    sizes = ("small", "large", "tiny")
    return tok([f"a {sizes[i % 3]} {CLASSES[i % len(CLASSES)]} seen in picture {i}" for i in range(n)])


def context(model: torch.nn.Module | None = None, seed: int = 0, reference: bool = False) -> TaskContext:
    from pipeline.training.train import fit

    model = model if model is not None else fresh_model()
    return TaskContext(train_captions=train_captions(),
        model=model, class_tokens=class_tokens(),
        zeroshot_head=zeroshot_head(model if hasattr(model, "encode_text") else fresh_model()),
        device=torch.device("cpu"), seed=seed, train_set=train_items(),
        train_eval_set=train_items(), reference=reference_data(model) if reference else None,
        fit=fit, class_names=tuple(CLASSES), tokenizer=open_clip.get_tokenizer(register_tiny()),
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the
    cores); restored afterwards. Autouse in every test module that imports it by name."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
