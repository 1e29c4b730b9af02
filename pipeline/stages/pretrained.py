"""The `pretrained` stage: the starting checkpoint -> models/pretrained/model.safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline import artifacts as paths
from pipeline.config import Params, load_params
from pipeline.stages.common import ParamsOpt, guard, run_command


def run(params: Params) -> dict:
    from pipeline.core.env import resolve_device, set_threads
    from pipeline.core.validation import parse
    from pipeline.models import BUILTIN, fetch_pretrained

    set_threads(params.threads)
    paths.PRETRAINED_INFO.unlink(missing_ok=True)
    if params.model.pretrained == BUILTIN:
        from pipeline.training.pretrain import PretrainConfig, pretrain

        cfg = parse(PretrainConfig, params.pretrained.builtin, "pretrained.builtin")
        info = pretrain(params.model.arch, paths.reference_csv(params.reference.csv), cfg,
                        paths.PRETRAINED_WEIGHTS, device=resolve_device(params.pretrained.device),
                        tokenizer=params.model.tokenizer)
    else:
        info = fetch_pretrained(params.model.arch, params.model.pretrained, paths.PRETRAINED_WEIGHTS)
    info["threads"] = params.threads
    paths.PRETRAINED_INFO.write_text(json.dumps(info, indent=1, default=str))
    return info


@guard
def command(params_file: Path = ParamsOpt):
    """The starting checkpoint -> models/pretrained/model.safetensors.

    `model.pretrained: builtin` pre-trains the tiny CLIP on the caption corpus; an open_clip
    tag is downloaded once; a file path is copied. Later stages load only this file."""
    run(load_params(params_file))
    typer.echo(f"wrote {paths.PRETRAINED_WEIGHTS}")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "pretrained")
