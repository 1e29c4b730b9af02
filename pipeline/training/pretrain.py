"""Contrastive pre-training of the built-in tiny CLIP on a caption corpus (the `pretrained` stage).

The corpus is an open_clip-style CSV (`filepath,title`, paths relative to the CSV's folder),
by default the synthetic caption corpus of `pipeline.data.synthetic.generate_corpus`. The
images are tiny, so they are decoded once into a uint8 tensor and every step indexes,
augments and normalises tensors; the titles are tokenised once.

Recipe (CLIP, Radford et al. 2021; open_clip's `training/train.py`): symmetric InfoNCE over
the batch with a learnable logit scale (clamped at 100), AdamW without weight decay on biases,
norms, embeddings' scalars and the logit scale, linear warm-up then cosine decay. Choices made
here: random horizontal / vertical flips (the drawn objects and their captions do not change
under flips) and small random translations as augmentation; a few hundred steps, set by
`PretrainConfig` (params.yaml `pretrained.builtin`). A SigLIP arch (one with `logit_bias`,
e.g. `tiny-siglip`) trains with its pairwise sigmoid loss instead, a CoCa arch with its
contrastive term only. Fused AdamW on CPU and CUDA (on CPU it makes the step ~20 % faster:
the 6.3M-entry token embedding dominates the update).
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.validation import Float, Int, Settings
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import models
from pipeline.models.losses import contrastive_loss
from pipeline.training.optim import decay_groups, scheduled_lr

__all__ = ["PretrainConfig", "load_corpus", "corpus_labels", "pretrain", "pretrain_vision"]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PretrainConfig(Settings):
    """Pre-training recipe. The defaults take about 3 minutes on 2 CPU cores (2 threads).
    The thread count is params' shared `threads`, set by the stage, not part of the recipe."""

    steps: Int = 1000
    batch_size: Int = 128
    lr: Float = 2e-3
    weight_decay: Float = 0.1
    warmup: Int = 100
    seed: Int = 0
    shift: Int = 2  # random translation, in pixels (0 turns it off)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; it must be at least 1.")
        if not self.lr > 0:
            raise ValueError(f"lr: {self.lr!r} is not allowed; it must be positive.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: {self.weight_decay!r} is not allowed; it must be ≥ 0.")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup: {self.warmup!r} is not allowed; use 0 to steps - 1 ({self.steps - 1}).")
        if self.shift < 0:
            raise ValueError(f"shift: {self.shift!r} is not allowed; it must be ≥ 0 pixels.")

    @classmethod
    def small(cls, seed: int = 0) -> "PretrainConfig":
        """About a minute on 2 cores: for tests, on `SyntheticConfig.quick()`'s corpus."""
        return cls(steps=300, batch_size=128, lr=2e-3, warmup=30, seed=seed)


