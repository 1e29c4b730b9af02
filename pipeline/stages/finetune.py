"""The `finetune` stage: one method × k × seed. Saves only what the method trained.

With finetune.train.nproc_per_node > 1 it relaunches itself under torchrun (DDP)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import typer

from pipeline import artifacts as paths, models
from pipeline.artifacts import CONFIG, SUMMARY, TRAIN_LOG, WEIGHTS
from pipeline.config import Params, ParamsError, load_params, to_dict
from pipeline.core import dist
from pipeline.core.env import resolve_device, seed_everything
from pipeline.data.sampling import read_sample
from pipeline.data.torchdata import ImageFiles, LabeledImages, read_caption_csv
from pipeline.methods import METHODS, get_method, parse_hparams
from pipeline.methods.base import ReferenceData, TaskContext, count_params
from pipeline.stages.common import ParamsOpt, guard, open_task, run_command
from pipeline.training.train import fit


def run_config(params: Params, method: str, k: int, seed: int) -> dict:
    """Everything that determines the trained weights (also the resume fingerprint)."""
    return {
        "method": method, "shots": k, "seed": seed, "dataset": params.dataset.name,
        "arch": params.model.arch, "pretrained": params.model.pretrained,
        "pretrained_sha256": models.file_sha256(paths.PRETRAINED_WEIGHTS),
        "hparams": to_dict(parse_hparams(method, params.finetune.hparams.get(method))),
        "train": to_dict(params.finetune.train),
    }


def build_context(params: Params, method_cls, task, indices, device, seed) -> TaskContext:
    clip = task.clip
    cache = paths.load_features()
    train_set = LabeledImages(task.dataset, indices, clip.preprocess_train)
    reference = None
    if method_cls.needs_reference:
        files, _ = read_caption_csv(paths.reference_csv(params.reference.csv), params.reference.separator,
                                    limit=params.reference.max_samples)
        reference = ReferenceData(images=ImageFiles(files, clip.preprocess_val),
                                  tokens=cache["ref/tokens"], image_pre=cache["ref/image"].float(),
                                  text_pre=cache["ref/text"].float())
    return TaskContext(
        model=clip.model, class_tokens=task.class_tokens,
        zeroshot_head=cache["head"].float(), device=device, seed=seed, train_set=train_set,
        train_eval_set=train_set.with_transform(clip.preprocess_val), reference=reference, fit=fit,
        prompt_memory_bytes=params.finetune.train.prompt_memory_mb * 2**20,
    )


def run(params: Params, method: str, k: int, seed: int, progress: bool = True) -> dict:
    tp = params.finetune.train
    device = resolve_device(tp.device)
    dist.init_from_env(device)
    if device.type == "cuda" and dist.is_distributed():
        device = torch.device("cuda", torch.cuda.current_device())
    method_cls = get_method(method)
    hp = parse_hparams(method, params.finetune.hparams.get(method))
    out = paths.finetune_dir(method, k, seed)
    ckpt_dir = paths.checkpoint_dir(method, k, seed)
    config = run_config(params, method, k, seed)
    if dist.is_main():
        (out / SUMMARY).unlink(missing_ok=True)  # the "finished" marker goes last
        out.mkdir(parents=True, exist_ok=True)
        _check_resume_fingerprint(ckpt_dir, config)
    dist.barrier()

    seed_everything(seed)
    task = open_task(params, device)
    sample = read_sample(paths.sample_file(k, seed))
    ctx = build_context(params, method_cls, task, sample["indices"], device, seed)
    m = method_cls(hp, ctx)
    jsonl = ckpt_dir / "train_log.jsonl"

    if method_cls.trains:
        train_set = ctx.train_set if method_cls.uses_images else ctx.train_set.without_images()
        result = fit(m, train_set, steps=tp.steps, batch_size=tp.batch_size, seed=seed, device=device,
                     grad_accum=tp.grad_accum, grad_clip=tp.grad_clip, precision=tp.precision,
                     num_workers=tp.num_workers, checkpoint_dir=ckpt_dir,
                     checkpoint_every=tp.checkpoint_every, log=lambda s, r: _append_log(jsonl, r),
                     progress=progress, desc=f"{method} k={k} seed={seed}")
        summary = {"steps": result.steps, "wall_time_s": result.wall_time_s,
                   "samples_per_s": result.samples_per_s, "resumed_from_step": result.resumed_from,
                   "trainable_params": result.trainable_params, "total_params": result.total_params}
    else:
        m.setup()
        summary = {"steps": 0, "wall_time_s": 0.0, "samples_per_s": 0.0, "resumed_from_step": 0,
                   "trainable_params": 0, "total_params": count_params(m.root.parameters())}
    summary["trainable_share"] = summary["trainable_params"] / max(summary["total_params"], 1)
    summary["n_train"] = sample["n"]

    if dist.is_main():
        models.save_state_dict(m.trained_state(), out / WEIGHTS, meta={"method": method})
        (out / CONFIG).write_text(json.dumps(config, indent=1))
        _write_log(jsonl, out / TRAIN_LOG)
        (out / SUMMARY).write_text(json.dumps(summary, indent=1))
        (ckpt_dir / "last.pt").unlink(missing_ok=True)  # finished: the checkpoint is spent
    dist.barrier()
    dist.cleanup()
    return summary


def _check_resume_fingerprint(ckpt_dir: Path, config: dict) -> None:
    """A checkpoint from different settings must never be resumed: drop it."""
    stamp = ckpt_dir / CONFIG
    if ckpt_dir.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != config):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(config, indent=1))


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _write_log(jsonl: Path, out: Path) -> None:
    """Per-step loss terms as CSV. The JSON-lines log lives beside the checkpoint, so a
    resumed run keeps the steps its first part logged; steps replayed after the last
    checkpoint replace the killed run's (identical) records."""
    by_step: dict[int, dict] = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    rows = [by_step[s] for s in sorted(by_step)]
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k)) or ["step"]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ParamsError(f"--method: unknown method {method!r}; allowed: {', '.join(sorted(METHODS))}")


@guard
def command(method: str = typer.Option(..., "--method", "-m", help="A registered method (see `methods`)."),
            shots: int = typer.Option(..., "--shots", "-k"),
            seed: int = typer.Option(..., "--seed"),
            params_file: Path = ParamsOpt):
    """Fine-tune one method on one k-shot sample -> runs/finetune/<method>/k<K>_seed<S>.

    Resumes from checkpoints/<method>/k<K>_seed<S>/last.pt if an earlier run was interrupted.
    With finetune.train.nproc_per_node > 1 it relaunches itself under torchrun (DDP)."""
    params = load_params(params_file)
    check_method(method)
    nproc = params.finetune.train.nproc_per_node
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "-m", "pipeline", "finetune", "--method", method, "--shots", str(shots),
               "--seed", str(seed), "--params", str(params_file)]
        raise typer.Exit(subprocess.call(cmd))
    summary = run(params, method, shots, seed)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(summary))


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "finetune")
