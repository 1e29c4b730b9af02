"""The `finetune` stage: one trial (a method and its hyper-parameters) at one level, for every
seed of sample.seeds. Saves only what the method trained, and the fine-tuned model's scores on
every split a selection protocol may read (`scores.json`), so the `selection` stage can choose
among trials and changing the protocol re-trains nothing.

One process runs every seed: the start-up (torch, open_clip, wilds: ~6 s) and the decoded
validation images are paid once per trial and level instead of once per seed.
With finetune.train.nproc_per_node > 1 it relaunches itself under torchrun (DDP)."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import socket
import time
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import typer

from pipeline import artifacts as paths, models
from pipeline.artifacts import CONFIG, SCORES, SUMMARY, TRAIN_LOG, WEIGHTS
from pipeline.config import Params, load_params, to_dict
from pipeline.core import dist
from pipeline.core.env import resolve_device, seed_everything, set_threads
from pipeline.core.levels import Level
from pipeline.data.captions import training_captions
from pipeline.data.datasets import domain_groups, split_metrics, split_rows
from pipeline.data.sampling import FEWSHOT_VAL, read_sample
from pipeline.data.torchdata import ImageFiles, LabeledImages, read_caption_csv
from pipeline.methods import get_method, parse_hparams, trial_record
from pipeline.methods.base import ReferenceData, TaskContext, count_params
from pipeline.models.encode import FeatureMemo, encode_images, preload, weights_digest
from pipeline.stages.common import (ParamsOpt, expect_record, guard, has_text, method_model, model_source, open_task,
                                    run_command, sample_input, training_metrics, training_run_info)
from pipeline.training.train import budget_steps, fit


TRAIN_MEMO_BYTES = 512 << 20

# checkpoints/<trial>/<level>/seed<S>/finished/: a finished seed's complete outputs, kept beside its
# checkpoint until every seed of the entry is done. DVC deletes the entry's output folder before it
# re-runs an interrupted entry; the re-run restores these instead of training the seed again.
FINISHED = "finished"
KEPT_FILES = (WEIGHTS, CONFIG, SCORES, TRAIN_LOG, SUMMARY)  # SUMMARY (the finished marker) last
KEPT_MANIFEST = "manifest.json"


def run_config(params: Params, trial: str, level: Level, seed: int, steps: int,
               pretrained_sha256: str | None = None) -> dict:
    """Everything that determines the trained weights (also the resume fingerprint).
    `pretrained_sha256`: the digest of the pre-trained weights file, when the caller has it
    (an entry reads it once for all its seeds: a ViT-B/16 file is ~600 MB); else read here."""
    method, overrides = params.finetune.trial(trial)
    source = model_source(params, get_method(method))
    return {
        "trial": trial, "method": method, "level": level.name, "seed": seed,
        "dataset": params.dataset.name, "arch": source["arch"], "pretrained": source["pretrained"],
        "pretrained_sha256": pretrained_sha256 or models.file_sha256(source["weights"]),
        "hparams": to_dict(parse_hparams(method, overrides, f"finetune.trials.{trial}")),
        "train": to_dict(params.finetune.train), "threads": params.threads, "steps": steps,
    }


def result_key(params: Params, config: dict, level: Level, seed: int) -> str:
    """SHA-256 of everything that determines a seed's outputs: its run config (trial, method,
    hyper-parameters, training settings, threads, steps, the pre-trained weights' digest), the
    other params the entry reads (its params in dvc.yaml), the digests of the files it reads
    (the prepared data, the image cache's index, the embeddings, the vision backbone's record,
    the seed's sample, the check stage's record, the trial's record) and of the code (every file of the `pipeline`
    package: broader than the entry's import closure, so never stale). A kept result, or a
    checkpoint, is used only under the same key."""
    import pipeline

    h = hashlib.sha256()
    ep = params.evaluate
    h.update(json.dumps({"config": config, "model": to_dict(params.model), "vision": to_dict(params.vision),
                         "reference": to_dict(params.reference),
                         "evaluate": {"batch_size": ep.batch_size, "num_workers": ep.num_workers}},
                        sort_keys=True, default=str).encode())
    # the trial's record: its code digests, and a captions file's digest (`trial_record`)
    for path in (paths.CHECKED, paths.trial_record(config["trial"]), paths.PREPARED_MANIFEST,
                 paths.IMAGES / "index.json", paths.VISION_INFO, paths.EMBED_FEATURES,
                 paths.sample_file(level.name, seed)):
        h.update(f"\0{path}\0{models.file_sha256(path) if path.is_file() else '-'}".encode())
    root = Path(pipeline.__file__).resolve().parent
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"\0{path.relative_to(root).as_posix()}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def build_context(params: Params, method_cls, task, backbone, model, indices, device, seed,
                  hp=None) -> TaskContext:
    """`backbone`: the method's pre-trained model and transforms (`method_model`); `model`: the
    copy of its model that trains; `hp` its hyper-parameters (a method with `needs_captions`
    names its captions file there)."""
    cache = paths.load_features()
    clip = backbone
    # a training sample is seen every epoch: decode it once (up to TRAIN_MEMO_BYTES)
    train_set = LabeledImages(task.dataset, indices, clip.preprocess_train, memo_bytes=TRAIN_MEMO_BYTES)
    reference = None
    if method_cls.needs_reference:
        files, _ = read_caption_csv(paths.reference_csv(params.reference.csv), params.reference.separator,
                                    limit=params.reference.max_samples)
        reference = ReferenceData(images=ImageFiles(files, clip.preprocess_val, task.images.store("reference")),
                                  tokens=cache["ref/tokens"], image_pre=cache["ref/image"].float(),
                                  text_pre=cache["ref/text"].float())
    captions = None
    if method_cls.needs_captions:  # one caption per training sample, in train_set order
        texts = training_captions(task.dataset, indices, hp.captions, task.spec)
        captions = task.clip.tokenizer(texts)
    # each training sample's domain, for batches uniform over domains (WILDS uniform_over_groups)
    groups = (domain_groups(task.dataset, task.spec.domain_fields, indices)
              if params.finetune.train.group_balanced else None)
    return TaskContext(
        model=model, class_tokens=task.class_tokens, train_groups=groups,
        zeroshot_head=cache["head"].float(), device=device, seed=seed, train_set=train_set,
        train_eval_set=train_set.with_transform(clip.preprocess_val), reference=reference, fit=fit,
        prompt_memory_bytes=params.finetune.train.prompt_memory_mb * 2**20, train_captions=captions,
        class_names=tuple(task.prompts.classnames), tokenizer=getattr(clip, "tokenizer", None),
    )


def run(params: Params, trial: str, level_name: str, progress: bool = True, log_mlflow: bool = True) -> list[dict]:
    """Train the trial at the level for every seed; returns the train summaries. With
    `log_mlflow`, each seed's MLflow run is live from its first step (losses as they are
    logged) and finished once its outputs are written."""
    set_threads(params.threads)
    tp = params.finetune.train
    level = params.sample.level(level_name)
    method, overrides = params.finetune.trial(trial)
    expect_record(paths.trial_record(trial), trial_record(trial, method, overrides))
    method_cls = get_method(method)
    hp = parse_hparams(method, overrides, f"finetune.trials.{trial}")
    device = resolve_device(tp.device)
    dist.init_from_env(device)
    if device.type == "cuda" and dist.is_distributed():
        device = torch.device("cuda", torch.cuda.current_device())
    task = open_task(params, device)
    backbone = method_model(params, method_cls, task, device)
    val_sets = _selection_sets(task, params, backbone) if dist.is_main() else {}
    pristine = backbone.model  # never changed: every seed trains, and is scored, on a copy
    # the file the backbone was loaded from (a DVC dep: unchanged while the entry runs), once
    pretrained_sha256 = models.file_sha256(model_source(params, method_cls)["weights"])
    summaries = []
    memo = FeatureMemo()  # the seeds' models that are equal (a frozen image tower) encode the val sets once
    for seed in params.sample.seeds:
        summaries.append(_run_seed(params, trial, level, seed, method_cls, hp, task, backbone, pristine, val_sets,
                                   device, progress, log_mlflow, pretrained_sha256, memo))
    dist.barrier()
    if dist.is_main():  # every seed is in the entry's output: the kept copies are spent
        for seed in params.sample.seeds:
            shutil.rmtree(paths.checkpoint_dir(trial, level.name, seed) / FINISHED, ignore_errors=True)
    dist.cleanup()
    return summaries


def _selection_sets(task, params: Params, backbone) -> dict:
    """The decoded images of every validation split a protocol may read, and of every retention
    task (key `zs:<task>`, value (task, images); none for a model without text tower), shared
    by the seeds, through the method's model's transform."""
    from pipeline.data.retention import read_records
    from pipeline.evaluation.zeroshot import retention_tasks

    ep = params.evaluate
    out = {}
    for split in task.spec.val_splits:
        rows = split_rows(task.dataset, split)
        out[split] = (rows, preload(LabeledImages(task.dataset, rows.tolist(), backbone.preprocess_val),
                                    ep.batch_size, ep.num_workers, desc=f"decode {split}"))
    if not has_text(backbone.model):
        return out
    for t in retention_tasks(read_records(paths.PREPARED_RETENTION), task.clip.tokenizer, task.dataset, task.spec.name,
                               task.images):
        out[f"zs:{t.name}"] = (t, preload(LabeledImages(t.dataset, t.rows.tolist(), backbone.preprocess_val),
                                          ep.batch_size, ep.num_workers, desc=f"decode {t.name}"))
    return out


def _run_seed(params, trial, level, seed, method_cls, hp, task, backbone, pristine, val_sets, device, progress,
              log_mlflow=True, pretrained_sha256=None, memo=None) -> dict:
    tp = params.finetune.train
    sample = read_sample(paths.sample_file(level.name, seed))
    steps = budget_steps(sample["n"], tp.batch_size, tp.epochs, tp.min_steps, tp.max_steps,
                         multiple=dist.world_size())
    out = paths.finetune_dir(trial, level.name, seed)
    ckpt_dir = paths.checkpoint_dir(trial, level.name, seed)
    config = run_config(params, trial, level, seed, steps, pretrained_sha256)
    key = result_key(params, config, level, seed) if dist.is_main() else None
    restored = None
    if dist.is_main():
        (out / SUMMARY).unlink(missing_ok=True)  # the "finished" marker goes last
        out.mkdir(parents=True, exist_ok=True)
        _check_resume_fingerprint(ckpt_dir, {**config, "result_key": key})
        restored = _restore(ckpt_dir / FINISHED, key, out)
        if restored is not None:
            typer.echo(f"seed {seed}: finished earlier, restored ({trial} {level.label}, "
                       f"{ckpt_dir / FINISHED})", err=True)
    restored = dist.from_main(restored)
    dist.barrier()
    if restored is not None:
        return restored

    jsonl = ckpt_dir / "train_log.jsonl"
    resuming = (ckpt_dir / "last.pt").exists()
    if not resuming:
        jsonl.unlink(missing_ok=True)  # a fresh start: no steps of an earlier run
    live = None
    if log_mlflow and dist.is_main():
        live = _start_run(params, trial, level, seed, config, task, sample, _read_jsonl(jsonl) if resuming else [],
                          resuming)
    try:
        summary, state, timing = _train(params, trial, level, seed, method_cls, hp, task, backbone, pristine, sample,
                                        steps, device, progress, ckpt_dir, jsonl, live)
        if dist.is_main():
            scores = _scores(params, task, backbone, method_cls, hp, state, copy.deepcopy(pristine), sample, val_sets,
                             device, memo or FeatureMemo())
            _write_outputs(params, trial, level, seed, method_cls, state, config, scores, summary, timing, device,
                           ckpt_dir, jsonl, live)
    except BaseException:
        if live is not None:
            try:
                live.fail()
            except Exception:  # (the store unreachable): the training error is the one to see
                pass
        raise
    dist.barrier()
    return summary


def _start_run(params, trial, level, seed, config, task, sample, history, resuming):
    """The seed's MLflow training run, child of the method's run at this level; a resumed
    run continues the interrupted one's start time and logged steps."""
    from pipeline.core import tracking

    info = training_run_info(params, trial, level, seed, config)
    parent = tracking.group_run(params.dataset.name, *info["group"])
    return tracking.start_run(params.dataset.name, info["key"], info["name"], info["params"], info["tags"],
                              parent=parent, history=history, resumed=resuming,
                              inputs=[sample_input(params, level, seed, task.dataset, sample)])


