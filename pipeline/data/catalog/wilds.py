"""The five WILDS datasets, loaded by `wilds.get_dataset` (the spec's `loader` is None)."""

from __future__ import annotations

from pipeline.data.datasets import DatasetSpec, register_dataset, wilds_hint

# WILDS selects models on the OOD validation split ("val") where a dataset has one, and so do
# we; ID validation would reward overfitting to the training domains. The domain fields are
# the `groupby_fields` of WILDS' examples/configs/datasets.py (its training groupers); RxRx1,
# absent there, by its experiment (the batches that are its domains in the WILDS paper).
register_dataset(DatasetSpec(
    name="iwildcam",
    version="2.0",
    train_split="train",
    id_splits=("id_val", "id_test"),
    ood_splits=("val", "test"),
    metric="F1-macro_all",
    extra_metrics=("acc_avg", "recall-macro_all"),
    prompt_file="iwildcam.json",
    retention_tasks=(),
    download_hint=wilds_hint("iwildcam", "about 12 GB"),
    domain_fields=("location",),
))
register_dataset(DatasetSpec(
    name="fmow",
    version="1.1",
    train_split="train",
    id_splits=("id_val", "id_test"),
    ood_splits=("val", "test"),
    metric="acc_worst_region",
    extra_metrics=("acc_avg", "acc_worst_year"),
    prompt_file="fmow.json",
    retention_tasks=(),
    download_hint=wilds_hint("fmow", "about 54 GB"),
    domain_fields=("year",),
))
register_dataset(DatasetSpec(
    name="camelyon17",
    version="1.0",
    train_split="train",
    id_splits=("id_val",),  # Camelyon17 has no id_test split.
    ood_splits=("val", "test"),
    metric="acc_avg",
    extra_metrics=("acc_wg",),
    prompt_file="camelyon17.json",
    retention_tasks=(),
    download_hint=wilds_hint("camelyon17", "about 11 GB"),
    domain_fields=("hospital",),
))
register_dataset(DatasetSpec(
    name="rxrx1",
    version="1.0",
    train_split="train",
    id_splits=("id_test",),  # RxRx1 has no id_val split.
    ood_splits=("val", "test"),
    metric="acc_avg",
    extra_metrics=("acc_wg",),
    prompt_file="rxrx1.json",
    retention_tasks=(),
    download_hint=wilds_hint("rxrx1", "about 7.4 GB"),
    domain_fields=("experiment",),
))
register_dataset(DatasetSpec(
    name="waterbirds",
    version="1.0",
    train_split="train",
    # Waterbirds has no ID split: val and test are group-balanced, and the shift is
    # measured by the worst group, so both count as OOD.
    id_splits=(),
    ood_splits=("val", "test"),
    metric="acc_wg",
    extra_metrics=("adj_acc_avg",),  # waterbirds' eval drops plain acc_avg
    prompt_file="waterbirds.json",
    retention_tasks=(),
    download_hint=wilds_hint("waterbirds", "under 1 GB"),
    domain_fields=("background", "y"),
))
