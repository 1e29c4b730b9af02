"""The one table of per-dataset facts, and loading, prompts and official evaluation built on it.

Every dataset, the built-in synthetic one included, is a `wilds` `WILDSDataset`, so subsets,
groupers and the official `eval` are wilds' own code. Real datasets are constructed by
`wilds.get_dataset`; this module only adds a clear error when the data is absent (wilds'
own offline download swallows the network error and then fails on a missing CSV).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.data.scatter import install_scatter_fallback

if TYPE_CHECKING:
    from wilds.datasets.wilds_dataset import WILDSDataset

__all__ = [
    "PROMPTS_DIR",
    "Prompts",
    "RetentionTask",
    "DatasetSpec",
    "DATASETS",
    "DatasetMissingError",
    "CORPORA",
    "CorpusSpec",
    "register_dataset",
    "register_corpus",
    "get_spec",
    "load_dataset",
    "load_prompts",
    "read_prompts",
    "official_eval",
    "task_labels",
]

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
PLACEHOLDER = "{c}"


@dataclass(frozen=True)
class Prompts:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]  # each contains the placeholder "{c}"

    def texts(self) -> list[list[str]]:
        """Per class, every template filled with the class name."""
        # str.replace, not str.format: templates may contain other braces.
        return [[t.replace(PLACEHOLDER, c) for t in self.templates] for c in self.classnames]


@dataclass(frozen=True)
class RetentionTask:
    """A zero-shot task the fine-tuned model was not trained on (`pipeline.data.retention`
    prepares it and says what every field defaults to).

    Two kinds: `split` of a registered `dataset` labelled by `label` ("y" or a metadata field;
    prompts from the dataset's prompt file: its own for "y", `tasks[label]` otherwise), or an
    image `folder` (`<folder>/<class>/<image>`): with `dataset`, relative to that dataset's
    folder (a built-in task); otherwise a path. A folder's prompts are `prompts` (a task of
    `dataset`'s prompt file: its class names are the folder names, in label order), else
    `classnames` (display names in sorted-folder order: a list or a file with one per line;
    default the folder names) and `templates` (default "a photo of a {c}.").
    """

    name: str  # e.g. "synthetic/colour"
    dataset: str | None = None  # key in DATASETS
    split: str | None = None  # default: the dataset's last OOD split (its OOD test split)
    label: str = "y"
    folder: str | None = None
    prompts: str | None = None
    classnames: tuple[str, ...] | str | None = None
    templates: tuple[str, ...] = ()
    max_samples: int | None = None  # default: retention.max_samples

    @property
    def kind(self) -> str:
        return "folder" if self.folder is not None else "dataset"


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # params.yaml key
    version: str  # wilds version; the data folder is f"{name}_v{version}"
    train_split: str
    id_splits: tuple[str, ...]  # in-distribution eval splits
    ood_splits: tuple[str, ...]  # out-of-distribution eval splits
    metric: str  # official headline key of dataset.eval
    extra_metrics: tuple[str, ...]
    prompt_file: str  # file name in pipeline/data/prompts/
    retention_tasks: tuple[RetentionTask, ...]
    download_hint: str  # how a user gets the data; "{root}" is filled with the data root
    # the metadata fields whose combinations are the domains (the WILDS examples' training
    # `groupby_fields`): what finetune.train.group_balanced balances over (`domain_groups`)
    domain_fields: tuple[str, ...] = ("domain",)
    # Builds the dataset from (root_dir, download); None means `wilds.get_dataset`.
    loader: Callable[[Path, bool], Any] | None = field(default=None, repr=False, compare=False)
    # Generated datasets: the prepare stage calls generate(root, options) (under
    # data/prepared/wilds) with `prepare.<name>` of params.yaml parsed as `options`
    generate: Callable[[Path, Any], Any] | None = field(default=None, repr=False, compare=False)
    options: type | None = field(default=None, repr=False, compare=False)
    # Generated datasets made from the user's files: checks `options` and the files they name
    # (the `check` stage calls it before any work); raises ValueError naming the file or row
    validate: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)
    # The dataset's own description of row i, `describe(dataset, i)` -> a caption (the built-in
    # generator knows each image's attributes): the captions of the training images a method
    # with `needs_captions` reads when no captions file is given (`pipeline.data.captions`)
    describe: Callable[[Any, int], str] | None = field(default=None, repr=False, compare=False)

    @property
    def generated(self) -> bool:
        return self.generate is not None

    @property
    def prompt_path(self) -> Path:
        """The prompt file: `prompt_file` itself when absolute, else in pipeline/data/prompts/."""
        path = Path(self.prompt_file)
        return path if path.is_absolute() else PROMPTS_DIR / path

    def folder(self, root: Path) -> Path:
        return Path(root) / f"{self.name}_v{self.version}"

    def marker(self, root: Path) -> Path:
        """The file wilds requires before it treats the folder as a complete dataset."""
        return self.folder(root) / f"RELEASE_v{self.version}.txt"

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return self.id_splits + self.ood_splits

    @property
    def id_val(self) -> str | None:
        """The in-distribution validation split (an ID split named *val*, never *test*)."""
        return next((s for s in self.id_splits if "val" in s and "test" not in s), None)

    @property
    def ood_val(self) -> str | None:
        """The out-of-distribution validation split (an OOD split named *val*, never *test*)."""
        return next((s for s in self.ood_splits if "val" in s and "test" not in s), None)

    @property
    def val_splits(self) -> tuple[str, ...]:
        """Every split a selection protocol may read (the trials are scored on all of them,
        so changing the protocol re-trains nothing)."""
        return tuple(s for s in (self.id_val, self.ood_val) if s is not None)


# The registry. Each module of `pipeline.data.catalog` registers its datasets when imported
# (the WILDS five in catalog/wilds.py, the built-in one in catalog/synthetic.py); a new dataset
# is one such module plus its prompt file.
DATASETS: dict[str, DatasetSpec] = {}


@dataclass(frozen=True)
class CorpusSpec:
    """A generated image-caption corpus (`reference.csv: <name>`): pre-training data of a
    built-in model and DiVE's reference set. `options_key` names the `prepare.<key>` section
    whose settings (type `options`) it shares with the dataset generated from the same code."""

    name: str
    options_key: str
    options: type
    generate: Callable[[Path, Any], Any] = field(repr=False, compare=False)


CORPORA: dict[str, CorpusSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Make `spec` available as `dataset.name: <spec.name>`."""
    if spec.name in DATASETS and DATASETS[spec.name] != spec:
        raise ValueError(f"dataset name {spec.name!r} registered twice")
    DATASETS[spec.name] = spec
    return spec


def register_corpus(corpus: CorpusSpec) -> CorpusSpec:
    CORPORA[corpus.name] = corpus
    return corpus


def wilds_hint(name: str, size: str) -> str:
    """How to get a WILDS dataset (for `DatasetSpec.download_hint`)."""
    return (
        f"Download it ({size}) with `python -m wilds.download_datasets --root_dir {{root}} "
        f"--datasets {name}`, or in Python with "
        f"`wilds.get_dataset(dataset='{name}', root_dir='{{root}}', download=True)`; "
        f"manual downloads: https://wilds.stanford.edu/downloads."
    )


class DatasetMissingError(FileNotFoundError):
    """The dataset is not on disk (or could not be downloaded); the message says how to get it."""

    def __init__(self, message: str, folder: Path | None = None, marker: Path | None = None):
        super().__init__(message)
        self.folder = folder
        self.marker = marker


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        allowed = ", ".join(DATASETS)
        raise ValueError(f"dataset.name: {name!r} is not a known dataset; allowed values: {allowed}.") from None


def _how_to_get(spec: DatasetSpec, root: Path) -> str:
    return spec.download_hint.format(root=root)


def _missing_message(spec: DatasetSpec, root: Path) -> str:
    return (
        f"The {spec.name} dataset was not found: looked in {spec.folder(root)} for "
        f"{spec.marker(root).name} (wilds treats the folder as complete only when that file exists). "
        f"{_how_to_get(spec, root)} Or set `dataset.download: true` in params.yaml and the pipeline "
        f"gets it for you."
    )


class _Tee(io.TextIOBase):
    """Writes through to a stream and keeps a copy (wilds prints, rather than raises, its
    download error)."""

    def __init__(self, stream):
        self._stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


def _construct(spec: DatasetSpec, root: Path, download: bool):
    if spec.loader is not None:
        return spec.loader(root, download)
    import wilds

    return wilds.get_dataset(dataset=spec.name, version=spec.version, root_dir=str(root), download=download)


def _clean_failed_download(spec: DatasetSpec, root: Path, root_existed: bool, folder_before: set[str] | None) -> str:
    """Undo what a failed download created, and say what was left behind."""
    folder = spec.folder(root)
    if folder.is_dir():
        created = set(os.listdir(folder)) - (folder_before or set())
        # A partial archive would later be taken as complete: wilds checks no checksum.
        if "archive.tar.gz" in created and (folder / "archive.tar.gz").is_file():
            (folder / "archive.tar.gz").unlink()
        if folder_before is None and not os.listdir(folder):
            folder.rmdir()
    if not root_existed and root.is_dir() and not os.listdir(root):
        root.rmdir()
    if folder.is_dir() and os.listdir(folder) and folder_before is None:
        return f" Files that the attempt left in {folder} were kept; delete them before retrying."
    return ""


def load_dataset(name: str, root: Path, download: bool = False) -> "WILDSDataset":
    """The dataset `name` under `root` (its data folder is `root/{name}_v{version}`).

    Without `download`, a missing RELEASE marker raises DatasetMissingError before wilds is
    touched. With it, a failed download (wilds only prints the network error) is cleaned up
    and raised as DatasetMissingError carrying the original error.
    """
    spec = get_spec(name)
    root = Path(root)
    install_scatter_fallback()
    marker = spec.marker(root)
    if marker.is_file():
        return _construct(spec, root, download=False)
    if not download:
        raise DatasetMissingError(_missing_message(spec, root), spec.folder(root), marker)

    folder = spec.folder(root)
    root_existed = root.is_dir()
    folder_before = set(os.listdir(folder)) if folder.is_dir() else None
    tee = _Tee(sys.stdout)
    error: BaseException | None = None
    dataset = None
    try:
        with contextlib.redirect_stdout(tee):
            dataset = _construct(spec, root, download=True)
    except Exception as exc:  # noqa: BLE001 - re-raised below with context
        error = exc
    if error is None and dataset is not None:
        return dataset
    if marker.is_file() or spec.loader is not None:
        # Either the data arrived and loading it failed, or a local generator failed: neither
        # is a download problem, so the original error is the useful one.
        raise error  # type: ignore[misc]

    printed = [line.strip() for line in tee.copy.getvalue().splitlines() if line.strip().startswith("Exception:")]
    reason = printed[-1].removeprefix("Exception:").strip() if printed else f"{type(error).__name__}: {error}"
    leftover = _clean_failed_download(spec, root, root_existed, folder_before)
    message = (
        f"Getting the {spec.name} dataset into {folder} failed ({reason}), so {marker.name} is "
        f"still missing (download was requested, as `dataset.download: true` does).{leftover} "
        f"Check the network, or get it by hand: {_how_to_get(spec, root)}"
    )
    raise DatasetMissingError(message, folder, marker) from error


def _fail(path: Path, sentence: str) -> ValueError:
    return ValueError(f"Prompt file {path}: {sentence}")


def _string_list(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(path, f"{where} must be a non-empty list of strings.")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _fail(path, f"{where}[{i}] must be a non-empty string, got {item!r}.")
    return tuple(value)


def _normalise(text: str) -> str:
    # What the CLIP tokenizer sees: case and runs of whitespace do not count.
    return " ".join(text.lower().split())


def check_prompts(prompts: Prompts, fail: Callable[[str], Exception], where: str = "",
                  n_classes: int | None = None) -> None:
    """Every template has the placeholder, the class count matches, no two classes give the
    same prompt; `fail(sentence)` builds the error (its prefix names the file or key)."""
    lead = f"{where} " if where else ""
    for i, template in enumerate(prompts.templates):
        if PLACEHOLDER not in template:
            raise fail(f"{lead}template {i} {template!r} lacks the placeholder {PLACEHOLDER}.")
    if n_classes is not None and len(prompts.classnames) != n_classes:
        raise fail(f"{lead}has {len(prompts.classnames)} class names but the dataset has {n_classes} classes.")
    first_owner: dict[str, int] = {}
    for i, name in enumerate(prompts.classnames):
        key = _normalise(name)
        if key in first_owner:
            j = first_owner[key]
            filled = _normalise(prompts.templates[0].replace(PLACEHOLDER, name))
            raise fail(
                f"{lead}classes {j} ({prompts.classnames[j]!r}) and {i} ({name!r}) give identical "
                f"prompts after lower-casing (e.g. {filled!r}); rename one of them."
            )
        first_owner[key] = i


def _validate(path: Path, where: str, prompts: Prompts, n_classes: int | None) -> None:
    check_prompts(prompts, lambda sentence: _fail(path, sentence), where, n_classes)


_TOP_KEYS = {"classnames", "templates", "tasks"}
_TASK_KEYS = {"classnames", "templates"}


def read_prompts(path: Path, task: str | None = None, n_classes: int | None = None) -> Prompts:
    """Load and validate one prompt file (the format `load_prompts` reads).

    Format: {"classnames": [...], "templates": ["... {c} ..."], "tasks": {name: {"classnames":
    [...], "templates": [...]}}}; keys starting with "_" are comments. A task without
    "templates" uses the top-level templates.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(path, "does not exist.") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise _fail(path, "must hold a JSON object with 'classnames' and 'templates'.")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _fail(path, f"unknown keys {unknown}; allowed: {sorted(_TOP_KEYS)} and comments starting with '_'.")
    templates = _string_list(path, "templates", data.get("templates"))
    if task is None:
        prompts = Prompts(_string_list(path, "classnames", data.get("classnames")), templates)
        _validate(path, "the file", prompts, n_classes)
        return prompts

    tasks = data.get("tasks") or {}
    if not isinstance(tasks, dict) or task not in tasks:
        available = sorted(tasks) if isinstance(tasks, dict) else []
        raise _fail(path, f"has no task {task!r} under 'tasks'; available: {available}.")
    entry = {k: v for k, v in tasks[task].items() if not k.startswith("_")} if isinstance(tasks[task], dict) else None
    if entry is None:
        raise _fail(path, f"tasks.{task} must be an object with 'classnames' (and optionally 'templates').")
    unknown = sorted(set(entry) - _TASK_KEYS)
    if unknown:
        raise _fail(path, f"tasks.{task} has unknown keys {unknown}; allowed: {sorted(_TASK_KEYS)}.")
    where = f"tasks.{task}"
    task_templates = _string_list(path, f"{where}.templates", entry["templates"]) if "templates" in entry else templates
    prompts = Prompts(_string_list(path, f"{where}.classnames", entry.get("classnames")), task_templates)
    _validate(path, where, prompts, n_classes)
    return prompts


def load_prompts(name: str, task: str | None = None, n_classes: int | None = None, dataset=None) -> Prompts:
    """Class names and templates of dataset `name` (or of its extra zero-shot `task`). A loaded
    `dataset` with a `prompt_file` attribute (a dataset whose prompts are written with its
    data, e.g. `custom`) is read from that file instead of the shipped one."""
    spec = get_spec(name)
    path = getattr(dataset, "prompt_file", None) or spec.prompt_path
    return read_prompts(path, task=task, n_classes=n_classes)


def official_eval(dataset, y_pred: torch.Tensor, y_true: torch.Tensor, metadata: torch.Tensor) -> dict[str, float]:
    """The dataset's own `eval` as a flat dict of floats.

    `y_pred` may be predicted labels or (N, C) scores; scores are turned into labels by argmax.
    """
    install_scatter_fallback()
    y_pred = torch.as_tensor(y_pred).detach().cpu()
    if y_pred.dim() > 1:
        y_pred = y_pred.argmax(dim=-1)
    y_true = torch.as_tensor(y_true).detach().cpu()
    metadata = torch.as_tensor(metadata).detach().cpu()
    results, _ = dataset.eval(y_pred, y_true, metadata)
    return {str(k): float(v) for k, v in results.items()}


def task_labels(dataset, subset_indices, label: str) -> torch.Tensor:
    """Labels of `label` ("y" or a metadata field) for the given indices into `dataset`.

    `subset_indices` may be a sequence, array or tensor of indices, a WILDSSubset (its indices
    into its parent are used), or None for every sample.
    """
    if hasattr(subset_indices, "indices") and hasattr(subset_indices, "dataset"):
        dataset, subset_indices = subset_indices.dataset, subset_indices.indices
    if label == "y":
        values = torch.as_tensor(dataset.y_array)
    else:
        fields = list(dataset.metadata_fields)
        if label not in fields:
            raise ValueError(
                f"label {label!r} is neither 'y' nor a metadata field of {type(dataset).__name__}; fields: {fields}."
            )
        values = torch.as_tensor(dataset.metadata_array)[:, fields.index(label)]
    if subset_indices is None:
        return values.long()
    if isinstance(subset_indices, torch.Tensor):
        index = subset_indices.long()
    else:
        index = torch.as_tensor(np.asarray(subset_indices, dtype=np.int64))
    return values[index].long()


def _discover() -> None:
    import importlib

    importlib.import_module("pipeline.data.catalog")


_discover()


def split_metrics(dataset, split: str, features: torch.Tensor, head: torch.Tensor,
                  rows: torch.Tensor) -> dict[str, float]:
    """Official eval of argmax(features · headᵀ) on one split -> flat `split/metric` keys,
    without the groups that have no sample in the split (wilds reports `acc_<group> = 0` with
    `count_<group> = 0` for them: a number that means nothing). `head` may instead be a function
    of the image features giving the logits: an image-conditioned head (CoCoOp's) or a cache
    model's classifier (`pipeline.models.evalmodel.TunedClassifier`)."""
    if callable(head):
        with torch.no_grad():
            preds = head(features.float()).argmax(1).cpu()
    else:
        preds = (features.float() @ head.float().t().cpu()).argmax(1)
    y_true = torch.as_tensor(dataset.y_array)[rows]
    metadata = torch.as_tensor(dataset.metadata_array)[rows]
    results = drop_empty_groups(official_eval(dataset, preds, y_true, metadata))
    return {f"{split}/{k}": float(v) for k, v in results.items()}


def drop_empty_groups(results: dict) -> dict:
    """`results` without the keys of groups whose `count_<group>` is 0 (every `<metric>_<group>`)."""
    empty = {k[len("count_"):] for k, v in results.items() if k.startswith("count_") and float(v) == 0}
    return {k: v for k, v in results.items() if k.split("_", 1)[-1] not in empty}


def domain_groups(dataset, fields: tuple[str, ...], rows) -> torch.Tensor:
    """The domain of each of `rows` (WILDS row indices): the group id of wilds'
    `CombinatorialGrouper` over `fields` (`DatasetSpec.domain_fields`), the grouper WILDS'
    `uniform_over_groups` sampling weights by."""
    from wilds.common.grouper import CombinatorialGrouper

    known = list(getattr(dataset, "metadata_fields", []))
    missing = [f for f in fields if f not in known]
    if missing:
        raise ValueError(f"domain fields {missing} are not metadata fields of {type(dataset).__name__} "
                         f"(fields: {known}); DatasetSpec.domain_fields names the domain grouper's fields")
    grouper = CombinatorialGrouper(dataset, list(fields))
    return grouper.metadata_to_group(torch.as_tensor(dataset.metadata_array)[torch.as_tensor(rows, dtype=torch.long)])


def split_rows(dataset, split: str) -> torch.Tensor:
    """WILDS row indices of `split`."""
    return torch.nonzero(torch.as_tensor(dataset.split_array) == dataset.split_dict[split]).flatten()
