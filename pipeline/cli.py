"""Command line: one subcommand per DVC stage, plus helpers (methods, ui).

Every command reads params.yaml (validated in full before any work) and writes the stage's
outputs; `dvc repro` runs them through `stages/*.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Few-shot robust fine-tuning of CLIP on WILDS. Stages run in this order: prepare → "
         "pretrained → embed → sample → finetune → evaluate → report. Normally `dvc repro` runs "
         "them; each command here runs one stage by hand (same code, same outputs).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="Params file to read.")


def _load(params_file: Path):
    from pipeline.config import load_params

    return load_params(params_file)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _guard(fn):
    """Known user errors end with one clear line instead of a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.config import ParamsError

        try:
            return fn(*args, **kwargs)
        except (ParamsError, FileNotFoundError, KeyError) as err:
            _fail(err)
        except ValueError as err:
            _fail(err)
    return wrapper


@app.command()
@_guard
def prepare(params_file: Path = ParamsOpt):
    """Dataset -> data/prepared: split table, class names and prompts, reference set.

    Real WILDS data is read from `dataset.root` (set `dataset.download: true` to fetch it);
    the built-in synthetic dataset and caption corpus are generated here."""
    from pipeline.stages import prepare as stage

    info = stage.run(_load(params_file))
    typer.echo(json.dumps(info["splits"]))


@app.command()
@_guard
def pretrained(params_file: Path = ParamsOpt):
    """The starting checkpoint -> models/pretrained/model.safetensors.

    `model.pretrained: builtin` pre-trains the tiny CLIP on the caption corpus; an open_clip
    tag is downloaded once; a file path is copied. Later stages load only this file."""
    from pipeline import artifacts as paths
    from pipeline.core.env import resolve_device
    from pipeline.models import BUILTIN, fetch_pretrained
    from pipeline.stages.prepare import reference_csv

    params = _load(params_file)
    paths.PRETRAINED_INFO.unlink(missing_ok=True)
    if params.model.pretrained == BUILTIN:
        from pipeline.training.pretrain import pretrain

        info = pretrain(params.model.arch, reference_csv(params), params.pretrain_config(),
                        paths.PRETRAINED_WEIGHTS, device=resolve_device(params.pretrained.device))
    else:
        info = fetch_pretrained(params.model.arch, params.model.pretrained, paths.PRETRAINED_WEIGHTS)
    paths.PRETRAINED_INFO.write_text(json.dumps(info, indent=1, default=str))
    typer.echo(f"wrote {paths.PRETRAINED_WEIGHTS}")


@app.command()
@_guard
def embed(params_file: Path = ParamsOpt):
    """One pass of the pre-trained model: cached embeddings, zero-shot (k = 0) metrics,
    IIMM and silhouette -> data/embed."""
    from pipeline.stages import embed as stage

    params = _load(params_file)
    metrics = stage.run(params)
    _log_zeroshot(params, metrics)
    typer.echo(_headline(params, metrics))


def _headline(params, metrics: dict) -> str:
    """The numbers a person looks at first; every key is in the metrics file and MLflow."""
    from pipeline.data.datasets import get_spec

    spec = get_spec(params.dataset.name)
    keys = [f"{s}/{spec.metric}" for s in (*spec.id_splits, *spec.ood_splits)]
    keys += [k for k in metrics if k.startswith(("zs/", "rsa/", "iimm", "silhouette/"))
             or k == "selected/alpha"]
    return json.dumps({k: round(metrics[k], 4) for k in keys if k in metrics}, indent=1)


def _log_zeroshot(params, metrics: dict) -> None:
    from pipeline import artifacts as paths
from pipeline.core import tracking
    from pipeline.stages.evaluate import run_params

    tracking.log_run(
        experiment=params.dataset.name, key="zeroshot/k0/seed0", run_name="zeroshot k=0",
        params=run_params(params, "zeroshot", 0, 0),
        tags={"method": "zeroshot", "shots": "0", "seed": "0", "dataset": params.dataset.name,
              "arch": params.model.arch, "level": "k=0"},
        metrics=metrics, artifacts=[paths.EMBED_METRICS],
    )


