"""A labelled image folder (`<root>/<class>/<image>`) as a `wilds` `WILDSDataset`.

The layout of torchvision's `ImageFolder` and of the usual zero-shot benchmarks. Classes and
files are found by torchvision's own `find_classes` / `make_dataset` (sorted, the same image
extensions torchvision accepts), so a folder reads here exactly as it reads there. The
pipeline uses it for zero-shot retention tasks: every image is in the `test` split, the one
metadata field is `y`, and `eval` is wilds' accuracy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image

import pipeline  # noqa: F401  (installs the `outdated` stub before wilds is imported)
from wilds.common.metrics.all_metrics import Accuracy
from wilds.datasets.wilds_dataset import WILDSDataset

__all__ = ["ImageFolderDataset", "folder_classes"]


def folder_classes(root: Path) -> list[str]:
    """The class folders of `root` (sorted, as torchvision finds them), or FileNotFoundError
    naming the folder and the layout it needs."""
    from torchvision.datasets.folder import find_classes

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (an image folder is <folder>/<class>/<image>)")
    try:
        classes, _ = find_classes(str(root))
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: no class folders in it (an image folder is <folder>/<class>/<image>)") from None
    return classes


class ImageFolderDataset(WILDSDataset):
    """Images in `<root>/<class>/`, one class per sub-folder.

    Args:
        root: the folder.
        classes: the class folders in label order (default: every sub-folder, sorted); a
            listed folder that is missing or holds no image is an error naming it.
    Split: every image is in `test`. Metadata: `y`. Metric: `acc_avg` (wilds' Accuracy).
    """

    _dataset_name = "folder"
    _versions_dict = {"1.0": {"download_url": None, "compressed_size": None}}

    def __init__(self, root: str | Path, classes: list[str] | tuple[str, ...] | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        root = Path(root)
        found = folder_classes(root)
        classes = list(classes) if classes is not None else found
        absent = [c for c in classes if c not in found]
        if absent:
            raise FileNotFoundError(f"{root}: no class folder {absent[0]!r} (found: {', '.join(found) or 'none'})")
        to_idx = {c: i for i, c in enumerate(classes)}
        samples = make_dataset(str(root), to_idx, IMG_EXTENSIONS, allow_empty=True)
        counts = torch.bincount(torch.as_tensor([y for _, y in samples], dtype=torch.long), minlength=len(classes))
        empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
        if empty:
            raise FileNotFoundError(f"{root / empty[0]}: no image files (extensions: {', '.join(IMG_EXTENSIONS)})")
        self._version = "1.0"
        self._split_scheme = "official"
        self._data_dir = root
        self.classes = tuple(classes)
        self._input_array = [Path(p).relative_to(root).as_posix() for p, _ in samples]
        self._y_array = torch.as_tensor([y for _, y in samples], dtype=torch.long)
        self._y_size = 1
        self._n_classes = len(classes)
        self._split_array = torch.full((len(samples),), self.split_dict["test"], dtype=torch.long).numpy()
        self._metadata_fields = ["y"]
        self._metadata_array = self._y_array.view(-1, 1).clone()
        self._metadata_map = {"y": list(classes)}
        super().__init__(str(root), False, "official")

    def get_input(self, idx):
        """The idx-th image as an RGB PIL image."""
        with Image.open(self._data_dir / self._input_array[idx]) as img:
            return img.convert("RGB")

    def files(self, rows) -> list[Path]:
        return [self._data_dir / self._input_array[int(i)] for i in rows]

    def digest(self, rows=None) -> str:
        """SHA-256 over the relative paths and bytes of the images at `rows` (default: all)."""
        h = hashlib.sha256()
        for i in range(len(self._input_array)) if rows is None else rows:
            rel = self._input_array[int(i)]
            h.update(rel.encode() + b"\0")
            h.update(hashlib.sha256((self._data_dir / rel).read_bytes()).digest())
        return h.hexdigest()

    def eval(self, y_pred, y_true, metadata, prediction_fn=None):
        """Accuracy by wilds' metric: `acc_avg`."""
        metric = Accuracy(prediction_fn=prediction_fn)
        results = metric.compute(y_pred, y_true)
        return results, f"Average acc: {results[metric.agg_metric_field]:.3f}\n"
