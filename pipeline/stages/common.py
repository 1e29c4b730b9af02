"""What every stage shares (not a stage itself): the command-line runner with its one-line
errors, and the opening most stages repeat (dataset, prompts, model, tokens)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import typer

from pipeline import artifacts
from pipeline.config import Params, ParamsError

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="Params file to read.")


def fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def guard(fn: Callable) -> Callable:
    """Known user errors end with one clear line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ParamsError, FileNotFoundError, KeyError, ValueError) as err:
            fail(err)
    return wrapper


def run_command(command: Callable, argv: list[str] | None = None, name: str | None = None) -> None:
    """Run one stage command as its own program (the DVC entry points in stages/); it ends the
    process (typer exits with the command's status), without the collector's walk at exit."""
    from pipeline.core.env import freeze_for_exit

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name=name)(command)
    try:
        app(args=sys.argv[1:] if argv is None else argv, prog_name=name or command.__name__)
    finally:
        freeze_for_exit()


@dataclass
class Task:
    """The dataset and model side of a run: spec, WILDS dataset (reading the image cache),
    prompts, model, class tokens, and the image cache itself (for the retention tasks and the
    reference images)."""

    spec: object
    dataset: object
    prompts: object
    clip: object
    class_tokens: object
    images: object = None


def expect_record(path: Path, record: dict) -> None:
    """The check stage's record at `path` must be `record` (what the code and params say now):
    a DVC entry depends on the record, so one out of date would pair results with other code."""
    import json

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the check stage writes it (`dvc repro check`, or `dvc repro`)")
    if json.loads(path.read_text()) != json.loads(json.dumps(record)):
        raise ValueError(f"{path}: out of date with the code or params.yaml; run `dvc repro` (the check stage "
                         "rewrites it first) rather than this stage alone")


def image_key(params: Params, eval_transform) -> dict:
    """The image cache's key for these params and this model's evaluation transform."""
    from pipeline.data.imagecache import image_key as key

    return key(params.dataset.name, eval_transform, params.images.format, params.images.quality)


def open_task(params: Params, device, weights: Path = artifacts.PRETRAINED_WEIGHTS) -> Task:
    """Everything a model stage opens; the dataset's images come from the image cache
    (`dvc repro images`), checked to be built for this dataset and this model's resize."""
    from pipeline import models
    from pipeline.data.datasets import get_spec, load_dataset, load_prompts
    from pipeline.data.imagecache import ImageCache
    from pipeline.models.zeroshot import tokenize_prompts

    spec = get_spec(params.dataset.name)
    dataset = load_dataset(spec.name, artifacts.dataset_root(spec.generated, params.dataset.root), download=False)
    prompts = load_prompts(spec.name, n_classes=dataset.n_classes, dataset=dataset)
    clip = models.create(params.model.arch, weights, device=device, tokenizer=params.model.tokenizer,
                         pretrained=params.model.pretrained)
    images = ImageCache.open(artifacts.IMAGES, image_key(params, clip.preprocess_val))
    return Task(spec, images.dataset("main", dataset), prompts, clip,
                tokenize_prompts(clip.tokenizer, prompts.texts()), images)


def method_model(params: Params, method_cls, task: Task, device):
    """The pre-trained model a method starts from, with its transforms: the task's CLIP, or for
    a vision-only method (`backbone = "vision"`) the `vision` stage's backbone, built at the
    CLIP's image size with the CLIP's transforms renormalised (`pipeline.models.vision`)."""
    if method_cls.backbone != "vision":
        return task.clip
    from pipeline.models import vision

    if not artifacts.VISION_WEIGHTS.is_file():
        raise FileNotFoundError(f"{artifacts.VISION_WEIGHTS}: no vision-only backbone; the `vision` stage writes it "
                                f"when finetune.methods has a vision-only method (`dvc repro vision`)")
    return vision.create(params.vision.arch, task.clip, artifacts.VISION_WEIGHTS, device)


def model_source(params: Params, method_cls) -> dict:
    """Which pre-trained model a method's runs start from: arch, `pretrained` setting, file."""
    if method_cls.backbone == "vision":
        return {"arch": params.vision.arch, "pretrained": params.vision.pretrained,
                "weights": artifacts.VISION_WEIGHTS}
    return {"arch": params.model.arch, "pretrained": params.model.pretrained,
            "weights": artifacts.PRETRAINED_WEIGHTS}


def has_text(model) -> bool:
    """Whether a model (open_clip's, an `EvalModel`, a vision-only backbone) has a text tower."""
    return bool(getattr(model, "has_text", True))


def headline(dataset_name: str, metrics: dict) -> str:
    """The numbers a person looks at first; every key is in the metrics file and MLflow."""
    import json

    from pipeline.data.datasets import get_spec

    spec = get_spec(dataset_name)
    keys = [f"{s}/{spec.metric}" for s in (*spec.id_splits, *spec.ood_splits)]
    keys += [k for k in metrics if k.startswith(("zs/", "rsa/", "iimm", "silhouette/", "transfer/"))
             or k == "selected/alpha"]
    return json.dumps({k: round(metrics[k], 4) for k in keys if k in metrics}, indent=1)