@app.command()
@_guard
def sample(shots: int = typer.Option(..., "--shots", "-k", help="Examples per class."),
           seed: int = typer.Option(..., "--seed", help="Sampling seed."),
           params_file: Path = ParamsOpt):
    """A class-balanced k-shot index of the train split -> data/samples/k{K}_seed{S}.json
    (nested: for one seed, the k=4 set contains the k=2 set)."""
    import pandas as pd

    from pipeline import artifacts as paths
    from pipeline.data.datasets import get_spec
    from pipeline.stages.prepare import read_info
    from pipeline.data.sampling import sample_kshot, write_sample

    params = _load(params_file)
    if shots <= 0:
        raise typer.BadParameter(f"--shots {shots}: use a positive integer")
    spec = get_spec(params.dataset.name)
    info = read_info()
    table = pd.read_csv(paths.SPLIT_TABLE)
    train = table[table["split"] == spec.train_split]
    result = sample_kshot(train["y"].to_numpy(), train["idx"].to_numpy(), shots, seed,
                          n_classes=info["n_classes"])
    write_sample(result, paths.sample_file(shots, seed))
    note = f" ({len(result['short_classes'])} classes have fewer than {shots})" if result["short_classes"] else ""
    typer.echo(f"k={shots} seed={seed}: {result['n']} examples{note}")


@app.command()
@_guard
def finetune(method: str = typer.Option(..., "--method", "-m", help="A registered method (see `methods`)."),
             shots: int = typer.Option(..., "--shots", "-k"),
             seed: int = typer.Option(..., "--seed"),
             params_file: Path = ParamsOpt):
    """Fine-tune one method on one k-shot sample -> runs/finetune/<method>/k<K>_seed<S>.

    Resumes from checkpoints/<method>/k<K>_seed<S>/last.pt if an earlier run was interrupted.
    With finetune.train.nproc_per_node > 1 it relaunches itself under torchrun (DDP)."""
    params = _load(params_file)
    _check_method(params, method)
    nproc = params.finetune.train.nproc_per_node
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "-m", "pipeline", "finetune", "--method", method, "--shots", str(shots),
               "--seed", str(seed), "--params", str(params_file)]
        raise typer.Exit(subprocess.call(cmd))
    from pipeline.stages import finetune as stage

    summary = stage.run(params, method, shots, seed)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(summary))


@app.command()
@_guard
def evaluate(method: str = typer.Option(..., "--method", "-m"),
             shots: int = typer.Option(..., "--shots", "-k"),
             seed: int = typer.Option(..., "--seed"),
             params_file: Path = ParamsOpt):
    """Evaluate one fine-tuned run (ID, OOD, zero-shot retention, RSA, WiSE-FT sweep) ->
    runs/evaluate/<method>/k<K>_seed<S>/metrics.json and an MLflow run."""
    from pipeline.stages import evaluate as stage

    params = _load(params_file)
    _check_method(params, method)
    metrics = stage.run(params, method, shots, seed)
    typer.echo(_headline(params, metrics))


@app.command()
@_guard
def report(params_file: Path = ParamsOpt):
    """Aggregate every run into tables and plots -> reports/ (and a summary MLflow run)."""
    from pipeline import report as stage

    stage.run(_load(params_file))


@app.command()
def methods():
    """List the registered fine-tuning methods (the names finetune.methods accepts)."""
    from pipeline.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        typer.echo(f"{name:14s} {doc}")


@app.command()
def ui(host: str = typer.Option("127.0.0.1", help="Interface to bind (default: this machine only)."),
       port: int = typer.Option(5000)):
    """Open the MLflow UI on the tracking store (sqlite:///mlflow.db unless MLFLOW_TRACKING_URI)."""
    from pipeline.core.tracking import tracking_uri

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(),
           "--host", host, "--port", str(port), "--workers", "1"]
    typer.echo(f"MLflow UI on http://{host}:{port}  (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(cmd))


def _check_method(params, method: str) -> None:
    from pipeline.config import ParamsError
    from pipeline.methods import METHODS

    if method not in METHODS:
        raise ParamsError(f"--method: unknown method {method!r}; allowed: {', '.join(sorted(METHODS))}")


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv, prog_name="wfp")


if __name__ == "__main__":
    main()
