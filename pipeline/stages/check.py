"""The `check` stage, first in the DAG: all of params.yaml against every registry, before any
stage that owns outputs runs (so a rejected edit deletes nothing).

Each stage validates the shape of params.yaml itself (`pipeline.config`); this stage adds what
needs the registries: dataset, method and retention-task names, every trial's hyper-parameters,
SWA (finetune.train.swa_start) against the methods, the selection protocol against the dataset's
splits and the levels, the generated datasets' and the pre-trainer's options.
Its output is a constant marker, so passing it again re-runs nothing downstream.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline import artifacts as paths
from pipeline.config import Params, ParamsError, check, load_params
from pipeline.core.validation import parse
from pipeline.stages.common import ParamsOpt, guard, run_command


def check_params(path: str | Path = "params.yaml") -> Params:
    """Load params.yaml and check everything the registries know (ParamsError naming the key)."""
    return _check(path)[0]


def _check(path: str | Path):
    """`check_params`, also returning the model `check_model_fit` built."""
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
    check_swa(params, METHODS)
    resolve_protocol(params.evaluate.selection, DATASETS[params.dataset.name],
                     params.sample.parsed_levels)
    generated = {name: spec for name, spec in DATASETS.items() if spec.generated}
    for key, options in params.prepare.items():
        owners = [spec.options for name, spec in generated.items() if name == key]
        owners += [c.options for c in CORPORA.values() if c.options_key == key]
        check(bool(owners), f"prepare.{key}", key,
              f"sections are named after generated datasets: {', '.join(sorted(generated)) or 'none'}")
        parse(owners[0], options, f"prepare.{key}")
    chosen = DATASETS[params.dataset.name]
    if chosen.generated:  # its options even when params.yaml leaves them out, and its files
        options = parse(chosen.options, params.prepare.get(chosen.name), f"prepare.{chosen.name}")
        if chosen.validate is not None:
            chosen.validate(options)
    if params.model.pretrained == BUILTIN:
        parse(PretrainConfig, params.pretrained.builtin, "pretrained.builtin")
    check_retention(params)
    check_files(params)
    return params, check_model_fit(params)


def code_records(params: Params) -> dict[Path, dict]:
    """The records the model stages depend on instead of every method's code: per trial its
    method, hyper-parameters and code digests (finetune entries), per compared method its code
    digests (evaluate entries), and which backbone each compared method starts from (vision)."""
    from pipeline.methods import METHODS, code_record, trial_record

    out = {paths.trial_record(t): trial_record(t, *params.finetune.trial(t)) for t in params.finetune.trials}
    out.update({paths.method_record(m): code_record(m) for m in params.finetune.methods})
    out[paths.BACKBONES] = {m: METHODS[m].backbone for m in params.finetune.methods}
    return out


def write_code_records(params: Params) -> None:
    """Write `code_records` (a file only when its content changes) and remove the records of
    trials and methods no longer in params.yaml."""
    records = code_records(params)
    for folder in (paths.TRIAL_RECORDS, paths.METHOD_RECORDS):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in set(folder.glob("*.json")) - set(records):
            stale.unlink()
    for path, record in records.items():
        text = json.dumps(record, indent=1, sort_keys=True) + "\n"
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)


def check_model_fit(params: Params):
    """`model.arch` built once with random weights, with its tokenizer (`model.tokenizer`:
    a hub tokenizer that cannot be loaded fails here, saying how to provide it) and the image
    transform of `model.pretrained`; every CLIP method of finetune.methods (`backbone`
    "clip") must accept it (`Method.check_model`: a block-level method refuses a timm image
    tower). Returns it."""
    from pipeline import models
    from pipeline.methods import METHODS

    m = params.model
    clip = models.create(m.arch, tokenizer=m.tokenizer, pretrained=m.pretrained)
    clip.tokenizer  # noqa: B018  (loaded now: its failure is the check's)
    for name in params.finetune.methods:
        if METHODS[name].backbone == "clip":
            METHODS[name].check_model(clip.model)
    if any(METHODS[name].backbone == "vision" for name in params.finetune.methods):
        check_vision(params, clip.image_size)
    return clip


def check_vision(params: Params, image_size: int) -> None:
    """The vision-only backbone (a vision-only method is compared): `vision.arch` is known and
    `vision.pretrained` is `builtin` or a readable file whose tensors fit it, built at the CLIP's
    image size."""
    from pipeline.models import vision

    v = params.vision
    vision.check_arch(v.arch)
    if v.pretrained != vision.BUILTIN:
        path = Path(v.pretrained).expanduser()
        if not path.is_file():
            raise ParamsError(f"vision.pretrained: {path}: weights file not found. Allowed: 'builtin' (pre-trained "
                              "on the corpus labels) or a path to a state-dict file of vision.arch (timm's keys)")
        vision.load_checked(vision.build(v.arch, image_size), path)


def check_swa(params: Params, methods: dict) -> None:
    """With finetune.train.swa_start on, every compared method that trains must be one SWA
    applies to (`pipeline.training.train.swa_refusal`)."""
    from pipeline.training.train import swa_refusal

    start = params.finetune.train.swa_start
    if start <= 0:
        return
    for m in params.finetune.methods:
        reason = swa_refusal(methods[m]) if methods[m].trains else None
        check(reason is None, "finetune.train.swa_start", start,
              f"{reason}; remove {m} from finetune.methods or set finetune.train.swa_start: 0 (off)")


def check_files(params: Params) -> None:
    """The files params.yaml names: the weights (readable, of `model.arch`), the reference CSV
    and its images, a real dataset's folder under `dataset.root` (unless it is to be
    downloaded). So a bad path fails here, before `prepare` regenerates anything."""
    from pipeline import models
    from pipeline.data.datasets import CORPORA, DATASETS
    from pipeline.data.torchdata import read_caption_csv

    models.check_weights(params.model.arch, params.model.pretrained)
    if params.reference.csv not in CORPORA:
        path = Path(params.reference.csv)
        if not path.is_file():
            raise ParamsError(f"reference.csv: {path}: file not found. Allowed: "
                              f"{', '.join(repr(c) for c in CORPORA)} (built in) or a CSV with columns filepath,title")
        files, _ = read_caption_csv(path, params.reference.separator, limit=params.reference.max_samples)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ParamsError(f"reference.csv: {path}: {len(missing)} of its first {len(files)} image files are "
                              f"missing, e.g. {missing[0]} (relative paths are taken from the CSV's folder)")
    spec = DATASETS[params.dataset.name]
    root = Path(params.dataset.root)
    if not spec.generated and not params.dataset.download and not spec.marker(root).is_file():
        raise ParamsError(f"dataset.root: {spec.name} is not under {root} ({spec.marker(root)} is missing). "
                          + spec.download_hint.format(root=root))


def check_retention(params: Params) -> None:
    """Every retention task names a known dataset and prompts that exist, or an image folder
    with class folders (and as many class names as folders); 'auto' finds what is there."""
    from pipeline.data.datasets import get_spec, load_prompts
    from pipeline.data.folder import folder_classes
    from pipeline.data.retention import resolve_tasks

    for t in resolve_tasks(params.retention, params.dataset.name, Path(params.dataset.root)):
        key = f"retention task {t.name}"
        if t.kind == "folder":
            if t.dataset is not None:  # a built-in task: its folder is made by `prepare`
                load_prompts(t.dataset, task=t.prompts) if t.prompts else None
                continue
            classes = folder_classes(Path(t.folder))
            if t.classnames is not None and not isinstance(t.classnames, str):
                check(len(t.classnames) == len(classes), f"{key}: classnames", list(t.classnames),
                      f"one name per class folder, in sorted order ({len(classes)}: {', '.join(classes)})")
            elif isinstance(t.classnames, str):
                check(Path(t.classnames).is_file(), f"{key}: classnames", t.classnames,
                      "a file with one class name per line, in sorted-folder order")
        else:
            spec = get_spec(t.dataset)
            root = Path(params.dataset.root)
            if not spec.generated and spec.name != params.dataset.name and not spec.marker(root).is_file():
                raise ParamsError(f"{key}: {spec.name} is not under dataset.root ({spec.marker(root)} is missing). "
                                  + spec.download_hint.format(root=root))
            if t.label != "y":
                load_prompts(spec.name, task=t.label)
            if t.split is not None:
                check(t.split in spec.eval_splits + (spec.train_split,), f"{key}: split", t.split,
                      f"{spec.name}'s splits: {', '.join((spec.train_split, *spec.eval_splits))}")


@guard
def command(params_file: Path = ParamsOpt):
    """Check all of params.yaml (names, every method's settings, generator options) -> data/check.json."""
    params, clip = _check(params_file)
    paths.CHECKED.parent.mkdir(parents=True, exist_ok=True)
    # what determines the image cache: the images stage depends on this file, not on `model`,
    # so another architecture with the same resize rebuilds nothing
    from pipeline.stages.common import image_key

    key = image_key(params, clip.preprocess_val)
    paths.IMAGE_KEY.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    write_code_records(params)
    paths.CHECKED.write_text(json.dumps({"params": "valid"}) + "\n")
    typer.echo(f"{params_file}: valid")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "check")
