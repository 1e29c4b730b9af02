"""Zero-shot evaluation pieces shared by the embed stage (the pre-trained model, k = 0) and the
evaluate stage (every fine-tuned model): official metrics of a split, and zero-shot retention
on tasks the model was not fine-tuned on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.datasets import (RetentionTask, get_spec, load_dataset, load_prompts, official_eval, split_metrics, split_rows,
                                    task_labels)
from pipeline.data.torchdata import LabeledImages
from pipeline.models.encode import encode_images
from pipeline.models.zeroshot import tokenize_prompts


@dataclass
class Retention:
    name: str
    dataset: object
    rows: torch.Tensor
    labels: torch.Tensor
    class_tokens: torch.Tensor


def retention_tasks(dataset_name: str, zs_tasks, data_root: Path, generated_root: Path, tokenizer,
                    main_dataset) -> list[Retention]:
    """The zero-shot tasks the fine-tuned model is not trained on (`evaluate.zs_tasks`: 'auto'
    = the dataset's own retention tasks, or names '<dataset>/<label>'). Other datasets are
    loaded from `generated_root` (generated ones) or `data_root`."""
    spec = get_spec(dataset_name)
    if zs_tasks == "auto":
        wanted = list(spec.retention_tasks)
    else:
        wanted = []
        for name in zs_tasks:
            ds_name, label = name.split("/", 1)
            other = get_spec(ds_name)
            found = [t for t in other.retention_tasks if t.name == name]
            wanted.append(found[0] if found else
                          RetentionTask(dataset=ds_name, split=other.ood_splits[-1], label=label, name=name))
    tasks = []
    for t in wanted:
        if t.dataset == spec.name:
            ds = main_dataset
        else:
            other = get_spec(t.dataset)
            ds = load_dataset(t.dataset, generated_root if other.generated else Path(data_root), download=False)
        rows = split_rows(ds, t.split)
        labels = task_labels(ds, rows, t.label)
        prompts = load_prompts(t.dataset, task=None if t.label == "y" else t.label)
        tasks.append(Retention(t.name, ds, rows, labels, tokenize_prompts(tokenizer, prompts.texts())))
    return tasks


def retention_metrics(model, tasks: list[Retention], transform, device, batch_size: int,
                      num_workers: int = 0, features: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Zero-shot accuracy on each retention task, heads from `model`'s own text tower.
    `features`: image embeddings by task name, already computed with `model` (else encoded)."""
    out = {}
    for t in tasks:
        if features is not None and t.name in features:
            feats = features[t.name]
        else:
            ds = LabeledImages(t.dataset, t.rows.tolist(), transform)
            feats = encode_images(model, ds, device, batch_size, num_workers, desc=f"zs {t.name}")
        head = model.zeroshot_head(t.class_tokens).cpu()
        preds = (feats @ head.t()).argmax(1)
        out[f"zs/{t.name}/acc"] = float((preds == t.labels).float().mean())
    return out
