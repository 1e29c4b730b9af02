"""Zero-shot retention tasks: which ones (`retention.tasks`), which images of each, and their
prompts — decided once, by the `prepare` stage, into `data/prepared/retention.json`.

A task is either a split of a registered dataset labelled by `y` or a metadata field (another
WILDS dataset, a metadata field of this one, the built-in data), or a labelled image folder
(`<folder>/<class>/<image>`, `ImageFolderDataset`). `auto` means the dataset's own retention
tasks (the built-in data: held-out shapes and colour) plus every other WILDS dataset found
complete under `dataset.root` (its OOD test split, label `y`).

Each task keeps a seeded subsample of at most `max_samples` images (`np.random.default_rng
(seed)` over the task's rows, params.yaml's `seed`), so every model is scored on the same
images and retention costs bounded time. The record of a task holds those rows, the labels'
class names and templates, the best constant guess (the share of the most frequent class:
what accuracy means nothing below), and for folders a digest of the folder's listing and of the
chosen images' bytes. DVC does not watch folders outside the project, so the stages that read a
task (`load_task`) check those digests and stop with a clear message when the folder changed.

Defaults: `split` = the dataset's last OOD split (its OOD test split; retention is a reported
figure, never a selection criterion); folder class names = the sub-folder names with `_` as a
space; folder templates = "a photo of a {c}.".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.datasets import (DATASETS, Prompts, check_prompts, RetentionTask, get_spec, load_dataset, load_prompts,
                                    split_rows, task_labels)

__all__ = ["DEFAULT_TEMPLATES", "resolve_tasks", "auto_tasks", "prepare_task", "prepare_tasks", "load_task",
           "LoadedTask", "RetentionChanged", "no_task_hint"]

DEFAULT_TEMPLATES = ("a photo of a {c}.",)


class RetentionChanged(RuntimeError):
    """A task's images changed after `prepare` chose them."""


def no_task_hint(dataset: str) -> str:
    """What the report says when there is no retention task."""
    return (f"No zero-shot retention task for {dataset}: `retention.tasks: auto` found none (the dataset has no "
            "built-in task and no other WILDS dataset is under `dataset.root`). Add one to params.yaml, e.g. "
            "`retention: {tasks: [{folder: path/to/images, templates: ['a photo of a {c}.']}]}` "
            "(an image folder <folder>/<class>/<image>) or `retention: {tasks: [fmow]}` (another WILDS dataset "
            "under dataset.root).")


# ---------------------------------------------------------------------------------------------
# which tasks


def auto_tasks(dataset: str, data_root: Path) -> list[RetentionTask]:
    """The dataset's own retention tasks, then every other real (not generated) registered
    dataset whose folder under `data_root` is complete (its RELEASE marker exists)."""
    spec = get_spec(dataset)
    out = list(spec.retention_tasks)
    for name, other in DATASETS.items():
        if name != spec.name and not other.generated and other.marker(Path(data_root)).is_file():
            out.append(RetentionTask(name, dataset=name))
    return out


def _from_string(entry: str, key: str) -> RetentionTask:
    name, _, label = entry.partition("/")
    spec = DATASETS.get(name)
    if spec is None:
        raise ValueError(f"{key}: {entry!r} names no dataset; tasks are '<dataset>' or '<dataset>/<label>' with a "
                         f"dataset one of {', '.join(sorted(DATASETS))} (or a mapping with `folder:`)")
    if not label:
        return RetentionTask(name, dataset=name)
    built_in = [t for t in spec.retention_tasks if t.name == entry]
    return built_in[0] if built_in else RetentionTask(entry, dataset=name, label=label)


def _from_mapping(entry, key: str) -> RetentionTask:
    if entry.dataset is not None and entry.dataset not in DATASETS:
        raise ValueError(f"{key}.dataset: {entry.dataset!r} is not a known dataset; allowed: {', '.join(sorted(DATASETS))}")
    label = entry.label or "y"
    if entry.name:
        name = entry.name
    elif entry.folder is not None:
        name = Path(entry.folder).name
    else:
        name = entry.dataset if label == "y" else f"{entry.dataset}/{label}"
    return RetentionTask(name, dataset=entry.dataset, split=entry.split, label=label, folder=entry.folder,
                         classnames=entry.classnames, templates=tuple(entry.templates or ()),
                         max_samples=entry.max_samples)


def resolve_tasks(retention, dataset: str, data_root: Path) -> list[RetentionTask]:
    """`retention.tasks` (a `config.RetentionParams`) as RetentionTasks; 'auto' expands in place
    (duplicates by name are kept once, the first)."""
    out: dict[str, RetentionTask] = {}
    for i, entry in enumerate(retention.entries):
        key = f"retention.tasks[{i}]"
        if entry == "auto":
            found = auto_tasks(dataset, data_root)
        elif isinstance(entry, str):
            found = [_from_string(entry, key)]
        else:
            found = [_from_mapping(entry, key)]
        for t in found:
            out.setdefault(t.name, t)
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# which images, which prompts


def _read_classnames(value, key: str, n: int) -> tuple[str, ...]:
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"{key}.classnames: {value}: no such file (one class name per line, "
                                    "in sorted-folder order)")
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        where = f"{key}.classnames ({value})"
    else:
        names, where = tuple(value), f"{key}.classnames"
    if len(names) != n:
        raise ValueError(f"{where}: {len(names)} class names for {n} class folders; give one per folder, "
                         "in sorted-folder order")
    return names


def _listing_digest(root: Path) -> str:
    """SHA-256 of every file's relative path and size under `root` (cheap: no file is read)."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0".encode())
    return h.hexdigest()


def _subsample(n: int, cap: int, seed: int) -> np.ndarray:
    """A seeded, sorted subsample of range(n) of size min(n, cap)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


