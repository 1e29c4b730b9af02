"""The `evaluate` stage: ID and OOD through the official eval, zero-shot retention, RSA,
the WiSE-FT α sweep, model selection on a validation split, MLflow logging.

Metric keys are flat `split/metric` (the α = 1 model, i.e. the fine-tuned one), plus
`wise/<α>/split/metric` for every α of the sweep, `selected/...` for the α chosen on the
dataset's validation split (never a test split), `zs/<task>/acc` and `rsa/image`,
`rsa/text`. The same dict goes to `metrics.json` and to MLflow.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from pipeline import artifacts as paths, models
from pipeline.core import tracking
from pipeline.config import Params, to_dict
from pipeline.data.datasets import get_spec, load_dataset, load_prompts
from pipeline.data.torchdata import ImageFiles, LabeledImages, read_caption_csv
from pipeline.stages.embed import (encode_images, encode_texts, load_features, preload, retention_metrics, retention_tasks,
                            split_metrics)
from pipeline.core.env import resolve_device
from pipeline.stages.finetune import TRAIN_LOG, read_run
from pipeline.evaluation.measures import rsa
from pipeline.methods import get_method
from pipeline.stages.prepare import dataset_root, reference_csv
from pipeline.models.zeroshot import tokenize_prompts

METRICS = "metrics.json"


def check_selection_split(split: str) -> None:
    if "test" in split:
        raise ValueError(f"model selection on {split!r} would leak the test set; use a val split")


def alpha_key(alpha: float) -> str:
    return f"wise/{alpha:g}"


def select_alpha(scores: dict[float, float]) -> float:
    """Best α on the validation split; ties go to the larger α (closer to the fine-tuned)."""
    return max(scores, key=lambda a: (scores[a], a))


def run(params: Params, method: str, k: int, seed: int, log_mlflow: bool = True) -> dict:
    spec = get_spec(params.dataset.name)
    check_selection_split(spec.select_split)
    out = paths.evaluate_dir(method, k, seed)
    (out / METRICS).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ep = params.evaluate
    device = resolve_device(ep.device)
    method_cls = get_method(method)
    hp = params.method_hparams(method)
    state, config, summary = read_run(method, k, seed)
    cache = load_features()
    dataset = load_dataset(spec.name, dataset_root(params), download=False)
    prompts = load_prompts(spec.name, n_classes=dataset.n_classes)
    split_ids = torch.as_tensor(dataset.split_array)
    alphas = sorted(set(ep.wise_alphas)) if method_cls.weight_space else [1.0]

    # Every image is decoded once and reused by every α (kept in memory up to
    # embed.PRELOAD_BUDGET); a retention task on the rows of an eval split reuses its features.
    clip = models.create(params.model.arch, paths.PRETRAINED_WEIGHTS, device=device)
    transform, tokenizer = clip.preprocess_val, clip.tokenizer
    class_tokens = tokenize_prompts(tokenizer, prompts.texts())
    bs, nw = ep.batch_size, ep.num_workers
    splits = {}
    for split in (*spec.id_splits, *spec.ood_splits):
        rows = torch.nonzero(split_ids == dataset.split_dict[split]).flatten()
        splits[split] = (rows, preload(LabeledImages(dataset, rows.tolist(), transform), bs, nw, desc=f"decode {split}"))
    tasks = retention_tasks(params, tokenizer, dataset)
    same_rows = {t.name: split for t in tasks for split, (rows, _) in splits.items()
                 if t.dataset is dataset and torch.equal(t.rows, rows)}
    task_images = {t.name: preload(LabeledImages(t.dataset, t.rows.tolist(), transform), bs, nw, desc=f"decode {t.name}")
                   for t in tasks if t.name not in same_rows}
    n_ref = min(ep.rsa_samples, cache["ref/image"].shape[0])
    ref_files, _ = read_caption_csv(reference_csv(params), params.reference.separator, limit=n_ref)
    ref_images = preload(ImageFiles(ref_files, transform), bs, nw, desc="decode reference")

    metrics: dict[str, float] = {}
    per_alpha: dict[float, dict[str, float]] = {}
    for alpha in alphas:
        if alpha != alphas[0]:
            clip = models.create(params.model.arch, paths.PRETRAINED_WEIGHTS, device=device)
        model = method_cls.eval_model(clip.model, state, hp, cache["head"].to(device), alpha=alpha)
        model = model.to(device).eval()
        head = model.task_head(class_tokens.to(device)).cpu()
        m: dict[str, float] = {}
        feats_by_split = {}
        for split, (rows, images) in splits.items():
            feats_by_split[split] = encode_images(model, images, device, bs, nw, desc=f"eval {split} α={alpha:g}")
            m.update(split_metrics(dataset, split, feats_by_split[split], head, rows))
        task_feats = {name: feats_by_split[split] for name, split in same_rows.items()}
        task_feats.update({name: encode_images(model, images, device, bs, nw, desc=f"zs {name} α={alpha:g}")
                           for name, images in task_images.items()})
        m.update(retention_metrics(model, tasks, transform, device, bs, nw, features=task_feats))
        m.update(_rsa(model, ref_images, cache, n_ref, device, bs))
        per_alpha[alpha] = m
        if method_cls.weight_space:
            metrics.update({f"{alpha_key(alpha)}/{k_}": v for k_, v in m.items()})

    metrics.update(per_alpha[1.0])
    select_key = f"{spec.select_split}/{spec.metric}"
    best = select_alpha({a: per_alpha[a][select_key] for a in alphas})
    metrics["selected/alpha"] = best
    metrics.update({f"selected/{k_}": v for k_, v in per_alpha[best].items()})
    metrics["train/trainable_params"] = summary["trainable_params"]
    metrics["train/trainable_share"] = summary["trainable_share"]
    metrics["train/wall_time_s"] = summary["wall_time_s"]
    metrics = {k_: metrics[k_] for k_ in sorted(metrics)}
    selection = {"split": spec.select_split, "metric": spec.metric, "alpha": best,
                 "alphas": alphas, "headline": spec.metric}
    (out / "selection.json").write_text(json.dumps(selection, indent=1))
    (out / METRICS).write_text(json.dumps(metrics, indent=1))
    if log_mlflow:
        log_to_mlflow(params, method, k, seed, metrics, selection, config,
                      paths.finetune_dir(method, k, seed), out)
    return metrics


def _rsa(model, ref_images, cache, n: int, device, batch_size: int) -> dict[str, float]:
    img = encode_images(model, ref_images, device, batch_size, desc="eval RSA")
    txt = encode_texts(model, cache["ref/tokens"][:n], device)
    return {"rsa/image": rsa(cache["ref/image"][:n], img), "rsa/text": rsa(cache["ref/text"][:n], txt)}


def run_params(params: Params, method: str, k: int, seed: int) -> dict:
    """What MLflow records as the run's params: every setting that shaped the result."""
    return {
        "method": method, "shots": k, "seed": seed, "dataset": params.dataset.name,
        "arch": params.model.arch, "pretrained": params.model.pretrained,
        "git_commit": tracking.git_commit(),
        "hparams": to_dict(params.method_hparams(method)) if method != "zeroshot" or k else {},
        "train": to_dict(params.finetune.train) if k else {},
    }


def log_to_mlflow(params: Params, method: str, k: int, seed: int, metrics: dict, selection: dict,
                  config: dict, train_dir: Path, eval_dir: Path) -> str:
    steps = []
    log = train_dir / TRAIN_LOG
    if log.exists():
        with open(log) as f:
            steps = list(csv.DictReader(f))
    tags = {"method": method, "shots": str(k), "seed": str(seed), "dataset": params.dataset.name,
            "arch": params.model.arch, "level": f"k={k}", "select_split": selection["split"]}
    p = run_params(params, method, k, seed)
    p["select_split"] = selection["split"]
    return tracking.log_run(
        experiment=params.dataset.name, key=f"{method}/k{k}/seed{seed}",
        run_name=f"{method} k={k} seed={seed}", params=p, tags=tags, metrics=metrics,
        step_metrics=steps,
        artifacts=[eval_dir / METRICS, eval_dir / "selection.json", train_dir / "config.json", log],
    )
