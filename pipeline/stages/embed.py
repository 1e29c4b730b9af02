"""The `embed` stage: one pass of the pre-trained model.

Writes `data/embed/features.safetensors`:
- `split/<name>/image` [N, D] float16 — normalised image embeddings of every ID and OOD
  eval split (float16 halves the file; these are for analysis and reuse, not training
  targets), with `split/<name>/y` and `split/<name>/idx` (WILDS rows);
- `ref/image`, `ref/text` [R, D] float32 — the reference set's pre-trained embeddings,
  kept in float32 because DiVE subtracts them from fine-tuned embeddings every step and
  the difference starts at zero;
- `head` [C, D] float32 — the zero-shot head.
and `data/embed/metrics.json`: zero-shot (k = 0) results through the dataset's official
eval, and every measure registered for the embed stage (retention; IIMM, `iimm` the paper's one
template per class, `iimm_ensemble` the prompt-ensemble head; silhouette; ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import typer

from pipeline import artifacts as paths
from pipeline.config import Params, load_params
from pipeline.stages.common import ParamsOpt, guard, open_task, run_command


def run(params: Params, log_mlflow: bool = True) -> dict:
    from safetensors.torch import save_file

    from pipeline import models
    from pipeline.core.env import resolve_device, set_threads
    from pipeline.data.datasets import split_metrics, split_rows
    from pipeline.data.torchdata import ImageFiles, LabeledImages, read_caption_csv
    from pipeline.evaluation.measures import MeasureInputs, compute_all
    from pipeline.data.retention import read_records
    from pipeline.evaluation.zeroshot import retention_tasks
    from pipeline.models.evalmodel import EvalModel
    from pipeline.models.encode import encode_images, encode_texts

    set_threads(params.threads)
    device = resolve_device(params.embed.device)
    torch.manual_seed(params.seed)
    paths.EMBED_METRICS.unlink(missing_ok=True)
    paths.EMBED.mkdir(parents=True, exist_ok=True)
    task = open_task(params, device)
    spec, dataset, clip = task.spec, task.dataset, task.clip
    model = EvalModel(clip.model).to(device).eval()
    head = model.zeroshot_head(task.class_tokens).cpu()  # carries the logit scale
    tensors: dict[str, torch.Tensor] = {"head": (head / model.scale.cpu()).float()}
    metrics: dict[str, float] = {}
    bs, nw = params.embed.batch_size, params.embed.num_workers

    for split in (*spec.id_splits, *spec.ood_splits):
        rows = split_rows(dataset, split)
        feats = encode_images(model, LabeledImages(dataset, rows.tolist(), clip.preprocess_val),
                              device, bs, nw, desc=f"embed {split}")
        metrics.update(split_metrics(dataset, split, feats, head, rows))
        tensors[f"split/{split}/image"] = feats.half()
        tensors[f"split/{split}/idx"] = rows
        tensors[f"split/{split}/y"] = torch.as_tensor(dataset.y_array)[rows].long()

    # task difficulty on a seeded subsample of the training images
    train_rows = split_rows(dataset, spec.train_split)
    g = torch.Generator().manual_seed(params.seed)
    sub = train_rows[torch.randperm(len(train_rows), generator=g)[: params.embed.iimm_samples]].sort().values
    train_feats = encode_images(model, LabeledImages(dataset, sub.tolist(), clip.preprocess_val),
                                device, bs, nw, desc="embed train (IIMM)")
    tasks = retention_tasks(read_records(paths.PREPARED_RETENTION), clip.tokenizer, dataset, spec.name, task.images)
    metrics.update(compute_all("embed", MeasureInputs(
        model=model, device=device, batch_size=bs, num_workers=nw, transform=clip.preprocess_val,
        tasks=tasks, train_features=train_feats, train_labels=torch.as_tensor(dataset.y_array)[sub].long(),
        class_text=tensors["head"], class_tokens=task.class_tokens)))

    files, titles = read_caption_csv(paths.reference_csv(params.reference.csv), params.reference.separator,
                                     limit=params.reference.max_samples)
    ref_tokens = clip.tokenizer(titles)
    ref_images = ImageFiles(files, clip.preprocess_val, task.images.store("reference"))
    tensors["ref/image"] = encode_images(model, ref_images, device, bs, nw, desc="embed reference").float()
    tensors["ref/text"] = encode_texts(model, ref_tokens, device).float()
    tensors["ref/tokens"] = ref_tokens

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(paths.EMBED_FEATURES))
    paths.EMBED_INFO.write_text(json.dumps({
        "arch": params.model.arch, "weights_sha256": models.file_sha256(paths.PRETRAINED_WEIGHTS),
        "reference_rows": len(files), "dtype": {"split": "float16", "ref": "float32"}, "threads": params.threads,
    }, indent=1))
    metrics = {k: metrics[k] for k in sorted(metrics)}
    # staged, logged to MLflow from there, moved into place last: metrics.json (the finished
    # marker) appears only after everything else succeeded
    staged = paths.EMBED / ".staging" / paths.EMBED_METRICS.name
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_text(json.dumps(metrics, indent=1))
    if log_mlflow:
        log_zeroshot(params, metrics, staged)
    os.replace(staged, paths.EMBED_METRICS)
    staged.parent.rmdir()
    return metrics


def log_zeroshot(params: Params, metrics: dict, metrics_file: Path) -> None:
    from pipeline.core import tracking
    from pipeline.stages.common import mlflow_metrics

    tracking.log_run(
        experiment=params.dataset.name, key="zeroshot/k0/seed0", run_name="zeroshot k=0",
        params={"method": "zeroshot", "shots": 0, "seed": 0, "dataset": params.dataset.name,
                "arch": params.model.arch, "pretrained": params.model.pretrained, "threads": params.threads,
                "git_commit": tracking.git_commit(), "hparams": {}, "train": {}},
        tags={"run_kind": "zeroshot", "method": "zeroshot", "shots": "0", "seed": "0", "dataset": params.dataset.name,
              "arch": params.model.arch, "level": "k=0"},
        metrics=mlflow_metrics(params.dataset.name, metrics), artifacts=[metrics_file],
    )


@guard
def command(params_file: Path = ParamsOpt):
    """One pass of the pre-trained model: cached embeddings, zero-shot (k = 0) metrics,
    IIMM and silhouette -> data/embed."""
    from pipeline.stages.common import headline

    params = load_params(params_file)
    metrics = run(params)
    typer.echo(headline(params.dataset.name, metrics))


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "embed")
