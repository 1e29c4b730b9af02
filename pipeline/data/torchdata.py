"""torch Datasets over WILDS datasets and caption CSVs; items are dicts of tensors."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image


class LabeledImages(torch.utils.data.Dataset):
    """Items {image, y, index} for `indices` of a WILDS dataset; `index` is the position in
    this set (what methods with cached features look up), not the WILDS row.

    `memo_bytes` > 0 keeps decoded images (before the transform) in memory up to that many
    bytes, so a small training sample seen every step is decoded once, not once per epoch;
    the transform (random augmentation included) still runs on every access, so the items are
    the same as without the memo. Sets derived with `with_transform` share it."""

    def __init__(self, dataset, indices: Sequence[int], transform: Callable | None,
                 labels: torch.Tensor | None = None, with_images: bool = True, memo_bytes: int = 0,
                 _memo: dict | None = None):
        self.dataset = dataset
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.transform = transform
        y = dataset.y_array[self.indices] if labels is None else labels
        self.labels = torch.as_tensor(y, dtype=torch.long)
        self.with_images = with_images
        self.memo_bytes = memo_bytes
        self._memo = {"images": {}, "bytes": 0} if _memo is None else _memo

    def __len__(self) -> int:
        return len(self.indices)

    def _image(self, i: int):
        images = self._memo["images"]
        if i in images:
            return images[i].copy()
        image = self.dataset.get_input(int(self.indices[i]))
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
            size = image.width * image.height * 3
            if self._memo["bytes"] + size <= self.memo_bytes:
                images[i] = image.copy()
                self._memo["bytes"] += size
        return image

    def __getitem__(self, i: int) -> dict:
        item = {"y": self.labels[i], "index": torch.tensor(i)}
        if self.with_images:
            image = self._image(i)
            item["image"] = self.transform(image) if self.transform else image
        return item

    def without_images(self) -> "LabeledImages":
        return LabeledImages(self.dataset, self.indices, None, self.labels, with_images=False)

    def with_transform(self, transform: Callable) -> "LabeledImages":
        return LabeledImages(self.dataset, self.indices, transform, self.labels, self.with_images,
                             self.memo_bytes, self._memo)


def read_caption_csv(path: Path, separator: str = ",", limit: int | None = None) -> tuple[list[Path], list[str]]:
    """Rows of an open_clip-style CSV (`filepath`, `title`); relative paths are taken from
    the CSV's folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: reference CSV not found (reference.csv in params.yaml)")
    files, titles = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=separator)
        missing = {"filepath", "title"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: needs columns filepath and title (missing {sorted(missing)}); "
                             f"found {reader.fieldnames} with separator {separator!r}")
        for row in reader:
            p = Path(row["filepath"])
            files.append(p if p.is_absolute() else path.parent / p)
            titles.append(row["title"])
            if limit is not None and len(files) >= limit:
                break
    if not files:
        raise ValueError(f"{path}: no rows")
    return files, titles


class ImageFiles(torch.utils.data.Dataset):
    """Item j -> transform(image j) (a tensor). `store`: an image cache collection holding
    file j as row j (`pipeline.data.imagecache`), read instead of the file."""

    def __init__(self, files: Sequence[Path], transform: Callable, store=None):
        self.files = list(files)
        self.transform = transform
        self.store = store

    def __len__(self) -> int:
        return len(self.files)

    def image(self, j: int) -> Image.Image:
        if self.store is not None:
            return self.store.get(j)
        with Image.open(self.files[j]) as im:
            return im.convert("RGB")

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.transform(self.image(j))
