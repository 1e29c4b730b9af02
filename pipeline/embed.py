"""The `embed` stage: one pass of the pre-trained model.

Writes `data/embed/features.safetensors`:
- `split/<name>/image` [N, D] float16 — normalised image embeddings of every ID and OOD
  eval split (float16 halves the file; these are for analysis and reuse, not training
  targets), with `split/<name>/y` and `split/<name>/idx` (WILDS rows);
- `ref/image`, `ref/text` [R, D] float32 — the reference set's pre-trained embeddings,
  kept in float32 because DiVE subtracts them from fine-tuned embeddings every step and
  the difference starts at zero;
- `head` [C, D] float32 — the zero-shot head, and `task/<name>/head` for retention tasks.
and `data/embed/metrics.json`: zero-shot (k = 0) results through the dataset's official
eval, zero-shot retention task accuracies, IIMM (`iimm`: the paper's one template per class;
`iimm_ensemble`: the prompt-ensemble head) and the silhouette scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline import models, paths
from pipeline.config import Params
from pipeline.data.datasets import get_spec, load_dataset, load_prompts, official_eval
from pipeline.data.torchdata import ImageFiles, LabeledImages, read_caption_csv
from pipeline.env import resolve_device
from pipeline.measures import iimm, silhouettes
from pipeline.methods.base import EvalModel
from pipeline.prepare import dataset_root, reference_csv
from pipeline.progress import progress_bar
from pipeline.zeroshot import build_head, tokenize_prompts


PRELOAD_BUDGET = 2 << 30  # bytes of decoded images `preload` may keep in memory


@torch.no_grad()
def encode_images(model: EvalModel, dataset, device, batch_size: int = 256, num_workers: int = 0,
                  desc: str = "embed") -> torch.Tensor:
    """Normalised image embeddings of a dataset whose items are tensors or {image: tensor},
    or of a tensor of already transformed images [N, 3, H, W] (see `preload`)."""
    if isinstance(dataset, torch.Tensor):
        batches = (dataset[i:i + batch_size] for i in range(0, len(dataset), batch_size))
        total = -(-len(dataset) // batch_size)
    else:
        batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                              num_workers=num_workers, pin_memory=device.type == "cuda")
        total = None
    out = []
    for batch in progress_bar(batches, desc=desc, total=total):
        images = batch["image"] if isinstance(batch, dict) else batch
        out.append(model.encode_image(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def preload(dataset, batch_size: int = 256, num_workers: int = 0, budget: int = PRELOAD_BUDGET,
            desc: str = "decode"):
    """Decode and transform every image once, for several passes over the same images (the
    WiSE-FT α sweep). Returns a tensor [N, 3, H, W] when it fits in `budget` bytes, else the
    dataset itself (each pass then decodes again)."""
    if len(dataset) == 0:
        return dataset
    first = dataset[0]
    first = first["image"] if isinstance(first, dict) else first
    if first.numel() * first.element_size() * len(dataset) > budget:
        return dataset
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    parts = [b["image"] if isinstance(b, dict) else b for b in progress_bar(loader, desc=desc)]
    return torch.cat(parts)


@torch.no_grad()
def encode_texts(model: EvalModel, tokens: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([model.encode_text(tokens[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, tokens.shape[0], batch_size)])


@torch.no_grad()
def iimm_measures(model: EvalModel, image: torch.Tensor, labels: torch.Tensor, class_tokens: torch.Tensor,
                  ensemble_head: torch.Tensor) -> dict[str, float]:
    """IIMM with two definitions of the class embeddings t_c, named:
    - `iimm` (`iimm/s_intra`, `iimm/s_inter`): the paper's. Its code (mit-ll/IIMM,
      `get_tokenized_captions`) embeds one caption template per dataset, e.g. "a satellite
      image of a {c}" for FMoW and "a photo of a {c}" for most others; here that is the
      first template of the dataset's prompt file (each shipped file lists its plainest
      caption first: "satellite photo of a {c}." for FMoW, "a photo of {c}." for iWildCam);
    - `iimm_ensemble` (`iimm_ensemble/s_inter`): t_c = the prompt-ensemble zero-shot head
      (the mean over every template), the head the pipeline classifies with. S_intra does
      not involve t_c, so it is only reported once.
    The ensemble's t_c lie closer to the mean text direction, which shifts S_inter, and so
    IIMM, against the paper's values; the paper's regression lines need `iimm`.
    """
    device = model.scale.device
    single = build_head(model.encode_text, class_tokens[:, :1].to(device)).cpu()
    out = iimm(image, labels, single, "iimm")
    ensemble = iimm(image, labels, ensemble_head, "iimm_ensemble")
    del ensemble["iimm_ensemble/s_intra"]  # = iimm/s_intra
    return {**out, **ensemble}


def split_metrics(dataset, split: str, features: torch.Tensor, head: torch.Tensor,
                  rows: torch.Tensor) -> dict[str, float]:
    """Official eval of argmax(features · headᵀ) on one split -> flat `split/metric` keys."""
    preds = (features.float() @ head.float().t().cpu()).argmax(1)
    y_true = torch.as_tensor(dataset.y_array)[rows]
    metadata = torch.as_tensor(dataset.metadata_array)[rows]
    results = official_eval(dataset, preds, y_true, metadata)
    return {f"{split}/{k}": float(v) for k, v in results.items()}


@dataclass
class Retention:
    name: str
    dataset: object
    rows: torch.Tensor
    labels: torch.Tensor
    class_tokens: torch.Tensor


def retention_tasks(params: Params, tokenizer, main_dataset) -> list[Retention]:
    """The zero-shot tasks the fine-tuned model is not trained on (evaluate.zs_tasks)."""
    spec = get_spec(params.dataset.name)
    if params.evaluate.zs_tasks == "auto":
        wanted = list(spec.retention_tasks)
    else:
        wanted = []
        for name in params.evaluate.zs_tasks:
            ds_name, label = name.split("/", 1)
            other = get_spec(ds_name)
            found = [t for t in other.retention_tasks if t.name == name]
            if found:
                wanted.append(found[0])
            else:
                from pipeline.data.datasets import RetentionTask

                wanted.append(RetentionTask(dataset=ds_name, split=other.ood_splits[-1], label=label, name=name))
    tasks = []
    for t in wanted:
        if t.dataset == spec.name:
            ds = main_dataset
        else:
            other = get_spec(t.dataset)
            root = Path(params.dataset.root) if not other.generated else paths.GENERATED_ROOT
            ds = load_dataset(t.dataset, root, download=False)
        from pipeline.data.datasets import task_labels

        split_id = ds.split_dict[t.split]
        rows = torch.nonzero(torch.as_tensor(ds.split_array) == split_id).flatten()
        labels = task_labels(ds, rows, t.label)
        prompts = load_prompts(t.dataset, task=None if t.label == "y" else t.label)
        tasks.append(Retention(t.name, ds, rows, labels, tokenize_prompts(tokenizer, prompts.texts())))
    return tasks


def retention_metrics(model: EvalModel, tasks: list[Retention], transform, device,
                      batch_size: int, num_workers: int = 0,
                      features: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
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


def run(params: Params) -> dict:
    spec = get_spec(params.dataset.name)
    device = resolve_device(params.embed.device)
    torch.manual_seed(params.seed)
    paths.EMBED_METRICS.unlink(missing_ok=True)
    paths.EMBED.mkdir(parents=True, exist_ok=True)
    clip = models.create(params.model.arch, paths.PRETRAINED_WEIGHTS, device=device)
    model = EvalModel(clip.model).to(device).eval()
    dataset = load_dataset(spec.name, dataset_root(params), download=False)
    prompts = load_prompts(spec.name, n_classes=dataset.n_classes)
    class_tokens = tokenize_prompts(clip.tokenizer, prompts.texts())
    head = model.zeroshot_head(class_tokens).cpu()  # carries the logit scale
    tensors: dict[str, torch.Tensor] = {"head": (head / model.scale.cpu()).float()}
    metrics: dict[str, float] = {}
    bs, nw = params.embed.batch_size, params.embed.num_workers
    split_ids = torch.as_tensor(dataset.split_array)

    for split in (*spec.id_splits, *spec.ood_splits):
        rows = torch.nonzero(split_ids == dataset.split_dict[split]).flatten()
        feats = encode_images(model, LabeledImages(dataset, rows.tolist(), clip.preprocess_val),
                              device, bs, nw, desc=f"embed {split}")
        metrics.update(split_metrics(dataset, split, feats, head, rows))
        tensors[f"split/{split}/image"] = feats.half()
        tensors[f"split/{split}/idx"] = rows
        tensors[f"split/{split}/y"] = torch.as_tensor(dataset.y_array)[rows].long()

    # task difficulty on a seeded subsample of the training images
    train_rows = torch.nonzero(split_ids == dataset.split_dict[spec.train_split]).flatten()
    g = torch.Generator().manual_seed(params.seed)
    sub = train_rows[torch.randperm(len(train_rows), generator=g)[: params.embed.iimm_samples]].sort().values
    train_feats = encode_images(model, LabeledImages(dataset, sub.tolist(), clip.preprocess_val),
                                device, bs, nw, desc="embed train (IIMM)")
    train_y = torch.as_tensor(dataset.y_array)[sub].long()
    class_text = tensors["head"]
    metrics.update(iimm_measures(model, train_feats, train_y, class_tokens, class_text))
    metrics.update(silhouettes(train_feats, train_y, class_text))

    tasks = retention_tasks(params, clip.tokenizer, dataset)
    metrics.update(retention_metrics(model, tasks, clip.preprocess_val, device, bs, nw))

    files, titles = read_caption_csv(reference_csv(params), params.reference.separator,
                                     limit=params.reference.max_samples)
    ref_tokens = clip.tokenizer(titles)
    tensors["ref/image"] = encode_images(model, ImageFiles(files, clip.preprocess_val), device, bs, nw,
                                         desc="embed reference").float()
    tensors["ref/text"] = encode_texts(model, ref_tokens, device).float()
    tensors["ref/tokens"] = ref_tokens

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(paths.EMBED_FEATURES))
    paths.EMBED_INFO.write_text(json.dumps({
        "arch": params.model.arch, "weights_sha256": models.file_sha256(paths.PRETRAINED_WEIGHTS),
        "reference_rows": len(files), "dtype": {"split": "float16", "ref": "float32"},
    }, indent=1))
    metrics = {k: metrics[k] for k in sorted(metrics)}
    paths.EMBED_METRICS.write_text(json.dumps(metrics, indent=1))
    return metrics


def load_features() -> dict[str, torch.Tensor]:
    if not paths.EMBED_FEATURES.exists():
        raise FileNotFoundError(f"{paths.EMBED_FEATURES} not found: run `dvc repro embed` first")
    return load_file(str(paths.EMBED_FEATURES))
