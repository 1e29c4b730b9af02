"""The `sample` stage (one matrix entry): a class-balanced k-shot index of the train split."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline import artifacts as paths
from pipeline.config import load_params
from pipeline.stages.common import ParamsOpt, guard, run_command


def run(dataset_name: str, shots: int, seed: int) -> dict:
    import pandas as pd

    from pipeline.data.datasets import get_spec
    from pipeline.data.sampling import sample_kshot, write_sample

    spec = get_spec(dataset_name)
    info = paths.read_info()
    table = pd.read_csv(paths.SPLIT_TABLE)
    train = table[table["split"] == spec.train_split]
    result = sample_kshot(train["y"].to_numpy(), train["idx"].to_numpy(), shots, seed,
                          n_classes=info["n_classes"])
    write_sample(result, paths.sample_file(shots, seed))
    return result


@guard
def command(shots: int = typer.Option(..., "--shots", "-k", help="Examples per class."),
            seed: int = typer.Option(..., "--seed", help="Sampling seed."),
            params_file: Path = ParamsOpt):
    """A class-balanced k-shot index of the train split -> data/samples/k{K}_seed{S}.json
    (nested: for one seed, the k=4 set contains the k=2 set)."""
    params = load_params(params_file)
    if shots <= 0:
        raise typer.BadParameter(f"--shots {shots}: use a positive integer")
    result = run(params.dataset.name, shots, seed)
    note = f" ({len(result['short_classes'])} classes have fewer than {shots})" if result["short_classes"] else ""
    typer.echo(f"k={shots} seed={seed}: {result['n']} examples{note}")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "sample")
