"""The one embedding loop: normalised embeddings of a dataset, a tensor of images or tokens.

Used by the embed and evaluate stages and by methods that embed their training set once (LP's
cached features). `model` is anything whose `encode_image` / `encode_text` return L2-normalised embeddings
(`pipeline.methods.base.EvalModel`); they are not normalised again here (a second
normalisation would move the last bits).
"""

from __future__ import annotations

import torch

from pipeline.core.progress import progress_bar

PRELOAD_BUDGET = 2 << 30  # bytes of decoded images `preload` may keep in memory


def _batches(dataset, batch_size: int, num_workers: int, pin: bool):
    if isinstance(dataset, torch.Tensor):
        return (dataset[i:i + batch_size] for i in range(0, len(dataset), batch_size)), -(-len(dataset) // batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=pin)
    return loader, None


@torch.no_grad()
def encode_images(model, dataset, device, batch_size: int = 256, num_workers: int = 0,
                  desc: str = "embed", with_labels: bool = False):
    """Normalised image embeddings [N, D] (float32, on CPU) of a dataset whose items are tensors
    or {image, y, ...}, or of a tensor of already transformed images [N, 3, H, W] (see
    `preload`). `with_labels`: also return the items' `y` [N]."""
    batches, total = _batches(dataset, batch_size, num_workers, pin=torch.device(device).type == "cuda")
    out, labels = [], []
    for batch in progress_bar(batches, desc=desc, total=total):
        images = batch["image"] if isinstance(batch, dict) else batch
        out.append(model.encode_image(images.to(device, non_blocking=True)).float().cpu())
        if with_labels:
            labels.append(batch["y"])
    feats = torch.cat(out)
    return (feats, torch.cat(labels)) if with_labels else feats


@torch.no_grad()
def encode_texts(model, tokens: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    """Normalised text embeddings [N, D] (float32, on CPU) of tokenised texts [N, L]."""
    return torch.cat([model.encode_text(tokens[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, tokens.shape[0], batch_size)])


@torch.no_grad()
def preload(dataset, batch_size: int = 256, num_workers: int = 0, budget: int = PRELOAD_BUDGET,
            desc: str = "decode"):
    """Decode and transform every image once, for several passes over the same images (the
    WiSE-FT α sweep). Returns a tensor [N, 3, H, W] when it fits in `budget` bytes, else the
    dataset itself (each pass then decodes again)."""
    if len(dataset) == 0:
        return dataset
    first = dataset[0]
    first = first["image"] if isinstance(first, dict) else first
    if first.numel() * first.element_size() * len(dataset) > budget:
        return dataset
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    parts = [b["image"] if isinstance(b, dict) else b for b in progress_bar(loader, desc=desc)]
    return torch.cat(parts)
