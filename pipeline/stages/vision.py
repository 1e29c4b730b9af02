"""The `vision` stage: the vision-only counterpart of the pre-trained CLIP ->
models/vision/model.safetensors (when finetune.methods has a vision-only method)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline import artifacts as paths
from pipeline.config import Params, load_params
from pipeline.stages.common import ParamsOpt, guard, run_command


def run(params: Params) -> dict:
    from pipeline import models
    from pipeline.core.env import resolve_device, set_threads
    from pipeline.core.validation import parse
    from pipeline.models import vision

    set_threads(params.threads)
    # which compared methods are vision-only: the check stage's record (reading it, not the
    # methods' code, keeps an edit of a method from re-running this stage)
    if not paths.BACKBONES.is_file():
        raise FileNotFoundError(f"{paths.BACKBONES}: not found; the check stage writes it (`dvc repro check`)")
    backbones = json.loads(paths.BACKBONES.read_text())
    if sorted(backbones) != sorted(params.finetune.methods):
        raise ValueError(f"{paths.BACKBONES}: out of date with finetune.methods; run `dvc repro`")
    wanted = [m for m in params.finetune.methods if backbones[m] == "vision"]
    paths.VISION_INFO.unlink(missing_ok=True)
    paths.VISION_WEIGHTS.unlink(missing_ok=True)
    paths.VISION.mkdir(parents=True, exist_ok=True)
    if not wanted:
        info = {"built": False, "why": "no vision-only method in finetune.methods"}
    else:
        # the backbone sees the CLIP's images: built at its image size, with its transforms
        like = models.create(params.model.arch, device="cpu", tokenizer=params.model.tokenizer,
                             pretrained=params.model.pretrained)
        if params.vision.pretrained == vision.BUILTIN:
            from pipeline.training.pretrain import PretrainConfig, pretrain_vision

            cfg = parse(PretrainConfig, params.pretrained.builtin, "pretrained.builtin")
            info = pretrain_vision(params.vision.arch, like, paths.reference_csv(params.reference.csv), cfg,
                                   paths.VISION_WEIGHTS, device=resolve_device(params.pretrained.device))
        else:
            source = Path(params.vision.pretrained).expanduser()
            model = vision.build(params.vision.arch, like.image_size)
            vision.load_checked(model, source)
            digest = models.save_state_dict(model.state_dict(), paths.VISION_WEIGHTS,
                                            meta={"arch": params.vision.arch, "origin": str(source)})
            info = {"arch": params.vision.arch, "origin": str(source), "sha256": digest}
        info = {"built": True, "for": wanted, **info, "threads": params.threads}
    # deterministic (finetune and evaluate depend on it): the wall time goes to the terminal
    wall = info.pop("wall_time_s", None)
    if wall is not None:
        typer.echo(f"vision: pre-trained in {wall:.0f} s", err=True)
    paths.VISION_INFO.write_text(json.dumps(info, indent=1, default=str))
    return info


@guard
def command(params_file: Path = ParamsOpt):
    """The vision-only backbone -> models/vision/model.safetensors, when finetune.methods has a
    vision-only method (`python -m pipeline methods`: vision_ft, vision_lp).

    `vision.pretrained: builtin` pre-trains `vision.arch` on the caption corpus's labels with the
    tiny CLIP's budget (pretrained.builtin); a file path is checked against `vision.arch` and
    copied. Otherwise it writes only models/vision/info.json saying nothing was needed."""
    info = run(load_params(params_file))
    typer.echo(f"wrote {paths.VISION_WEIGHTS}" if info["built"] else f"wrote {paths.VISION_INFO} ({info['why']})")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "vision")