def _train(params, trial, level, seed, method_cls, hp, task, backbone, pristine, sample, steps, device, progress,
           ckpt_dir, jsonl, live):
    tp = params.finetune.train
    seed_everything(seed)
    ctx = build_context(params, method_cls, task, backbone, copy.deepcopy(pristine), sample["indices"], device, seed,
                        hp)
    m = method_cls(hp, ctx)
    logged = max((int(r["step"]) for r in _read_jsonl(jsonl)), default=0)  # (steps replayed after a resume)

    def log(step: int, record: dict) -> None:
        _append_log(jsonl, record)
        if live is not None and step > logged:
            live.log_step(step, record)

    desc = f"{trial} {level.label} seed={seed}"
    if method_cls.trains:
        train_set = ctx.train_set if method_cls.uses_images else ctx.train_set.without_images()
        result = fit(m, train_set, steps=steps, batch_size=tp.batch_size, seed=seed, device=device,
                     grad_accum=tp.grad_accum, grad_clip=tp.grad_clip, precision=tp.precision,
                     num_workers=tp.num_workers, checkpoint_dir=ckpt_dir,
                     checkpoint_every=tp.checkpoint_every, log=log,
                     progress=progress, desc=desc, groups=ctx.train_groups,
                     swa_start=tp.swa_start, swa_every=tp.swa_every)
        summary = {"steps": result.steps, "trainable_params": result.trainable_params,
                   "total_params": result.total_params}
        if result.runs > 1:  # a method that trains several runs of `steps` each and combines them
            summary["runs"] = result.runs
        timing = {"wall_time_s": result.wall_time_s, "samples_per_s": result.samples_per_s,
                  "resumed_from_step": result.resumed_from}
    else:
        m.setup()
        summary = {"steps": 0, "trainable_params": 0, "total_params": count_params(m.root.parameters())}
        timing = {"wall_time_s": 0.0, "samples_per_s": 0.0, "resumed_from_step": 0}
    summary["trainable_share"] = summary["trainable_params"] / max(summary["total_params"], 1)
    summary["n_train"] = sample["n"]
    summary["epochs"] = summary["steps"] * min(tp.batch_size, sample["n"]) / max(sample["n"], 1)

    state = m.trained_state()
    del m, ctx  # free the trained model (and what holds it) before the scoring copy
    return summary, state, timing


