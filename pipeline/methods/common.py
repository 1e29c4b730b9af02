"""Pieces shared by several methods (not a method itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses import upcast


class LinearHead(nn.Module):
    """Linear head on L2-normalised image features, no bias, rows initialised to s·H_zs
    (the WiSE-FT recipe's classification head)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.t()


def image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings, normalised in float32 (a bf16 forward's output is
    upcast first: its norm and quotient would otherwise round again)."""
    return F.normalize(upcast(model.encode_image(images)), dim=-1)


def text_features(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(upcast(model.encode_text(tokens)), dim=-1)


def sample_class_prompts(class_tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One template per image, drawn uniformly (global RNG, seeded per step by the trainer).

    Under DDP (`labels` is this rank's slice `mb[rank::world]` of the micro-batch), every rank
    draws for the whole micro-batch and keeps its own positions: each image gets the
    template it would get in one process, and the RNG stays in step across ranks.
    """
    from pipeline import dist

    n_templates = class_tokens.shape[1]
    world = dist.world_size()
    pick = torch.randint(n_templates, (labels.shape[0] * world,))[dist.rank()::world].to(labels.device)
    return class_tokens.to(labels.device)[labels, pick]


@torch.no_grad()
def embed_dataset(model: nn.Module, dataset, device: torch.device, batch_size: int = 256):
    """Normalised image features and labels of every item of `dataset` (items: image, y)."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    feats, labels = [], []
    for batch in loader:
        feats.append(image_features(model, batch["image"].to(device)).float())
        labels.append(batch["y"].to(device))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)
