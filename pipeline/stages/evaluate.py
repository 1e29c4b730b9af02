"""The `evaluate` stage: ID and OOD through the official eval, every measure registered for
evaluation (zero-shot retention, RSA, ...), the WiSE-FT α sweep, model selection on a
validation split, MLflow logging.

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
import typer

from pipeline import artifacts as paths, models
from pipeline.artifacts import EVAL_METRICS as METRICS, EVAL_SELECTION, TRAIN_LOG
from pipeline.config import Params, ParamsError, load_params, to_dict
from pipeline.core import tracking
from pipeline.core.env import resolve_device
from pipeline.data.torchdata import ImageFiles, LabeledImages, read_caption_csv
from pipeline.evaluation.measures import MeasureInputs, compute_all
from pipeline.evaluation.selection import alpha_key, check_selection_split, select_alpha
from pipeline.evaluation.zeroshot import retention_tasks, split_metrics, split_rows
from pipeline.methods import METHODS, get_method, parse_hparams
from pipeline.models.encode import encode_images, preload
from pipeline.stages.common import ParamsOpt, guard, headline, open_task, run_command


def run(params: Params, method: str, k: int, seed: int, log_mlflow: bool = True) -> dict:
    device = resolve_device(params.evaluate.device)
    task = open_task(params, device)
    spec, dataset, clip = task.spec, task.dataset, task.clip
    check_selection_split(spec.select_split)
    out = paths.evaluate_dir(method, k, seed)
    (out / METRICS).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ep = params.evaluate
    method_cls = get_method(method)
    hp = parse_hparams(method, params.finetune.hparams.get(method))
    state, config, summary = paths.read_run(method, k, seed)
    cache = paths.load_features()
    alphas = sorted(set(ep.wise_alphas)) if method_cls.weight_space else [1.0]

    # Every image is decoded once and reused by every α (kept in memory up to
    # models.encode.PRELOAD_BUDGET); a retention task on the rows of an eval split reuses its features.
    transform = clip.preprocess_val
    bs, nw = ep.batch_size, ep.num_workers
    splits = {}
    for split in (*spec.id_splits, *spec.ood_splits):
        rows = split_rows(dataset, split)
        splits[split] = (rows, preload(LabeledImages(dataset, rows.tolist(), transform), bs, nw, desc=f"decode {split}"))
    tasks = retention_tasks(spec.name, ep.zs_tasks, Path(params.dataset.root), paths.GENERATED_ROOT,
                            clip.tokenizer, dataset)
    same_rows = {t.name: split for t in tasks for split, (rows, _) in splits.items()
                 if t.dataset is dataset and torch.equal(t.rows, rows)}
    task_images = {t.name: preload(LabeledImages(t.dataset, t.rows.tolist(), transform), bs, nw, desc=f"decode {t.name}")
                   for t in tasks if t.name not in same_rows}
    n_ref = min(ep.rsa_samples, cache["ref/image"].shape[0])
    ref_files, _ = read_caption_csv(paths.reference_csv(params.reference.csv), params.reference.separator, limit=n_ref)
    ref_images = preload(ImageFiles(ref_files, transform), bs, nw, desc="decode reference")

    metrics: dict[str, float] = {}
    per_alpha: dict[float, dict[str, float]] = {}
    for alpha in alphas:
        if alpha != alphas[0]:
            clip = models.create(params.model.arch, paths.PRETRAINED_WEIGHTS, device=device)
        model = method_cls.eval_model(clip.model, state, hp, cache["head"].to(device), alpha=alpha)
        model = model.to(device).eval()
        head = model.task_head(task.class_tokens.to(device)).cpu()
        m: dict[str, float] = {}
        feats_by_split = {}
        for split, (rows, images) in splits.items():
            feats_by_split[split] = encode_images(model, images, device, bs, nw, desc=f"eval {split} α={alpha:g}")
            m.update(split_metrics(dataset, split, feats_by_split[split], head, rows))
        task_feats = {name: feats_by_split[split] for name, split in same_rows.items()}
        task_feats.update({name: encode_images(model, images, device, bs, nw, desc=f"zs {name} α={alpha:g}")
                           for name, images in task_images.items()})
        m.update(compute_all("evaluate", MeasureInputs(
            model=model, device=device, batch_size=bs, num_workers=nw, transform=transform, tasks=tasks,
            task_features=task_feats, reference_images=ref_images, reference_image_pre=cache["ref/image"],
            reference_text_pre=cache["ref/text"], reference_tokens=cache["ref/tokens"][:n_ref])))
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
    (out / EVAL_SELECTION).write_text(json.dumps(selection, indent=1))
    (out / METRICS).write_text(json.dumps(metrics, indent=1))
    if log_mlflow:
        log_to_mlflow(params, method, k, seed, metrics, selection, paths.finetune_dir(method, k, seed), out)
    return metrics


def run_params(params: Params, method: str, k: int, seed: int) -> dict:
    """What MLflow records as the run's params: every setting that shaped the result."""
    return {
        "method": method, "shots": k, "seed": seed, "dataset": params.dataset.name,
        "arch": params.model.arch, "pretrained": params.model.pretrained,
        "git_commit": tracking.git_commit(),
        "hparams": to_dict(parse_hparams(method, params.finetune.hparams.get(method))),
        "train": to_dict(params.finetune.train),
    }


def log_to_mlflow(params: Params, method: str, k: int, seed: int, metrics: dict, selection: dict,
                  train_dir: Path, eval_dir: Path) -> str:
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
        artifacts=[eval_dir / METRICS, eval_dir / EVAL_SELECTION, train_dir / "config.json", log],
    )


@guard
def command(method: str = typer.Option(..., "--method", "-m"),
            shots: int = typer.Option(..., "--shots", "-k"),
            seed: int = typer.Option(..., "--seed"),
            params_file: Path = ParamsOpt):
    """Evaluate one fine-tuned run (ID, OOD, zero-shot retention, RSA, WiSE-FT sweep) ->
    runs/evaluate/<method>/k<K>_seed<S>/metrics.json and an MLflow run."""
    params = load_params(params_file)
    if method not in METHODS:
        raise ParamsError(f"--method: unknown method {method!r}; allowed: {', '.join(sorted(METHODS))}")
    metrics = run(params, method, shots, seed)
    typer.echo(headline(params.dataset.name, metrics))


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "evaluate")
