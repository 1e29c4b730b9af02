"""The prepared image cache: every image the model stages read, decoded once and stored at the
resolution the model needs, so finetune, embed and evaluate never decode an original again.

What is stored: each image after the first step of the model's evaluation transform (open_clip's
`Resize` to the shorter side, `image_size` px, with the model's interpolation), in RGB. That
step is the expensive one (a 1920x1080 JPEG is decoded and resampled); what is left of either
transform (the centre crop, or the training `RandomResizedCrop`; `ToTensor`, `Normalize`) runs
at read time on the small image. Hence:

- evaluation from the cache is **bit-identical** to evaluation from the originals with
  `format: raw` (torchvision's `Resize` returns an image already at its output size
  unchanged, so the evaluation transform applied to a cached image computes the same pixels);
  with `format: jpeg` it differs by the re-encoding (quality 95 by default, 4:4:4: a few
  levels of 255 per pixel);
- training augmentation is the same `RandomResizedCrop` (scale and ratio relative to the
  image), taken from the `image_size`-px image instead of the original: a resampling
  difference, no change of the augmentation's distribution.

Formats (params `images.format`), argued for a GPU that evaluates thousands of images a second:
- `raw` (default): uint8 pixels in one file per collection, read through a memory map; reading
  is a copy (no decoding at all), the page cache shares it between DataLoader workers and
  between the WiSE-FT α passes. Size: h x w x 3 bytes per image (224-px shorter side of a 16:9
  frame: 267 KB; iWildCam's ~200k images: ~54 GB).
- `jpeg`: each image re-encoded at `images.quality`; ~10x smaller, decoding a 224-px JPEG is
  still ~30x cheaper than a megapixel original (benchmarks/README.md).
- `none`: no cache; the stages read the originals (small images, e.g. Camelyon17's 96-px
  patches, gain nothing from a cache upsampled to the model's size).

The cache is keyed by what determines it: the dataset, the resize step (its repr: size,
interpolation, antialias), the format and quality (`key`, written by the `check` stage to
`data/image_key.json`, so another architecture with the same image size rebuilds nothing).
Layout of `data/images/`: per collection `<name>.bin` (the images' bytes, concatenated) and
`<name>.index.npy` ([N, 5] int64: row, offset, length, height, width); `index.json` last, the
finished marker, with the key, each collection's rows and sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["image_key", "build", "ImageCache", "ImageStore", "CachedDataset", "CacheMismatch",
           "collection_name"]

INDEX = "index.json"


class CacheMismatch(ValueError):
    """The cache on disk was built for another key than the one asked for."""


def resize_step(transform):
    """The first step of an open_clip evaluation transform (its resize), checked to be one."""
    steps = getattr(transform, "transforms", None)
    if not steps or "Resize" not in type(steps[0]).__name__:
        raise ValueError(f"the model's evaluation transform does not start with a resize ({transform}); "
                         "set `images.format: none` to read the original images")
    return steps[0]


def image_key(dataset: str, eval_transform, fmt: str, quality: int) -> dict:
    """What determines the cache's bytes."""
    key = {"dataset": dataset, "format": fmt}
    if fmt != "none":
        key["resize"] = repr(resize_step(eval_transform))
    if fmt == "jpeg":
        key["quality"] = int(quality)
    return key


