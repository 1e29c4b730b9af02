"""The `prepare` stage: dataset (real WILDS or generated) -> split table, class names, the
reference set (generated corpora are written here), the zero-shot retention tasks' images and
prompts (`pipeline.data.retention`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from pipeline import artifacts as paths
from pipeline.config import Params, load_params
from pipeline.core.external import read_digest
from pipeline.core.validation import parse
from pipeline.data.datasets import CORPORA, get_spec, load_dataset, load_prompts
from pipeline.data.torchdata import read_caption_csv
from pipeline.stages.common import ParamsOpt, guard, run_command


def run(params: Params) -> dict:
    import numpy as np
    import pandas as pd

    spec = get_spec(params.dataset.name)
    out = paths.PREPARED
    # nothing of a previous run may look finished while this one works
    paths.PREPARED_INFO.unlink(missing_ok=True)
    paths.PREPARED_MANIFEST.unlink(missing_ok=True)
    paths.PREPARED_PROMPTS.unlink(missing_ok=True)  # written by older versions, never read
    paths.PREPARED_RETENTION.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    root = paths.dataset_root(spec.generated, params.dataset.root)
    reference = paths.reference_csv(params.reference.csv)

    if spec.generated:
        options = parse(spec.options, params.prepare.get(spec.name), f"prepare.{spec.name}")
        if spec.folder(root).exists():
            shutil.rmtree(spec.folder(root))
        spec.generate(root, options)
    if paths.BUILTIN_REFERENCE.exists():
        shutil.rmtree(paths.BUILTIN_REFERENCE)
    corpus = CORPORA.get(params.reference.csv)
    if corpus is not None:
        options = parse(corpus.options, params.prepare.get(corpus.options_key), f"prepare.{corpus.options_key}")
        corpus.generate(paths.BUILTIN_REFERENCE, options)
    paths.BUILTIN_REFERENCE.mkdir(parents=True, exist_ok=True)
    # what the reference set is, for the stages that depend on this folder; with the digest of
    # an external CSV and its images (written by check), so rewriting one re-runs them too
    external = {role: read_digest(paths.EXTERNAL / role)["content_sha256"] for role in ("reference", "dataset", "retention")}
    (paths.BUILTIN_REFERENCE / "source.json").write_text(json.dumps({
        "csv": str(reference), "separator": params.reference.separator, "sha256": external["reference"]}))

    dataset = load_dataset(spec.name, root, download=params.dataset.download)
    load_prompts(spec.name, n_classes=dataset.n_classes, dataset=dataset)  # validated now, not mid-training
    ref_files, _ = read_caption_csv(reference, params.reference.separator, limit=params.reference.max_samples)
    missing = [str(f) for f in ref_files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{reference}: {len(missing)} image files are missing, e.g. {missing[0]}")

    split_names = {v: k for k, v in dataset.split_dict.items()}
    split = np.asarray(dataset.split_array)
    table = pd.DataFrame({
        "idx": np.arange(len(dataset)),
        "y": np.asarray(dataset.y_array),
        "split": [split_names.get(int(s), str(s)) for s in split],
    })
    table.to_csv(paths.SPLIT_TABLE, index=False)
    counts = {name: int((table["split"] == name).sum()) for name in dataset.split_dict}
    for s in (spec.train_split, *spec.id_splits, *spec.ood_splits):
        if counts.get(s, 0) == 0:
            raise ValueError(f"{spec.name}: split {s!r} is empty in {root}")
    info = {
        "dataset": spec.name,
        "root": str(root),
        "n_classes": int(dataset.n_classes),
        "n_samples": int(len(dataset)),
        "splits": counts,
        "reference_csv": str(reference),
        "reference_rows": len(ref_files),
        # the files outside the project this was made from (data/external): every stage that
        # depends on the manifest re-runs when one of them is rewritten
        "external_sha256": external,
    }
    from pipeline.data.retention import prepare_tasks, write_records

    tasks = prepare_tasks(params.retention, dataset=spec.name, seed=params.seed, main_dataset=dataset,
                          data_root=Path(params.dataset.root), generated_root=paths.GENERATED_ROOT)
    write_records(paths.PREPARED_RETENTION, tasks)
    info["retention_tasks"] = {t["name"]: t["n_samples"] for t in tasks}
    paths.PREPARED_INFO.write_text(json.dumps(info, indent=1))
    paths.PREPARED_MANIFEST.write_text(json.dumps(manifest(out), indent=1))
    return info


def manifest(folder: Path) -> dict:
    """A digest of every file under `folder` (names and bytes), what the stages that read the
    prepared data depend on: DVC then checks one small file per stage instead of walking the
    ~28k files of the built-in data, and a change of any prepared byte still re-runs them."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != paths.PREPARED_MANIFEST)
    for p in files:
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return {"sha256": h.hexdigest(), "files": len(files)}


@guard
def command(params_file: Path = ParamsOpt):
    """Dataset -> data/prepared: split table, class names, reference set.

    Real WILDS data is read from `dataset.root` (set `dataset.download: true` to fetch it);
    generated datasets and caption corpora (the built-in synthetic ones) are made here."""
    info = run(load_params(params_file))
    typer.echo(json.dumps(info["splits"]))


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "prepare")
