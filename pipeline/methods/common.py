"""Pieces shared by several methods (not a method itself)."""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.losses import upcast


class LinearHead(nn.Module):
    """Linear head on L2-normalised image features, no bias, rows initialised to s·H_zs
    (the WiSE-FT recipe's classification head)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.t()


MAX_LOGIT_SCALE = math.log(100.0)


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep a trained logit scale at ≤ ln 100 (open_clip's pre-training rule), after each step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def cached_features(ctx, encoder, desc: str) -> torch.Tensor:
    """Features of every training image (`ctx.train_eval_set`: no augmentation), computed once
    at setup in eval mode, on `ctx.device`: what the linear probes train on. `encoder` has
    `encode_image` (an `EvalModel`, or a vision backbone)."""
    from pipeline.models.encode import encode_images

    if ctx.train_eval_set is None:
        raise ValueError(f"{desc} needs the training images (train_eval_set)")
    ctx.model.to(ctx.device)
    was_training = ctx.model.training
    ctx.model.eval()
    feats = encode_images(encoder, ctx.train_eval_set, ctx.device, desc=desc).to(ctx.device)
    ctx.model.train(was_training)
    return feats


def view_batch(views: torch.Tensor, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's rows of cached augmented views `views` [V, N, D] (CLAP's, Tip-Adapter-F's),
    flattened to [V·B, D] on `device`, with the labels repeated to match: row r is view r // B
    of the batch's sample r % B."""
    idx = batch["index"].to(views.device)
    v, _, d = views.shape
    return views[:, idx].reshape(-1, d).to(device), batch["y"].to(device).repeat(v)


def image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings, normalised in float32 (a bf16 forward's output is
    upcast first: its norm and quotient would otherwise round again)."""
    return F.normalize(upcast(model.encode_image(images)), dim=-1)


def text_features(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(upcast(model.encode_text(tokens)), dim=-1)


def per_row(draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
    """`draw(k)` gives k per-row random values; return those of this rank's n rows.

    The DDP rule for every per-sample random draw in a loss: each sample gets what it would
    get as that row of the one-process micro-batch. The trainer seeds the RNG per micro-batch
    identically on every rank, and rank r holds rows `[r::world]` of the micro-batch, so
    every rank draws for all n·world rows and keeps its own positions; the RNG then stays in
    step across ranks. In one process this is `draw(n)`. Draws shared by all rows (a class
    head's templates, DiVE's reference batch) are made once, the same on every rank.
    """
    from pipeline.core import dist

    world = dist.world_size()
    if world == 1:
        return draw(n)
    return draw(n * world)[dist.rank()::world]


_RANK_ROWS: contextvars.ContextVar[bool] = contextvars.ContextVar("rank_rows", default=False)


@contextmanager
def rank_rows() -> Iterator[None]:
    """Mark the forwards inside as running on this rank's rows of the micro-batch (its slice
    of the global batch), so that per-row draws inside the model (R-Adapter's drop masks)
    follow `per_row`. Forwards outside it (a class head every rank computes on the same
    rows) draw the same on every rank."""
    token = _RANK_ROWS.set(True)
    try:
        yield
    finally:
        _RANK_ROWS.reset(token)


def in_rank_rows() -> bool:
    return _RANK_ROWS.get()


def sample_class_prompts(class_tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One template per image, drawn uniformly (global RNG, seeded per micro-batch by the
    trainer). `labels` is this rank's slice of the micro-batch: the draw follows `per_row`,
    so each image gets the template it would get in one process."""
    n_templates = class_tokens.shape[1]
    pick = per_row(lambda k: torch.randint(n_templates, (k,)), labels.shape[0]).to(labels.device)
    return class_tokens.to(labels.device)[labels, pick]


def image_free(dataset):
    """The view of a training set whose items carry only `y` and `index` (for methods that
    read cached features, `uses_images = False`): `dataset.without_images()` where the
    dataset offers it (the pipeline's `LabeledImages`), else the dataset itself."""
    without = getattr(dataset, "without_images", None)
    return without() if callable(without) else dataset