def _write_outputs(params, trial, level, seed, method_cls, state, config, scores, summary, timing, device,
                   ckpt_dir, jsonl, live) -> None:
    """Weights, config, scores, train log and run times, then the MLflow run finishes, and
    the finished marker (train_summary.json) goes last."""
    out = paths.finetune_dir(trial, level.name, seed)
    weights_sha256 = models.save_state_dict(state, out / WEIGHTS, meta={"method": method_cls.name, "trial": trial})
    (out / CONFIG).write_text(json.dumps(config, indent=1))
    (out / SCORES).write_text(json.dumps(scores, indent=1, sort_keys=True))
    _write_log(jsonl, out / TRAIN_LOG)
    times = {**timing, "peak_memory_mb": _peak_memory_mb(device), "host": socket.gethostname(),
             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    time_file = paths.run_time_file(trial, level.name, seed)
    time_file.parent.mkdir(parents=True, exist_ok=True)
    time_file.write_text(json.dumps(times, indent=1))
    if live is not None:
        # re-training to the same weights keeps the evaluation MLflow holds for them (evaluate
        # does not re-run for an unchanged output)
        live.finish(training_metrics(params.dataset.name, summary, scores, times),
                    tags={"weights_sha256": weights_sha256}, carry=("weights_sha256", "evaluated"))
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    _keep(out, ckpt_dir / FINISHED, json.loads((ckpt_dir / CONFIG).read_text())["result_key"])
    (ckpt_dir / "last.pt").unlink(missing_ok=True)  # finished: the checkpoint is spent
    jsonl.unlink(missing_ok=True)  # and its step log (now in train_log.csv)


@torch.no_grad()
def _scores(params, task, backbone, method_cls, hp, state, model, sample, val_sets, device,
            memo: FeatureMemo) -> dict[str, float]:
    """The fine-tuned model (α = 1) on the dataset's validation splits and on the sample's
    few-shot validation rows (`fewshot_val/<metric>`): what every protocol selects on; and its
    zero-shot accuracy on every retention task (`zs/<task>/acc`), so the report can show what
    each trial the protocol passed over would have kept. A model whose head is a
    `TunedClassifier` has its post-hoc settings chosen on each validation split
    (`search_posthoc`): that split's scores are at its choice, written as
    `posthoc/<split>/<name>`."""
    from pipeline.evaluation.zeroshot import retention_metrics

    ep = params.evaluate
    head0 = paths.load_features()["head"].to(device)
    model = method_cls.eval_model(model, state, hp, head0, alpha=1.0).to(device).eval()
    head = model.task_head(task.class_tokens.to(device)).cpu()
    scores: dict[str, float] = {}
    tasks, task_feats = [], {}
    digest = weights_digest(model)
    for split, (rows, images) in val_sets.items():
        feats = memo.encode(digest, model, images, device, ep.batch_size, ep.num_workers, desc=f"score {split}")
        if split.startswith("zs:"):
            tasks.append(rows)
            task_feats[rows.name] = feats
        else:
            scores.update(_val_metrics(task, split, feats, head, rows))
    if tasks:
        scores.update(retention_metrics(model, tasks, None, device, ep.batch_size, features=task_feats))
    if sample["n_val"]:
        rows = torch.as_tensor(sample["val_indices"])
        images = LabeledImages(task.dataset, sample["val_indices"], backbone.preprocess_val)
        feats = encode_images(model, images, device, ep.batch_size, ep.num_workers, desc=f"score {FEWSHOT_VAL}")
        scores.update(_val_metrics(task, FEWSHOT_VAL, feats, head, rows))
    return scores


def _val_metrics(task, split: str, feats, head, rows) -> dict[str, float]:
    """`split_metrics` of a validation split; with a `TunedClassifier` head, at the post-hoc
    setting chosen on this split (its official metric), recorded as `posthoc/<split>/<name>`."""
    from pipeline.evaluation.selection import check_selection_split, search_posthoc
    from pipeline.models.evalmodel import TunedClassifier

    check_selection_split(split)
    if not isinstance(head, TunedClassifier) or not head.search:
        return split_metrics(task.dataset, split, feats, head, rows)
    key = f"{split}/{task.spec.metric}"
    by_preds: dict[bytes, float] = {}  # the score is a function of the predictions: most grid points repeat one

    def score(classifier) -> float:
        with torch.no_grad():
            preds = classifier(feats.float()).argmax(1).cpu().numpy().tobytes()
        if preds not in by_preds:
            by_preds[preds] = split_metrics(task.dataset, split, feats, classifier, rows)[key]
        return by_preds[preds]

    setting, _ = search_posthoc(head, score)
    out = split_metrics(task.dataset, split, feats, head.at(**setting), rows)
    out.update({f"posthoc/{split}/{k}": float(v) for k, v in setting.items()})
    return out


def _keep(out: Path, kept: Path, key: str) -> None:
    """Copy a finished seed's outputs to `kept`, with their digests and the result key; the
    manifest goes last (and the folder is renamed into place), so a kill leaves no kept copy
    that looks complete."""
    staging = kept.with_name(kept.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(kept, ignore_errors=True)
    staging.mkdir(parents=True)
    digests = {}
    for name in KEPT_FILES:
        shutil.copyfile(out / name, staging / name)
        digests[name] = models.file_sha256(staging / name)
    (staging / KEPT_MANIFEST).write_text(json.dumps({"result_key": key, "files": digests}, indent=1))
    os.replace(staging, kept)


def _restore(kept: Path, key: str, out: Path) -> dict | None:
    """A finished seed's outputs kept under the same result key, copied into `out` (each file
    checked against its digest, the finished marker last); its summary, or None (nothing kept,
    kept for other inputs, or damaged: the seed trains)."""
    manifest = kept / KEPT_MANIFEST
    if not manifest.is_file():
        return None
    try:
        record = json.loads(manifest.read_text())
        ok = record["result_key"] == key and all(
            (kept / name).is_file() and models.file_sha256(kept / name) == record["files"][name] for name in KEPT_FILES)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        shutil.rmtree(kept)
        return None
    for name in KEPT_FILES:
        shutil.copyfile(kept / name, out / name)
    return json.loads((out / SUMMARY).read_text())


def _check_resume_fingerprint(ckpt_dir: Path, config: dict) -> None:
    """A checkpoint from different settings (a different result key) must never be resumed:
    drop it, and a finished seed kept beside it."""
    stamp = ckpt_dir / CONFIG
    if ckpt_dir.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != config):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(config, indent=1))


