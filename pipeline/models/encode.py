"""The one embedding loop: normalised embeddings of a dataset, a tensor of images or tokens.

Used by the embed and evaluate stages and by methods that embed their training set once (LP's
cached features). `model` is anything whose `encode_image` / `encode_text` return L2-normalised embeddings
(`pipeline.methods.base.EvalModel`); they are not normalised again here (a second
normalisation would move the last bits).
"""

from __future__ import annotations

import itertools

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


def weights_digest(model: torch.nn.Module, skip: tuple[str, ...] = ("head",)) -> str:
    """SHA-256 of a model's class and of every parameter and buffer (name, dtype, shape, bytes),
    but those named in `skip` (an `EvalModel`'s `head` buffer: it changes the logits, never the
    image features). Equal digests: the same image features, bit for bit (deterministic
    kernels, the same images)."""
    import hashlib

    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if name in skip or t is None:
            continue
        t = t.detach()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.dtype == torch.bfloat16:  # (numpy has no bfloat16: its bits)
            t = t.view(torch.int16)
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureMemo:
    """Image features computed in this process, by model weights (`weights_digest`) and image
    set (the same object): a model equal to an earlier one encodes nothing again. WiSE-FT's
    α = 0 is the pre-trained model at every seed and level; a linear probe's image tower never
    trains, so every seed and α of it shares one pass. Exact: what `encode_images` returns.
    Holds at most `budget` bytes of features, the least recently used dropped first."""

    def __init__(self, budget: int = PRELOAD_BUDGET):
        self._feats: dict[tuple[str, int], torch.Tensor] = {}  # in order of last use
        self._keep: list = []  # the image sets keyed by id(): kept alive, so no id is reused
        self.budget = budget
        self.hits = 0

    def encode(self, digest: str, model, images, device, batch_size: int = 256, num_workers: int = 0,
               desc: str = "embed") -> torch.Tensor:
        key = (digest, id(images))
        if key in self._feats:
            self.hits += 1
            feats = self._feats.pop(key)
        else:
            if not any(x is images for x in self._keep):
                self._keep.append(images)
            feats = encode_images(model, images, device, batch_size, num_workers, desc=desc)
        self._feats[key] = feats
        while sum(f.numel() * f.element_size() for f in self._feats.values()) > self.budget and len(self._feats) > 1:
            del self._feats[next(iter(self._feats))]
        return feats.clone()  # (a caller may change its copy in place)
