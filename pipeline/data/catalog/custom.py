"""`dataset.name: custom`: your own images, configured in `prepare.custom` (a CSV or a folder
tree; `pipeline/data/custom.py`). `prepare` writes the WILDS folder; nothing downstream knows it
is not a WILDS dataset."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.custom.config import CustomConfig
from pipeline.data.datasets import DatasetSpec, register_dataset


def _load(root: Path, download: bool):
    from pipeline.data.custom import CustomDataset

    return CustomDataset(root_dir=str(root))


def _generate(root: Path, options: CustomConfig) -> None:
    from pipeline.data.custom import generate_dataset

    generate_dataset(root, options)


def _validate(options: CustomConfig) -> None:
    from pipeline.data.custom.config import build_table

    build_table(options)


register_dataset(DatasetSpec(
    name="custom",
    version="1.0",
    train_split="train",
    id_splits=("id_val", "id_test"),
    ood_splits=("val", "test"),
    metric="acc_avg",
    extra_metrics=("F1-macro_all", "acc_worst_domain"),
    prompt_file="",  # written with the data: CustomDataset.prompt_file (from prepare.custom.templates)
    retention_tasks=(),
    download_hint=("The custom dataset is written by the prepare stage from `prepare.custom` "
                   "(a CSV or a folder tree of your images): run `dvc repro prepare`."),
    loader=_load,
    generate=_generate,
    options=CustomConfig,
    validate=_validate,
))
