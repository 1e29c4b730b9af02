"""The `images` stage: the prepared image cache (`pipeline.data.imagecache`): every image
finetune, embed and evaluate read (the dataset's train and evaluation splits, the retention
tasks' chosen images, the reference images), decoded once and stored after the model's
resize step, in `data/images/`.

It depends on `data/image_key.json` (written by `check`: the dataset, the model's resize step
and `images.format`/`quality`), not on `model` itself, so another architecture with the same
image size and interpolation rebuilds nothing, and a new image size rebuilds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline import artifacts as paths
from pipeline.config import Params, load_params
from pipeline.stages.common import ParamsOpt, guard, image_key, run_command


class _Files:
    """Row j -> the PIL image of file j (picklable, for DataLoader workers)."""

    def __init__(self, files):
        self.files = list(files)

    def __call__(self, j: int):
        from PIL import Image

        with Image.open(self.files[j]) as im:
            im.load()
            return im.copy()


def collections(params: Params, dataset, spec) -> list[tuple[str, object, list[int]]]:
    """(name, source, rows) of everything the model stages read."""
    import numpy as np

    from pipeline.data.imagecache import collection_name
    from pipeline.data.retention import load_task, read_records
    from pipeline.data.torchdata import read_caption_csv

    split = np.asarray(dataset.split_array)
    used = [dataset.split_dict[s] for s in (spec.train_split, *spec.eval_splits) if s in dataset.split_dict]
    main = set(np.nonzero(np.isin(split, used))[0].tolist())
    out = []
    for record in read_records(paths.PREPARED_RETENTION):
        t = load_task(record, dataset, spec.name)
        if t.dataset is dataset:
            main.update(int(r) for r in t.rows)
        else:
            out.append((collection_name(f"retention-{t.name}"), t.dataset.get_input, t.rows.tolist()))
    files, _ = read_caption_csv(paths.reference_csv(params.reference.csv), params.reference.separator,
                                limit=params.reference.max_samples)
    out.append(("reference", _Files(files), list(range(len(files)))))
    return [("main", dataset.get_input, sorted(main)), *out]


def run(params: Params) -> dict:
    from pipeline import models
    from pipeline.data.datasets import get_spec, load_dataset
    from pipeline.data.imagecache import build, resize_step

    spec = get_spec(params.dataset.name)
    dataset = load_dataset(spec.name, paths.dataset_root(spec.generated, params.dataset.root), download=False)
    # random weights: only its transforms are used (those of a `model.pretrained` tag)
    clip = models.create(params.model.arch, pretrained=params.model.pretrained)
    key = image_key(params, clip.preprocess_val)
    resize = resize_step(clip.preprocess_val) if key["format"] != "none" else None
    return build(paths.IMAGES, key, resize, collections(params, dataset, spec), params.images.num_workers)


@guard
def command(params_file: Path = ParamsOpt):
    """Prepared data -> data/images: every image the model stages read, decoded once.

    Stored after the model's resize step (`images.format`: raw uint8 through a memory map,
    jpeg re-encoded, or none to read the originals); evaluation from a raw cache is
    bit-identical to evaluation from the originals."""
    index = run(load_params(params_file))
    typer.echo(json.dumps({name: c["images"] for name, c in index["collections"].items()}))


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "images")
