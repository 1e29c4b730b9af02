"""The `check` stage, first in the DAG: all of params.yaml against every registry, before any
stage that owns outputs runs (so a rejected edit deletes nothing).

Each stage validates the shape of params.yaml itself (`pipeline.config`); this stage adds what
needs the registries: dataset, method and retention-task names, every trial's hyper-parameters,
the selection protocol against the dataset's splits and the levels, the generated datasets' and
the pre-trainer's options. Its output is a constant marker, so passing it again re-runs nothing downstream.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline import artifacts as paths
from pipeline.config import Params, check, load_params
from pipeline.core.validation import parse
from pipeline.stages.common import ParamsOpt, guard, run_command


def check_params(path: str | Path = "params.yaml") -> Params:
    """Load params.yaml and check everything the registries know (ParamsError naming the key)."""
    from pipeline.data.datasets import CORPORA, DATASETS
    from pipeline.evaluation.selection import resolve_protocol
    from pipeline.methods import METHODS, parse_hparams
    from pipeline.models import BUILTIN
    from pipeline.training.pretrain import PretrainConfig

    # method names first: a misspelt method would otherwise surface as "its trials' method is not
    # in finetune.methods" from the shape checks
    from pipeline.config import read_raw

    raw_methods = (read_raw(path).get("finetune") or {}).get("methods")
    if isinstance(raw_methods, list):
        for m in raw_methods:
            check(m in METHODS, "finetune.methods", m, f"allowed: {', '.join(sorted(METHODS))}")
    params = load_params(path)
    check(params.seed >= 0, "seed", params.seed, "use a non-negative integer")
    check(params.dataset.name in DATASETS, "dataset.name", params.dataset.name,
          f"allowed: {', '.join(sorted(DATASETS))}")
    for m in params.finetune.methods:
        check(m in METHODS, "finetune.methods", m, f"allowed: {', '.join(sorted(METHODS))}")
    for name in params.finetune.trials:
        method, overrides = params.finetune.trial(name)
        parse_hparams(method, overrides, f"finetune.trials.{name}")
    resolve_protocol(params.evaluate.selection, DATASETS[params.dataset.name],
                     params.sample.parsed_levels)
    generated = {name: spec for name, spec in DATASETS.items() if spec.generated}
    for key, options in params.prepare.items():
        owners = [spec.options for name, spec in generated.items() if name == key]
        owners += [c.options for c in CORPORA.values() if c.options_key == key]
        check(bool(owners), f"prepare.{key}", key,
              f"sections are named after generated datasets: {', '.join(sorted(generated)) or 'none'}")
        parse(owners[0], options, f"prepare.{key}")
    if params.model.pretrained == BUILTIN:
        parse(PretrainConfig, params.pretrained.builtin, "pretrained.builtin")
    if isinstance(params.evaluate.zs_tasks, str):
        check(params.evaluate.zs_tasks == "auto", "evaluate.zs_tasks", params.evaluate.zs_tasks,
              "use 'auto' or a list of tasks named '<dataset>/<label>' (e.g. synthetic/colour)")
    else:
        for t in params.evaluate.zs_tasks:
            check("/" in t and t.split("/")[0] in DATASETS, "evaluate.zs_tasks", t,
                  f"tasks are '<dataset>/<label>' with dataset one of {', '.join(sorted(DATASETS))}")
    return params


@guard
def command(params_file: Path = ParamsOpt):
    """Check all of params.yaml (names, every method's settings, generator options) -> data/check.json."""
    check_params(params_file)
    paths.CHECKED.parent.mkdir(parents=True, exist_ok=True)
    paths.CHECKED.write_text(json.dumps({"params": "valid"}) + "\n")
    typer.echo(f"{params_file}: valid")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "check")