def collection_name(name: str) -> str:
    """A file-safe collection name (`synthetic/colour` -> `synthetic_colour`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---------------------------------------------------------------------------------------------
# building


class _Encode(torch.utils.data.Dataset):
    """Job j -> (row, bytes, height, width) of source image j after the resize step."""

    def __init__(self, source, rows: Sequence[int], resize, fmt: str, quality: int):
        self.source, self.rows, self.resize = source, list(rows), resize
        self.fmt, self.quality = fmt, quality

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        row = self.rows[j]
        image = self.source(row).convert("RGB")
        small = self.resize(image)
        if j == 0 and self.resize(small).size != small.size:  # a property of the step: checked once
            raise ValueError(f"the resize step {self.resize} is not idempotent, so a cached image would be resized "
                             "twice; set `images.format: none`")
        if self.fmt == "raw":
            data = np.asarray(small, dtype=np.uint8).tobytes()
        else:
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=self.quality, subsampling=0)
            data = buf.getvalue()
        return row, data, small.height, small.width


def _first(batch):
    return batch[0]


def build(folder: Path, key: dict, resize, collections: Iterable[tuple[str, object, Sequence[int]]],
          num_workers: int = 0) -> dict:
    """Write the cache into `folder` (replaced atomically: a temporary folder renamed at the
    end, `index.json` its last file). `collections`: (name, source, rows) with `source(row)`
    a PIL image. Returns the index."""
    from pipeline.core.progress import progress_bar

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = {"key": key, "collections": {}}
    fmt, quality = key["format"], key.get("quality", 95)
    for name, source, rows in ([] if fmt == "none" else collections):
        jobs = _Encode(source, rows, resize, fmt, quality)
        loader = torch.utils.data.DataLoader(jobs, batch_size=1, collate_fn=_first, num_workers=num_workers,
                                             prefetch_factor=8 if num_workers else None)
        table = np.zeros((len(jobs), 5), dtype=np.int64)
        h = hashlib.sha256()
        offset = 0
        with open(tmp / f"{name}.bin", "wb") as f:
            for j, (row, data, height, width) in enumerate(progress_bar(loader, desc=f"cache {name}", total=len(jobs))):
                f.write(data)
                h.update(data)
                table[j] = (row, offset, len(data), height, width)
                offset += len(data)
        np.save(tmp / f"{name}.index.npy", table)
        index["collections"][name] = {"images": len(jobs), "bytes": offset, "sha256": h.hexdigest()}
    (tmp / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return index


# ---------------------------------------------------------------------------------------------
# reading


class ImageStore:
    """One collection: `get(row)` -> the cached PIL image of that row. The memory map opens
    lazily in each process (a DataLoader worker maps the file itself; nothing is pickled but
    the path and the index)."""

    def __init__(self, folder: Path, name: str, fmt: str):
        self.path = Path(folder) / f"{name}.bin"
        self.name, self.fmt = name, fmt
        table = np.load(Path(folder) / f"{name}.index.npy")
        self.table = table
        self.position = {int(r): i for i, r in enumerate(table[:, 0])}
        self._data = None

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return len(self.table)

    def get(self, row: int) -> Image.Image:
        i = self.position.get(int(row))
        if i is None:
            raise KeyError(f"{self.path}: row {row} is not in the image cache; run `dvc repro images`")
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint8)
        _, offset, length, height, width = (int(v) for v in self.table[i])
        data = self._data[offset:offset + length]
        if self.fmt == "raw":
            return Image.fromarray(np.array(data).reshape(height, width, 3), "RGB")
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return im.convert("RGB")


class CachedDataset:
    """A WILDS dataset whose `get_input` reads the cache; everything else (labels, splits,
    metadata, the official `eval`) is the dataset's own."""

    def __init__(self, dataset, store: ImageStore):
        self.dataset, self.store = dataset, store

    def get_input(self, idx: int):
        return self.store.get(idx)

    def __getattr__(self, name: str):
        if name in ("dataset", "store"):  # during unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)


class ImageCache:
    """`data/images` opened for reading, checked against the key the caller computes."""

    def __init__(self, folder: Path, index: dict):
        self.folder, self.index = Path(folder), index
        self._stores: dict[str, ImageStore] = {}

    @classmethod
    def open(cls, folder: Path, key: dict) -> "ImageCache":
        path = Path(folder) / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the image cache is not built; run `dvc repro images`")
        index = json.loads(path.read_text())
        if index["key"] != key:
            raise CacheMismatch(f"{folder}: the image cache was built for {index['key']}, this run needs {key}; "
                                "run `dvc repro images`")
        return cls(folder, index)

    @property
    def enabled(self) -> bool:
        return self.index["key"]["format"] != "none"

    def store(self, name: str) -> ImageStore | None:
        if not self.enabled or name not in self.index["collections"]:
            return None
        if name not in self._stores:
            self._stores[name] = ImageStore(self.folder, name, self.index["key"]["format"])
        return self._stores[name]

    def dataset(self, name: str, dataset):
        """`dataset` reading collection `name` (itself when the cache is off or lacks it)."""
        store = self.store(name)
        return dataset if store is None else CachedDataset(dataset, store)
