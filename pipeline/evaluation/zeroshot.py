"""Zero-shot evaluation pieces shared by the embed stage (the pre-trained model, k = 0) and the
evaluate stage (every fine-tuned model): official metrics of a split, and zero-shot retention
on tasks the model was not fine-tuned on."""

from __future__ import annotations

from dataclasses import dataclass
import torch

from pipeline.data.imagecache import collection_name
from pipeline.data.retention import load_task
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


def retention_tasks(records: list[dict], tokenizer, main_dataset, main_name: str, images=None) -> list[Retention]:
    """The prepared retention tasks (`pipeline.data.retention`, `data/prepared/retention.json`)
    with their class prompts tokenised for this model. `images`: the image cache
    (`pipeline.data.imagecache.ImageCache`) the tasks' images are read from; a task on the main
    dataset reads through `main_dataset`."""
    out = []
    for record in records:
        t = load_task(record, main_dataset, main_name)
        ds = t.dataset
        if images is not None and ds is not main_dataset:
            ds = images.dataset(collection_name(f"retention-{t.name}"), ds)
        out.append(Retention(t.name, ds, t.rows, t.labels, tokenize_prompts(tokenizer, t.prompts.texts())))
    return out


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