def _check_prompts(prompts: Prompts, key: str) -> None:
    check_prompts(prompts, lambda sentence: ValueError(f"{key}: {sentence}"))


def prepare_task(task: RetentionTask, *, seed: int, max_samples: int, main: tuple[str, Any] | None,
                 data_root: Path, generated_root: Path, key: str = "retention") -> dict:
    """The record of one task (see the module docstring); `main` = (name, dataset object) of
    the dataset being fine-tuned, reused when the task is one of its splits."""
    cap = task.max_samples or max_samples
    record: dict[str, Any] = {"name": task.name, "kind": task.kind, "dataset": task.dataset}
    if task.kind == "folder":
        from pipeline.data.folder import ImageFolderDataset, folder_classes

        root = Path(task.folder)
        if task.dataset is not None and not root.is_absolute():
            root = get_spec(task.dataset).folder(
                generated_root if get_spec(task.dataset).generated else data_root) / root
        if task.prompts is not None:
            p = load_prompts(task.dataset, task=task.prompts)
            classes = list(p.classnames)
        else:
            classes = folder_classes(root)
            names = (_read_classnames(task.classnames, key, len(classes)) if task.classnames is not None
                     else tuple(c.replace("_", " ") for c in classes))
            p = Prompts(names, tuple(task.templates) or DEFAULT_TEMPLATES)
        _check_prompts(p, key)
        ds = ImageFolderDataset(root, classes=classes)
        rows = _subsample(len(ds), cap, seed)
        labels = ds.y_array[torch.as_tensor(rows, dtype=torch.long)]
        record.update(root=str(root), split=None, label="y", classes=classes,
                      listing_sha256=_listing_digest(root), images_sha256=ds.digest(rows))
    else:
        spec = get_spec(task.dataset)
        if main is not None and main[0] == spec.name:
            ds = main[1]
        else:
            ds = load_dataset(spec.name, generated_root if spec.generated else data_root, download=False)
        split = task.split or spec.ood_splits[-1]
        if split not in ds.split_dict:
            raise ValueError(f"{key}: {spec.name} has no split {split!r}; its splits: {', '.join(ds.split_dict)}")
        all_rows = split_rows(ds, split)
        if len(all_rows) == 0:
            raise ValueError(f"{key}: split {split!r} of {spec.name} is empty")
        p = load_prompts(spec.name, task=None if task.label == "y" else task.label, dataset=ds)
        rows = all_rows[torch.as_tensor(_subsample(len(all_rows), cap, seed))].numpy()
        labels = task_labels(ds, rows, task.label)
        record.update(root=str(Path(ds.data_dir).parent), split=split, label=task.label, classes=None)
    n_classes = len(p.classnames)
    if int(labels.max()) >= n_classes:
        raise ValueError(f"{key} ({task.name}): labels go up to {int(labels.max())} but the prompts name "
                         f"{n_classes} classes")
    counts = torch.bincount(labels.long(), minlength=n_classes)
    record.update(
        classnames=list(p.classnames), templates=list(p.templates), n_available=int(len(ds) if task.kind == "folder"
                                                                                   else len(all_rows)),
        max_samples=cap, rows=[int(r) for r in rows], n_classes=n_classes,
        n_samples=int(len(rows)), majority=float(counts.max()) / max(int(counts.sum()), 1),
    )
    return record


def prepare_tasks(retention, *, dataset: str, seed: int, main_dataset, data_root: Path,
                  generated_root: Path) -> list[dict]:
    """Every task of `retention.tasks` prepared (records in order)."""
    tasks = resolve_tasks(retention, dataset, data_root)
    return [prepare_task(t, seed=seed, max_samples=retention.max_samples, main=(dataset, main_dataset),
                         data_root=Path(data_root), generated_root=Path(generated_root),
                         key=f"retention task {t.name}") for t in tasks]


# ---------------------------------------------------------------------------------------------
# reading a prepared task


@dataclass
class LoadedTask:
    name: str
    dataset: Any  # a WILDSDataset (get_input, y_array)
    rows: torch.Tensor
    labels: torch.Tensor
    prompts: Prompts
    record: dict


def load_task(record: dict, main_dataset, main_name: str) -> LoadedTask:
    """The dataset object, rows, labels and prompts of a prepared task; RetentionChanged when a
    folder's files differ from what `prepare` saw."""
    rows = torch.as_tensor(record["rows"], dtype=torch.long)
    if record["kind"] == "folder":
        from pipeline.data.folder import ImageFolderDataset

        root = Path(record["root"])
        hint = ("DVC does not watch folders outside the project: run `dvc repro -f prepare` (or `dvc repro "
                "--force-downstream prepare`) to draw the task again")
        if not root.is_dir() or _listing_digest(root) != record["listing_sha256"]:
            raise RetentionChanged(f"retention task {record['name']}: the files under {root} changed since "
                                   f"`prepare` chose its images. {hint}.")
        ds = ImageFolderDataset(root, classes=record["classes"])
        if ds.digest(rows.tolist()) != record["images_sha256"]:
            raise RetentionChanged(f"retention task {record['name']}: images under {root} changed since "
                                   f"`prepare` chose them. {hint}.")
        labels = ds.y_array[rows]
    else:
        ds = main_dataset if record["dataset"] == main_name else load_dataset(record["dataset"], Path(record["root"]))
        labels = task_labels(ds, rows, record["label"])
    return LoadedTask(record["name"], ds, rows, labels, Prompts(tuple(record["classnames"]), tuple(record["templates"])),
                      record)


def write_records(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps({"tasks": records}, indent=1) + "\n")


def read_records(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing; the prepare stage writes it (`dvc repro prepare`)")
    return json.loads(Path(path).read_text())["tasks"]