def mlflow_metrics(dataset_name: str, metrics: dict) -> dict:
    """What a run's page in MLflow shows: per split the official headline metric and the
    worst-group one (at α = 1 and at the selected α; the official one at each other α of the
    WiSE-FT sweep), the
    selection, the registered measures (retention, RSA, IIMM, ...) and the training figures;
    a few dozen numbers instead of every group's. The full breakdown is the run's metrics.json
    artifact."""
    from pipeline.data.datasets import get_spec

    spec = get_spec(dataset_name)

    def headline_metric(name: str) -> bool:
        return name == spec.metric or "worst" in name or name.endswith("_wg")

    out = {}
    for k, v in metrics.items():
        parts = k.split("/")
        if parts[0] == "wise":  # the sweep: the official metric per split at each α but 1 (α = 1 is the run itself)
            if parts[1] != "1" and len(parts) == 4 and parts[2] in (*spec.eval_splits, "fewshot_val") \
                    and parts[3] == spec.metric:
                out[k] = v
            continue
        if parts[0] == "selected" and len(parts) > 2:
            parts = parts[1:]
        split_metric = len(parts) == 2 and parts[0] in (*spec.eval_splits, "fewshot_val")
        if (split_metric and headline_metric(parts[1])) or parts[0] in ("zs", "rsa", "train", "selection") \
                or k.startswith(("iimm", "silhouette/", "transfer/", "selected/zs/", "selected/rsa/")) or k == "selected/alpha":
            out[k] = v
    return out


# ---- MLflow records of fine-tuning runs (written by finetune, completed by evaluate) ---------
#
# Structure: one parent run per method and level (`<method>/<level>`, a group holding the seed
# mean of the selected results), with one child per trial and seed (`<trial>/<level>/seed<S>`),
# live from its first training step. Evaluate adds the test-time results to the child of the
# trial each seed selected (tag `selected`), so every (method, level, seed, trial) has exactly
# one run, and only a selected run carries test metrics.


def group_key(method: str, level: str) -> str:
    return f"{method}/{level}"


def train_key(trial: str, level: str, seed: int) -> str:
    return f"{trial}/{level}/seed{seed}"


def group_info(params: Params, method: str, level) -> tuple[str, str, dict]:
    """Key, name and tags of the method's parent run at a level (tracking.group_run)."""
    return (group_key(method, level.name), f"{method} {level.label}",
            {"method": method, "level": level.name, "level_kind": level.kind, "dataset": params.dataset.name})


def sample_frame(dataset, sample: dict):
    """The k-shot training sample as a table (WILDS row, label, domain metadata): the training
    run's MLflow dataset input."""
    import pandas as pd
    import torch

    rows = torch.as_tensor(sample["indices"], dtype=torch.long)
    frame = {"row": rows.numpy(), "y": torch.as_tensor(dataset.y_array)[rows].numpy()}
    meta = torch.as_tensor(dataset.metadata_array)[rows]
    for j, field in enumerate(getattr(dataset, "metadata_fields", [])):
        if field != "y" and j < meta.shape[1]:
            frame[field] = meta[:, j].numpy()
    return pd.DataFrame(frame)


def training_run_info(params: Params, trial: str, level, seed: int, config: dict) -> dict:
    """The key, name, params and tags of a training run, and its parent's (for
    tracking.start_run / log_run)."""
    method = config["method"]
    tags = {"method": method, "trial": trial, "level": level.name, "level_kind": level.kind, "seed": str(seed),
            "dataset": params.dataset.name, "arch": config["arch"]}
    run_params = {"method": method, "trial": trial, "level": level.name, "level_kind": level.kind, "seed": seed,
                  "dataset": params.dataset.name, "arch": config["arch"], "pretrained": config["pretrained"],
                  "steps": config.get("steps"), "hparams": config["hparams"], "train": config["train"],
                  "threads": config.get("threads")}
    return {"key": train_key(trial, level.name, seed), "name": f"{trial} {level.label} seed={seed}",
            "params": run_params, "tags": tags, "group": group_info(params, method, level)}


def training_metrics(dataset_name: str, summary: dict, scores: dict, times: dict) -> dict:
    """What a training run shows once trained: the validation scores every protocol selects on
    (headline metrics only), trainable share, steps, wall time and peak memory."""
    import math

    out = mlflow_metrics(dataset_name, scores)
    out.update({"train/steps": summary["steps"], "train/n_train": summary["n_train"],
                "train/trainable_params": summary["trainable_params"],
                "train/trainable_share": summary["trainable_share"],
                "train/wall_time_s": times.get("wall_time_s", math.nan),
                "train/peak_memory_mb": times.get("peak_memory_mb", math.nan)})
    return out


def sample_input(params: Params, level, seed: int, dataset, sample: dict):
    from pipeline.core import tracking

    return tracking.sample_input(f"{params.dataset.name} {level.label} seed{seed}", sample_frame(dataset, sample),
                                 str(artifacts.sample_file(level.name, seed)))