def load_corpus(corpus_csv: Path, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """All images of a `filepath,title` CSV as one uint8 tensor [N, 3, S, S], and the titles.

    Images of another size are resized (bicubic) to `image_size` once, here.
    """
    corpus_csv = Path(corpus_csv)
    if not corpus_csv.is_file():
        raise FileNotFoundError(
            f"{corpus_csv}: caption corpus not found. The `prepare` stage writes the built-in one; "
            f"a corpus of your own is a CSV with header `filepath,title` (paths relative to the CSV)."
        )
    with open(corpus_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"filepath", "title"} <= set(reader.fieldnames):
            raise ValueError(f"{corpus_csv}: expected a header with columns `filepath,title`, got {reader.fieldnames}")
        rows = [(r["filepath"], r["title"]) for r in reader]
    if not rows:
        raise ValueError(f"{corpus_csv}: the corpus has no rows")
    images = np.empty((len(rows), image_size, image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(rows):
        with Image.open(corpus_csv.parent / path) as img:
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BICUBIC)
            images[i] = np.asarray(img)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [t for _, t in rows]


def _augment(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and a random translation (edge-padded), per image, on a batch."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if shift > 0:
        size = x.shape[-1]
        padded = F.pad(x, (shift,) * 4, mode="replicate")
        dx, dy = (torch.randint(0, 2 * shift + 1, (2, b), generator=gen))
        cols = (torch.arange(size)[None, :] + dx[:, None])  # [B, S]
        rows = (torch.arange(size)[None, :] + dy[:, None])
        x = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return x


def _normaliser(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    pre = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = torch.tensor(pre.get("mean", _CLIP_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(pre.get("std", _CLIP_STD)).view(1, 3, 1, 1)
    return mean, std


def pretrain(arch: str, corpus_csv: Path, cfg: PretrainConfig, out: Path, device: str | torch.device = "cpu",
             progress: bool = True, tokenizer: str | None = None) -> dict[str, Any]:
    """Train `arch` from random weights on the corpus; write its state dict to `out` (safetensors).

    Deterministic on CPU for a fixed `cfg` (seeded initialisation, data order and augmentation)
    and torch thread count (the stage sets params' `threads`: `pipeline.core.env.set_threads`).
    Returns steps, wall time, final loss (mean of the last 20 steps), sha256 and sizes.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    clip = models.create(arch, device=device, tokenizer=tokenizer)
    model, tokenizer = clip.model, clip.tokenizer
    images, titles = load_corpus(Path(corpus_csv), clip.image_size)
    tokens = tokenizer(titles)
    mean, std = _normaliser(model)

    model.train()
    params = decay_groups(model.named_parameters(), cfg.weight_decay)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type in ("cuda", "cpu"))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    batch = min(cfg.batch_size, n)
    order, cursor = torch.randperm(n, generator=gen), 0

    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"pretrain {arch}", disable=not (progress and sys.stderr.isatty()))
    for step in bar:
        if cursor + batch > n:  # a new epoch: reshuffle
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        x = _augment(images[idx].float().div_(255), cfg.shift, gen)
        x = ((x - mean) / std).to(device, non_blocking=True)
        t = tokens[idx].to(device, non_blocking=True)

        for group in opt.param_groups:
            group["lr"] = scheduled_lr(cfg.lr, step, cfg.steps, cfg.warmup)
        # the family's loss: SigLIP's sigmoid loss where the model has a logit bias (CoCa:
        # its contrastive term only, not its captioning loss)
        image_features = F.normalize(model.encode_image(x), dim=-1)
        text_features = F.normalize(model.encode_text(t), dim=-1)
        logit_scale = model.logit_scale.exp()
        loss = contrastive_loss(image_features, text_features, logit_scale, getattr(model, "logit_bias", None))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{logit_scale.item():.1f}")
    wall = time.perf_counter() - start
    model.eval()

    final_loss = float(np.mean(losses[-20:]))
    meta = {
        "arch": arch,
        "origin": "builtin: contrastive pre-training on a caption corpus",
        "corpus": str(corpus_csv),
        "corpus_size": n,
        "pretrain": asdict(cfg),
        "final_loss": final_loss,
    }
    digest = models.save_state_dict(model.state_dict(), Path(out), meta=meta)
    return {
        "arch": arch,
        "steps": cfg.steps,
        "batch_size": batch,
        "corpus_size": n,
        "n_params": sum(p.numel() for p in model.parameters()),
        "wall_time_s": wall,
        "final_loss": final_loss,
        "first_loss": losses[0],
        "sha256": digest,
    }


def corpus_labels(corpus_csv: Path) -> tuple[torch.Tensor, list[str]]:
    """The `label` column of a corpus CSV as class indices (classes in sorted order) and the
    class names; ValueError naming the file where the column is missing or empty."""
    with open(corpus_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "label" not in (reader.fieldnames or []):
            raise ValueError(
                f"{corpus_csv}: a vision-only model pre-trains on the corpus's `label` column, which this "
                f"CSV lacks (columns {reader.fieldnames}); add one (the built-in corpus labels each image "
                "by its shape) or set vision.pretrained to a weights file.")
        labels = [r["label"] for r in reader]
    if any(not x for x in labels):
        raise ValueError(f"{corpus_csv}: the `label` column has empty cells")
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError(f"{corpus_csv}: the `label` column needs at least 2 classes, found {names}")
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[x] for x in labels]), names


def pretrain_vision(arch: str, like, corpus_csv: Path, cfg: PretrainConfig, out: Path,
                    device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Supervised pre-training of a vision-only backbone on the corpus's `label` column: the
    built-in counterpart of an ImageNet-pretrained model, with the tiny CLIP's budget.

    What plays ImageNet's role: the built-in corpus labels each image by its object's shape
    (12 shapes: the task's 8 and the 4 held-out ones), on the same 20k images the tiny CLIP
    pre-trains on. As with ImageNet and WILDS, the pre-training labels are object categories
    that overlap the downstream classes, on other images and backgrounds than the task's; CLIP
    gets the same information from captions that always name the shape (and sometimes colour,
    size, texture, background), the vision model from the label alone. A fair analog: the
    same images, the same budget, supervision of the same kind each model family is known for.

    Recipe: the same `PretrainConfig` as `pretrain` (steps, batch size, lr, warm-up, weight
    decay, flips and shifts, seeded order), cross-entropy through a linear head on the pooled
    features (discarded afterwards: only the backbone is saved, as `visual.*`), AdamW with
    the same decay rule, ImageNet normalisation. `like` is the CLIP (`models.Clip`) whose image
    size the backbone is built at. Deterministic on CPU for a fixed `cfg` and thread count.
    """
    from tqdm.auto import tqdm

    from pipeline.models import vision

    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    backbone = vision.build(arch, like.image_size)
    labels, classes = corpus_labels(Path(corpus_csv))
    head = torch.nn.Linear(backbone.num_features, len(classes))
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
    images, _ = load_corpus(Path(corpus_csv), like.image_size)
    mean_, std_ = vision.normalisation(backbone)
    mean, std = torch.tensor(mean_).view(1, 3, 1, 1), torch.tensor(std_).view(1, 3, 1, 1)

    model.train()
    opt = torch.optim.AdamW(decay_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-6, fused=device.type in ("cuda", "cpu"))
    gen = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    batch = min(cfg.batch_size, n)
    order, cursor = torch.randperm(n, generator=gen), 0
    losses: list[float] = []
    correct = 0
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"pretrain {arch}", disable=not (progress and sys.stderr.isatty()))
    for step in bar:
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        x = _augment(images[idx].float().div_(255), cfg.shift, gen)
        x = ((x - mean) / std).to(device, non_blocking=True)
        y = labels[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(cfg.lr, step, cfg.steps, cfg.warmup)
        logits = head(backbone.encode_image(x))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step >= cfg.steps - 20:
            correct += int((logits.argmax(1) == y).sum())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    wall = time.perf_counter() - start
    backbone.eval()
    final_loss = float(np.mean(losses[-20:]))
    train_acc = correct / (batch * min(20, cfg.steps))
    meta = {"arch": arch, "origin": "builtin: supervised pre-training on the corpus labels", "corpus": str(corpus_csv),
            "corpus_size": n, "classes": classes, "pretrain": asdict(cfg), "final_loss": final_loss}
    digest = models.save_state_dict({f"visual.{k}": v for k, v in backbone.visual.state_dict().items()}, Path(out),
                                    meta=meta)
    return {"arch": arch, "steps": cfg.steps, "batch_size": batch, "corpus_size": n, "classes": len(classes),
            "n_params": sum(p.numel() for p in backbone.parameters()), "wall_time_s": wall,
            "final_loss": final_loss, "first_loss": losses[0], "final_train_acc": train_acc, "sha256": digest}