def _peak_memory_mb(device) -> float:
    """Peak memory of this process so far: the accelerator's allocations on CUDA, resident
    memory (ru_maxrss) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_log(jsonl: Path, out: Path) -> None:
    """Per-step loss terms as CSV. The JSON-lines log lives beside the checkpoint, so a
    resumed run keeps the steps its first part logged; steps replayed after the last
    checkpoint replace the killed run's (identical) records."""
    by_step = {int(rec["step"]): rec for rec in _read_jsonl(jsonl)}
    rows = [by_step[s] for s in sorted(by_step)]
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k)) or ["step"]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


@guard
def command(trial: str = typer.Option(..., "--trial", "-t", help="A trial of finetune.trials."),
            level: str = typer.Option(..., "--level", "-l", help="A level of sample.levels (e.g. 16 or 25%)."),
            params_file: Path = ParamsOpt):
    """Fine-tune one trial at one level, every seed -> runs/finetune/<trial>/<level>/seed<S>/
    (weights, config, train log, summary, validation scores).

    Resumes from checkpoints/<trial>/<level>/seed<S>/last.pt if an earlier run was interrupted.
    With finetune.train.nproc_per_node > 1 it relaunches itself under torchrun (DDP)."""
    params = load_params(params_file)
    params.finetune.trial(trial)
    params.sample.level(level)
    nproc = params.finetune.train.nproc_per_node
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "-m", "pipeline", "finetune", "--trial", trial, "--level", level, "--params", str(params_file)]
        raise typer.Exit(subprocess.call(cmd))
    summaries = run(params, trial, level)
    if int(os.environ.get("RANK", "0")) == 0:
        for seed, summary in zip(params.sample.seeds, summaries):
            typer.echo(json.dumps({"seed": seed, **summary}))


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "finetune")
