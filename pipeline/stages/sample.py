"""The `sample` stage: the training sample and few-shot validation set of every level × seed.

One process writes them all (sampling is milliseconds; a process per entry would cost seconds
of start-up each). A sample that does not change keeps its content, so DVC re-runs nothing
downstream of it when a level or a seed is added."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline import artifacts as paths
from pipeline.config import load_params
from pipeline.stages.common import ParamsOpt, guard, run_command


def run(dataset_name: str, levels, seeds) -> list[dict]:
    import pandas as pd

    from pipeline.data.datasets import get_spec
    from pipeline.data.sampling import sample_level, write_sample

    spec = get_spec(dataset_name)
    info = paths.read_info()
    table = pd.read_csv(paths.SPLIT_TABLE)
    train = table[table["split"] == spec.train_split]
    y, rows = train["y"].to_numpy(), train["idx"].to_numpy()
    out = []
    for level in levels:
        for seed in seeds:
            result = sample_level(y, rows, level, seed, n_classes=info["n_classes"])
            write_sample(result, paths.sample_file(level.name, seed))
            out.append(result)
    return out


@guard
def command(params_file: Path = ParamsOpt):
    """Training samples of every level in sample.levels × seed in sample.seeds ->
    data/samples/<level>/seed<S>.json (nested: for one seed, the k=4 set contains the k=1 set,
    the 25% set the 10% set), each with its few-shot validation set (held out of the train split)."""
    params = load_params(params_file)
    for r in run(params.dataset.name, params.sample.parsed_levels, params.sample.seeds):
        note = f" ({len(r['short_classes'])} classes have fewer than {r['k']})" if r["short_classes"] else ""
        typer.echo(f"level {r['level']} seed {r['seed']}: {r['n']} training examples, "
                   f"{r['n_val']} held out for fewshot_val{note}")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "sample")
