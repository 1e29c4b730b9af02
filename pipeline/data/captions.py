"""Captions of the training images, for a method that reads one per image (ARF's
text-compensated anchors, `Method.needs_captions`).

Two sources:
- a **captions file** (any captioner, run by the user): a CSV in open_clip's convention, header
  `filepath,title`, one row per image: `filepath` is the image as the dataset lists it (the
  WILDS metadata's file name, `image_key`: e.g. iWildCam's `8b2d....jpg`, the built-in data's
  `images/train_00012.png`; the row number for a dataset that lists no file names, e.g. FMoW),
  `title` its caption. Rows for images outside the training sample are ignored; every
  training image must have one (checked when the finetune stage starts, before training);
- the dataset's **own descriptions** (`DatasetSpec.describe`), when the captions file is
  empty: the built-in generator describes each image it drew (shape, colour, size, texture,
  background).

Neither: the check stage refuses the trial before any work (`check_captions`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from pipeline.core.validation import ParamsError

FORMAT = ("a CSV with header filepath,title: filepath the image as the dataset's metadata lists it (or its row "
          "number for a dataset that lists no file names), title its caption")


def read_captions(path: str | Path) -> dict[str, str]:
    """{image key: caption} of a captions file (ValueError naming the file and what is wrong)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: captions file not found ({FORMAT})")
    out: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"filepath", "title"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: needs columns filepath and title (missing {sorted(missing)}); "
                             f"found {reader.fieldnames}. Format: {FORMAT}")
        for n, row in enumerate(reader, start=2):
            key, title = (row["filepath"] or "").strip(), (row["title"] or "").strip()
            if not key or not title:
                raise ValueError(f"{path}: line {n} has an empty filepath or title")
            if key in out and out[key] != title:
                raise ValueError(f"{path}: line {n}: {key} has two different captions")
            out[key] = title
    if not out:
        raise ValueError(f"{path}: no rows. Format: {FORMAT}")
    return out


def image_key(dataset, row: int) -> str:
    """How a captions file names dataset row `row`: the file name the WILDS metadata lists for
    it (`_input_array`), else the row number."""
    names = getattr(dataset, "_input_array", None)
    return str(names[row]) if names is not None else str(row)


def check_captions(captions: str, spec, key: str, method: str) -> None:
    """The check stage's refusal, before any work: `captions` (a trial's hyper-parameter) names
    a readable captions file, or is "" on a dataset that describes its own images."""
    if not captions:
        if spec.describe is None:
            raise ParamsError(
                f"{key}: {method} needs a caption of every training image, and dataset {spec.name} has no built-in "
                f"descriptions (only generated datasets do). Run any captioner over the training images and set "
                f"{key} to the file: {FORMAT}")
        return
    try:
        read_captions(captions)
    except (OSError, ValueError) as err:
        raise ParamsError(f"{key}: {err}") from None


def training_captions(dataset, rows: Sequence[int], captions: str, spec) -> list[str]:
    """The caption of each of `rows` (dataset rows, the training sample), from the file
    `captions` or, when it is "", from the dataset's descriptions. ValueError naming the file
    and the first missing image when the file lacks one."""
    rows = [int(r) for r in rows]
    if not captions:
        if spec.describe is None:
            raise ValueError(f"dataset {spec.name} has no built-in descriptions: a captions file is needed ({FORMAT})")
        return [spec.describe(dataset, r) for r in rows]
    table = read_captions(captions)
    keys = [image_key(dataset, r) for r in rows]
    missing = [k for k in keys if k not in table]
    if missing:
        raise ValueError(f"{captions}: no caption for {len(missing)} of the {len(keys)} training images, e.g. "
                         f"{missing[0]!r} (filepath must be the image as the dataset's metadata lists it)")
    return [table[k] for k in keys]
