"""The `prepare` stage: dataset (real WILDS or generated) -> split table, prompts, reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import artifacts as paths
from pipeline.config import Params
from pipeline.data.datasets import get_spec, load_dataset, load_prompts
from pipeline.data.torchdata import read_caption_csv


def dataset_root(params: Params) -> Path:
    """Where the WILDS folder of `dataset.name` lives: generated datasets under
    data/prepared/wilds, real ones under `dataset.root`."""
    spec = get_spec(params.dataset.name)
    return paths.GENERATED_ROOT if spec.generated else Path(params.dataset.root)


def reference_csv(params: Params) -> Path:
    if params.reference.csv == "builtin":
        return paths.BUILTIN_REFERENCE / "corpus.csv"
    return Path(params.reference.csv)


def run(params: Params) -> dict:
    spec = get_spec(params.dataset.name)
    out = paths.PREPARED
    # nothing of a previous run may look finished while this one works
    paths.PREPARED_INFO.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    root = dataset_root(params)

    if spec.generated or params.reference.csv == "builtin":
        from pipeline.data.synthetic import generate_corpus, generate_dataset

        cfg = params.synthetic_config()
        if spec.generated:
            if spec.folder(root).exists():
                shutil.rmtree(spec.folder(root))
            generate_dataset(root, cfg)
    if paths.BUILTIN_REFERENCE.exists():
        shutil.rmtree(paths.BUILTIN_REFERENCE)
    if params.reference.csv == "builtin":
        generate_corpus(paths.BUILTIN_REFERENCE, cfg)
    paths.BUILTIN_REFERENCE.mkdir(parents=True, exist_ok=True)
    # what the reference set is, for the stages that depend on this folder
    (paths.BUILTIN_REFERENCE / "source.json").write_text(json.dumps({
        "csv": str(reference_csv(params)), "separator": params.reference.separator}))

    dataset = load_dataset(spec.name, root, download=params.dataset.download)
    prompts = load_prompts(spec.name, n_classes=dataset.n_classes)
    # validate the reference CSV now, not in the middle of training
    ref_files, _ = read_caption_csv(reference_csv(params), params.reference.separator,
                                    limit=params.reference.max_samples)
    missing = [str(f) for f in ref_files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{reference_csv(params)}: {len(missing)} image files are missing, "
                                f"e.g. {missing[0]}")

    split_names = {v: k for k, v in dataset.split_dict.items()}
    split = np.asarray(dataset.split_array)
    table = pd.DataFrame({
        "idx": np.arange(len(dataset)),
        "y": np.asarray(dataset.y_array),
        "split": [split_names.get(int(s), str(s)) for s in split],
    })
    table.to_csv(paths.SPLIT_TABLE, index=False)

    tasks = {}
    for task in spec.retention_tasks:
        p = load_prompts(task.dataset, task=None if task.label == "y" else task.label)
        tasks[task.name] = {"classnames": list(p.classnames), "templates": list(p.templates)}
    paths.PREPARED_PROMPTS.write_text(json.dumps({
        "classnames": list(prompts.classnames), "templates": list(prompts.templates), "tasks": tasks,
    }, indent=1))
    counts = {name: int((table["split"] == name).sum()) for name in dataset.split_dict}
    for s in (spec.train_split, *spec.id_splits, *spec.ood_splits):
        if counts.get(s, 0) == 0:
            raise ValueError(f"{spec.name}: split {s!r} is empty in {root}")
    info = {
        "dataset": spec.name,
        "root": str(root),
        "n_classes": int(dataset.n_classes),
        "n_samples": int(len(dataset)),
        "splits": counts,
        "reference_csv": str(reference_csv(params)),
        "reference_rows": len(ref_files),
    }
    paths.PREPARED_INFO.write_text(json.dumps(info, indent=1))
    return info


def read_info() -> dict:
    if not paths.PREPARED_INFO.exists():
        raise FileNotFoundError(f"{paths.PREPARED_INFO} not found: run `dvc repro prepare` first")
    return json.loads(paths.PREPARED_INFO.read_text())
