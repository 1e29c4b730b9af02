"""Writing the dataset and corpus to disk, and the `wilds` dataset class that reads them."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import pipeline  # noqa: F401  (installs the `outdated` stub before wilds is imported)
from wilds.common.grouper import CombinatorialGrouper
from wilds.datasets.wilds_dataset import WILDSDataset

from pipeline.core.env import pid_alive
from pipeline.data.domain_eval import DomainDataset

from pipeline.data.scatter import install_scatter_fallback
from pipeline.data.synthetic.config import (ALL_SHAPES, COLOURS, FOLDER, HELDOUT, HELDOUT_SHAPES, LABELS, SHAPES, SIZES,
                                            SPLITS, SyntheticConfig, TEXTURES, VERSION)
from pipeline.data.synthetic.render import _Item, _caption, _corpus_items, _heldout_items, _render, _rng, _split_items

install_scatter_fallback()  # wilds' group-wise eval imports torch_scatter

PROMPT_FILE = "prompts.json"  # the task's prompts, in the dataset folder


# ---------------------------------------------------------------------------------------------
# writing


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _attributes(cfg: SyntheticConfig) -> dict[str, Any]:
    shortcut = LABELS[cfg.shortcut]
    return {
        "label": cfg.label,
        "y": list(cfg.classes),
        "shape": list(SHAPES),
        "colour": list(COLOURS),
        "size": list(SIZES),
        "texture": list(TEXTURES),
        "domain": list(cfg.domains),
        "id_domains": list(cfg.id_domains),
        "ood_domains": list(cfg.ood_domains),
        "shortcut": cfg.shortcut,  # in ID data, each class prefers one value of this attribute
        "preferred": {c: shortcut[i % len(shortcut)] for i, c in enumerate(cfg.classes)},
        "heldout_shapes": list(HELDOUT_SHAPES),
    }


def _metadata_fields(label: str) -> list[str]:
    """The metadata columns: domain, every attribute (the label's too, so a retention task
    labelled by it still finds its column), y. The shape is a column only when it is not the
    label: the shape task keeps the columns it always had."""
    return ["domain", "colour", "size", "texture", *(["shape"] if label != "shape" else []), "y"]


def _prompts(cfg: SyntheticConfig) -> dict[str, Any]:
    """The task's prompt file, written beside its data (the `prompt_file` that `load_prompts`
    reads): the shipped prompt file with the label's entry (the top level for the shape, the task
    of that name otherwise) as the classes, and every entry, the shape included, as a task."""
    from pipeline.data.datasets import get_spec, read_prompts

    shipped = get_spec(SyntheticDataset._dataset_name).prompt_path
    names = json.loads(shipped.read_text(encoding="utf-8")).get("tasks", {})
    entries = {"shape": read_prompts(shipped), **{t: read_prompts(shipped, task=t) for t in names}}
    if cfg.label not in entries:
        raise ValueError(f"{shipped}: no prompts for the label {cfg.label!r}; add a task of that name under 'tasks'.")
    top = entries[cfg.label]
    if top.classnames != cfg.classes:
        raise ValueError(f"{shipped}: the class names for {cfg.label!r} must be {list(cfg.classes)} in this order, "
                         f"got {list(top.classnames)}.")
    return {"_note": f"Written by pipeline.data.synthetic from {shipped.name} for the label {cfg.label!r}; edit that file.",
            "classnames": list(top.classnames), "templates": list(top.templates),
            "tasks": {t: {"classnames": list(p.classnames), "templates": list(p.templates)} for t, p in entries.items()}}


def _tmp_sibling(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def _remove_stale_tmp(final: Path) -> None:
    """Delete temp folders of earlier, killed runs (their process is gone)."""
    for path in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Swap a finished temp folder into place; a reader never sees a half-written folder."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _draw_chunk(cfg: SyntheticConfig, stream: str, items: list[tuple[int, str, _Item]], folder: str,
                captions: bool) -> list[str]:
    """Render and write a chunk of (index, relative path, item); return captions if asked."""
    out = []
    for i, relpath, item in items:
        rng = _rng(cfg, stream, 1, i)
        with open(os.path.join(folder, relpath), "wb") as f:
            f.write(_png_bytes(_render(item, cfg, rng)))
        if captions:
            out.append(_caption(item, cfg, rng))  # drawn after the image: same stream, fixed order
    return out


def _draw_all(cfg: SyntheticConfig, jobs: list[tuple[str, list[tuple[int, str, _Item]]]], folder: Path,
              captions: bool, workers: int | None) -> list[str]:
    """Draw every job, in parallel processes when there are several cores.

    Each image has its own random stream, so the bytes do not depend on the worker count.
    """
    workers = _default_workers() if workers is None else max(1, workers)
    chunk = 500
    tasks = [(stream, items[k : k + chunk]) for stream, items in jobs for k in range(0, len(items), chunk)]
    if workers == 1 or len(tasks) == 1:
        return [c for stream, part in tasks for c in _draw_chunk(cfg, stream, part, str(folder), captions)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: the children only run numpy and PIL, and need not re-import torch and wilds.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
        futures = [pool.submit(_draw_chunk, cfg, stream, part, str(folder), captions) for stream, part in tasks]
        return [c for fut in futures for c in fut.result()]


def generate_dataset(root: Path, cfg: SyntheticConfig, *, workers: int | None = None) -> Path:
    """Write the labelled dataset to ``root/synthetic_v1.0/`` and return that folder.

    Contents: ``RELEASE_v1.0.txt``, ``metadata.csv`` (filename, y: the index of ``cfg.label``'s
    value, split, domain, colour, size, texture as indices, shape by name), ``attributes.json``
    (the label, the names behind the integer columns, the ID / OOD backgrounds, the shortcut
    and the config), ``prompts.json`` (the task's class names and templates, `_prompts`),
    ``images/*.png``, and ``heldout/<shape>/*.png``: the
    held-out shapes on ID backgrounds, a labelled image folder (never part of a split) that
    the built-in retention task reads. Deterministic in ``cfg`` (whatever
    ``workers``, which defaults to the available cores); built in a temp folder beside the
    target and renamed into place when complete.
    """
    root = Path(root)
    final = root / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = _tmp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for shape in HELDOUT_SHAPES:
        (tmp / HELDOUT / shape).mkdir(parents=True)
    try:
        jobs, rows = [], []
        for split in SPLITS:
            items = [(i, f"images/{split}_{i:05d}.png", item) for i, item in enumerate(_split_items(cfg, split))]
            jobs.append((split, items))
            rows += [(path, getattr(it, cfg.label), split, it.domain, it.colour, it.size, it.texture, SHAPES[it.shape])
                     for _, path, it in items]
        jobs.append((HELDOUT, [(i, f"{HELDOUT}/{ALL_SHAPES[it.shape]}/{i:05d}.png", it)
                               for i, it in enumerate(_heldout_items(cfg))]))
        _draw_all(cfg, jobs, tmp, captions=False, workers=workers)
        with open(tmp / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("filename", "y", "split", "domain", "colour", "size", "texture", "shape"))
            writer.writerows(rows)
        attributes = {**_attributes(cfg), "config": asdict(cfg)}
        (tmp / "attributes.json").write_text(json.dumps(attributes, indent=1) + "\n", encoding="utf-8")
        (tmp / PROMPT_FILE).write_text(json.dumps(_prompts(cfg), indent=1) + "\n", encoding="utf-8")
        (tmp / f"RELEASE_v{VERSION}.txt").write_text(
            f"Synthetic WILDS-style dataset v{VERSION}, generated by pipeline.data.synthetic.\n", encoding="utf-8"
        )
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def generate_corpus(out_dir: Path, cfg: SyntheticConfig, *, workers: int | None = None) -> Path:
    """Write the captioned corpus to ``out_dir`` and return ``out_dir/corpus.csv``.

    open_clip's CSV convention: header ``filepath,title`` (plus ``label``, the object's shape),
    file paths relative to the CSV's folder, images under ``out_dir/images/``. ``out_dir`` belongs to this function: it is
    built beside itself and swapped in whole when complete. Deterministic in ``cfg``.
    """
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = _tmp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    try:
        items = [(i, f"images/{i:06d}.png", item) for i, item in enumerate(_corpus_items(cfg))]
        titles = _draw_all(cfg, [("corpus", items)], tmp, captions=True, workers=workers)
        with open(tmp / "corpus.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            # `label`: the object's shape, the label a vision-only model pre-trains on (the
            # role ImageNet's classes play; pipeline.training.pretrain.pretrain_vision)
            writer.writerow(("filepath", "title", "label"))
            writer.writerows((path, title, ALL_SHAPES[item.shape])
                             for (_, path, item), title in zip(items, titles))
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / "corpus.csv"


# ---------------------------------------------------------------------------------------------
# the wilds dataset


class SyntheticDataset(DomainDataset, WILDSDataset):
    """The built-in synthetic dataset, a WILDS dataset like iWildCam.

    Supported `split_scheme`:
        - 'official'
    Input (x):
        RGB images (32 × 32 by default) of one drawn object on a background.
    Label (y):
        the object's shape (8 classes), or the attribute `SyntheticConfig.label` names
        (colour: 6, texture: 4, size: 2); its prompts are the folder's `prompts.json`.
    Metadata:
        domain (background, the 'camera location'), colour, size, texture, shape (unless it
        is the label), y.
    Splits:
        train, id_val, id_test on the ID backgrounds; val, test on unseen OOD backgrounds.
    Official metric:
        acc_avg; also F1-macro_all and acc_worst_domain (worst background).
    Data:
        generated locally by `generate_dataset` (the `prepare` stage); `download=True`
        generates the default configuration when the folder is missing.
    """

    _dataset_name = "synthetic"
    _versions_dict = {VERSION: {"download_url": None, "compressed_size": None}}

    def __init__(self, version=None, root_dir="data", download=False, split_scheme="official"):
        self._version = version
        self._split_scheme = split_scheme
        if self._split_scheme != "official":
            raise ValueError(f"Split scheme {self._split_scheme} not recognized")
        self.check_version()

        # wilds' own initialize_data_dir would try to download; this data is generated.
        data_dir = Path(root_dir) / f"{self.dataset_name}_v{self.version}"
        if not (data_dir / f"RELEASE_v{self.version}.txt").is_file():
            if not download:
                raise FileNotFoundError(
                    f"The synthetic dataset was not found: {data_dir} (with RELEASE_v{self.version}.txt) "
                    f"does not exist. The `prepare` stage generates it (`dvc repro prepare`), or call "
                    f"pipeline.data.synthetic.generate_dataset(Path('{root_dir}'), SyntheticConfig())."
                )
            print(f"Generating the synthetic dataset (default configuration) in {data_dir}...")
            generate_dataset(Path(root_dir), SyntheticConfig())
        self._data_dir = data_dir

        import pandas as pd

        df = pd.read_csv(data_dir / "metadata.csv")
        self.attributes = json.loads((data_dir / "attributes.json").read_text(encoding="utf-8"))

        self._split_dict = {"train": 0, "val": 1, "test": 2, "id_val": 3, "id_test": 4}
        self._split_names = {
            "train": "Train", "val": "Validation (OOD)", "test": "Test (OOD)",
            "id_val": "Validation (ID)", "id_test": "Test (ID)",
        }
        unknown = set(df["split"]) - set(self._split_dict)
        if unknown:
            raise ValueError(f"{data_dir / 'metadata.csv'}: unknown split names {sorted(unknown)}")
        self._split_array = df["split"].map(self._split_dict).to_numpy()
        self._input_array = df["filename"].to_numpy()

        self._y_array = torch.as_tensor(df["y"].to_numpy(), dtype=torch.long)
        self._y_size = 1
        self._n_classes = len(self.attributes["y"])

        self.prompt_file = data_dir / PROMPT_FILE
        self._metadata_fields = _metadata_fields(self.attributes["label"])
        df["shape"] = df["shape"].map({s: i for i, s in enumerate(self.attributes["shape"])})
        self._metadata_array = torch.as_tensor(np.stack([df[c].to_numpy() for c in self._metadata_fields], axis=1),
                                               dtype=torch.long)
        self._metadata_map = {k: list(self.attributes[k]) for k in self._metadata_fields}
        self._original_resolution = (self.attributes["config"]["image_size"],) * 2

        self._eval_grouper = CombinatorialGrouper(dataset=self, groupby_fields=["domain"])
        super().__init__(root_dir, download, split_scheme)

    def describe(self, idx: int) -> str:
        """The generator's description of the idx-th image (`render.describe`): its shape,
        colour, size, texture and background, read from the metadata."""
        from pipeline.data.synthetic.render import describe

        meta = dict(zip(self._metadata_fields, self._metadata_array[idx].tolist()))
        names = {k: self.attributes[k][meta[k]] for k in ("colour", "size", "texture", "domain")}
        label = self.attributes["label"]
        names[label] = self.attributes["y"][int(self._y_array[idx])]
        if "shape" not in names:
            names["shape"] = self.attributes["shape"][meta["shape"]]
        return describe(names["shape"], names["colour"], names["size"], names["texture"], names["domain"])

    def get_input(self, idx):
        """The idx-th image as an RGB PIL image."""
        with Image.open(self.data_dir / self._input_array[idx]) as img:
            return img.convert("RGB")
