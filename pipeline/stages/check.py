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


def _closest(name: str, names) -> str:
    """' (did you mean X?)' for the closest of `names`, or ''."""
    import difflib

    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


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

    raw_finetune = read_raw(path).get("finetune") or {}
    raw_methods = raw_finetune.get("methods") if isinstance(raw_finetune, dict) else None
    if isinstance(raw_methods, list):
        for m in raw_methods:
            check(m in METHODS, "finetune.methods", m, f"allowed: {', '.join(sorted(METHODS))}")
    raw_trials = raw_finetune.get("trials") if isinstance(raw_finetune, dict) else None
    for name, spec in (raw_trials or {}).items() if isinstance(raw_trials, dict) else ():
        method = spec.get("method") if isinstance(spec, dict) else None
        if isinstance(method, str) and method not in METHODS:
            raise ParamsError(f"finetune.trials.{name}.method: {method!r} is not a registered method"
                              f"{_closest(method, METHODS)}; registered: {', '.join(sorted(METHODS))} "
                              "(`python -m pipeline methods` describes them)")
    raw_search = raw_finetune.get("search") if isinstance(raw_finetune, dict) else None
    for name, spec in (raw_search or {}).items() if isinstance(raw_search, dict) else ():
        method = spec.get("method", name) if isinstance(spec, dict) else None
        if isinstance(method, str) and method not in METHODS:
            where = f"finetune.search.{name}.method" if "method" in spec else f"finetune.search.{name}"
            what = "" if "method" in spec else " (the search's name names its method when it gives no `method:`)"
            raise ParamsError(f"{where}: {method!r} is not a registered method{_closest(method, METHODS)}{what}; "
                              f"registered: {', '.join(sorted(METHODS))} (`python -m pipeline methods` describes them)")
    params = load_params(path)
    check(params.seed >= 0, "seed", params.seed, "use a non-negative integer")
    check(params.dataset.name in DATASETS, "dataset.name", params.dataset.name,
          f"allowed: {', '.join(sorted(DATASETS))}")
    for m in params.finetune.methods:
        check(m in METHODS, "finetune.methods", m, f"allowed: {', '.join(sorted(METHODS))}")
    check_search(params)
    for name in params.finetune.all_trials:
        method, overrides = params.finetune.trial(name)
        if METHODS[method].needs_captions:  # captions of the training images, or a refusal naming the key
            from pipeline.data.captions import check_captions

            origin = params.finetune.origin(name)
            key = f"finetune.search.{origin}.space" if origin else f"finetune.trials.{name}.captions"
            hp = parse_hparams(method, overrides, key)
            check_captions(hp.captions, DATASETS[params.dataset.name], key, method)
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
    check_resources(params)
    return params, check_model_fit(params)


def check_search(params: Params) -> None:
    """Every trial's hyper-parameters against its method's `Hparams`: a hand-written trial's
    overrides, and each search's space (its keys, the bounds of its distributions, every grid
    value and every draw), naming the key in params.yaml."""
    from pipeline.methods import parse_hparams

    ft = params.finetune
    for name, s in ft.searches.items():
        key = f"finetune.search.{name}.space"
        first = {d.key: d.values[0] for d in s.dims}
        parse_hparams(s.method, first, key)  # unknown keys, each named with the allowed ones
        for d in s.dims:
            for v in d.values:  # every grid value and option, both bounds of a distribution
                parse_hparams(s.method, {**first, d.key: v}, key)
    for name in ft.all_trials:  # the draws themselves (an int distribution of a float setting...)
        method, overrides = ft.trial(name)
        origin = ft.origin(name)
        parse_hparams(method, overrides, f"finetune.search.{origin}.space" if origin else f"finetune.trials.{name}")


def check_generated(params: Params, params_file: Path) -> None:
    """The generated trials file beside params.yaml (`pipeline.config.TRIALS_FILE`, what dvc.yaml's
    finetune matrix reads) holds exactly the trials params.yaml's finetune.trials and
    finetune.search give: DVC expanded its matrix from that file before this stage ran, so a
    stale copy would train other trials than params.yaml says."""
    from pipeline.config import TRIALS_FILE, draw_trials, read_generated, spec_digest

    path = Path(params_file).parent / TRIALS_FILE
    fix = "run `python -m pipeline search` to write it (`python -m pipeline repro` does so before running dvc)"
    record = read_generated(path)
    if record is None:
        raise ParamsError(f"{path}: the generated trials file is missing or not YAML; {fix}")
    ft = params.finetune
    trials, _ = draw_trials(ft.trials, ft.searches)
    listed = record.get("trials") if isinstance(record.get("trials"), dict) else {}
    if listed != trials or record.get("spec_sha256") != spec_digest(ft.trials, ft.searches):
        new = [t for t in trials if t not in listed]
        gone = [t for t in listed if t not in trials]
        changed = [t for t in trials if t in listed and listed[t] != trials[t]]
        what = "; ".join(f"{label}: {', '.join(ts[:3])}{', …' if len(ts) > 3 else ''}"
                         for label, ts in (("missing", new), ("not in params.yaml", gone), ("other values", changed)) if ts)
        raise ParamsError(f"{path}: out of date with finetune.trials and finetune.search of {params_file} "
                          f"({what or 'generated by other code'}), and dvc.yaml's finetune matrix reads it; {fix}")


def write_generated(params: Params, params_file: Path = Path("params.yaml")) -> tuple[Path, int, bool]:
    """Write the generated trials file beside params_file for its (checked) params' finetune.trials
    and finetune.search, only when its text changes; returns (path, number of trials, changed)."""
    from pipeline.config import TRIALS_FILE, render_generated

    path = Path(params_file).parent / TRIALS_FILE
    text = render_generated(params.finetune)
    changed = not path.is_file() or path.read_text() != text
    if changed:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path, len(params.finetune.all_trials), changed


def code_records(params: Params) -> dict[Path, dict]:
    """The records the model stages depend on instead of every method's code: per trial its
    method, hyper-parameters and code digests (finetune entries), per compared method its code
    digests (evaluate entries), and which backbone each compared method starts from (vision)."""
    from pipeline.methods import METHODS, code_record, trial_record

    out = {paths.trial_record(t): trial_record(t, *params.finetune.trial(t)) for t in params.finetune.all_trials}
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


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a SLURM job's allocation, not the
    node's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_device(key: str, name: str) -> None:
    """A `device` param names a device this machine has: auto, cpu, cuda, cuda:N, mps."""
    import torch

    allowed_here = ["auto", "cpu"]
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_cuda:
        allowed_here += ["cuda"] + [f"cuda:{i}" for i in range(n_cuda)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        allowed_here.append("mps")
    if name in allowed_here:
        return
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise ParamsError(f"{key}: {name!r} is not a device; allowed: auto (CUDA when present, else CPU), cpu, "
                          "cuda, cuda:N, mps")
    what = {"cuda": f"torch {torch.__version__} sees {n_cuda} CUDA device(s)",
            "mps": "torch sees no Apple MPS device", "cpu": "the CPU takes no index"}[kind]
    raise ParamsError(f"{key}: {name!r} is not available on this machine ({what}); allowed here: "
                      f"{', '.join(allowed_here)}")


def check_resources(params: Params) -> None:
    """What params.yaml asks of the machine, before DVC deletes any output for a run that could
    not start: every `device` exists here, DDP's `nproc_per_node` fits the devices (one
    process per GPU) or the cores (CPU), and data-loading workers fit the cores."""
    import torch

    from pipeline.core.env import resolve_device

    devices = {"pretrained.device": params.pretrained.device, "embed.device": params.embed.device,
               "finetune.train.device": params.finetune.train.device, "evaluate.device": params.evaluate.device}
    for key, name in devices.items():
        check_device(key, name)
    cores = available_cores()
    nproc = params.finetune.train.nproc_per_node
    if nproc > 1:
        device = resolve_device(params.finetune.train.device)
        if device.type == "cuda":
            n = torch.cuda.device_count()
            check(nproc <= n, "finetune.train.nproc_per_node", nproc,
                  f"DDP runs one process per GPU and this machine has {n}: use 1 to {n}")
        else:
            check(nproc <= cores, "finetune.train.nproc_per_node", nproc,
                  f"DDP on {device.type} runs one process per core and {cores} are available here: use 1 to {cores}")
    workers = {"images.num_workers": params.images.num_workers, "embed.num_workers": params.embed.num_workers,
               "finetune.train.num_workers": params.finetune.train.num_workers,
               "evaluate.num_workers": params.evaluate.num_workers}
    for key, n in workers.items():
        check(n <= cores, key, n, f"{cores} CPU cores are available here: use 0 (load in the main process) to {cores}")


def check_model_fit(params: Params):
    """`model.arch` built once with random weights, with its tokenizer (`model.tokenizer`:
    a hub tokenizer that cannot be loaded fails here, saying how to provide it) and the image
    transform of `model.pretrained`; every CLIP method of finetune.methods (`backbone`
    "clip") must accept it (`Method.check_model`: a block-level method refuses a timm image
    tower). Returns it."""
    from pipeline import models
    from pipeline.methods import METHODS, parse_hparams

    m = params.model
    clip = models.create(m.arch, tokenizer=m.tokenizer, pretrained=m.pretrained)
    clip.tokenizer  # noqa: B018  (loaded now: its failure is the check's)
    for name in params.finetune.methods:
        if METHODS[name].backbone == "clip":
            METHODS[name].check_model(clip.model)
    names = _class_names(params)
    for trial in params.finetune.trials:
        method, overrides = params.finetune.trial(trial)
        if METHODS[method].backbone == "clip":
            hp = parse_hparams(method, overrides, f"finetune.trials.{trial}")
            try:
                METHODS[method].check_task(hp, clip.model, clip.tokenizer, names)
            except ValueError as err:
                raise ParamsError(f"finetune.trials.{trial} ({method}, {m.arch}, {params.dataset.name}): {err}") from None
    if any(METHODS[name].backbone == "vision" for name in params.finetune.methods):
        check_vision(params, clip.image_size)
    return clip


def _class_names(params: Params) -> tuple[str, ...] | None:
    """The dataset's class names from its shipped prompt file; None for a dataset whose prompts
    come with its data (written by `prepare`: its methods check them when they start)."""
    from pipeline.data.datasets import get_spec, read_prompts

    spec = get_spec(params.dataset.name)
    if not spec.prompt_file or not spec.prompt_path.is_file():
        return None
    return tuple(read_prompts(spec.prompt_path).classnames)


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


def external_links(params: Params) -> dict[str, dict[str, Path]]:
    """Every file params.yaml names outside the project, by role (`artifacts.EXTERNAL_ROLES`):
    link name -> absolute path (`pipeline.core.external`). `model`: model.pretrained when a
    file; `vision`: vision.pretrained when a file; `reference`: reference.csv and each image it
    lists (the rows the stages read); `dataset`: a real dataset's release files under
    `dataset.root` (the top level of its folder: metadata, splits, the RELEASE marker; not its
    image tree, which a WILDS release never rewrites), the custom dataset's CSV or folder, its
    class-name file and every image; `retention`: each folder task's folder and class-name
    file, and the release files of each other dataset a task reads."""
    from dataclasses import replace

    from pipeline import models
    from pipeline.core.external import absolute
    from pipeline.data.datasets import CORPORA, DATASETS, get_spec
    from pipeline.data.retention import resolve_tasks
    from pipeline.data.torchdata import read_caption_csv
    from pipeline.models import vision

    out: dict[str, dict[str, Path]] = {role: {} for role in paths.EXTERNAL_ROLES}
    if params.model.pretrained != models.BUILTIN and Path(params.model.pretrained).expanduser().is_file():
        out["model"]["weights" + Path(params.model.pretrained).suffix] = absolute(params.model.pretrained)
    if params.vision.pretrained != vision.BUILTIN and Path(params.vision.pretrained).expanduser().is_file():
        out["vision"]["weights" + Path(params.vision.pretrained).suffix] = absolute(params.vision.pretrained)
    if params.reference.csv not in CORPORA:
        csv = absolute(params.reference.csv)
        out["reference"]["captions.csv"] = csv
        files, _ = read_caption_csv(csv, params.reference.separator, limit=params.reference.max_samples)
        width = len(str(len(files)))
        for i, f in enumerate(files):
            out["reference"][f"images/{i:0{width}d}-{f.name}"] = absolute(f)

    def release(spec, key: str, into: dict) -> None:
        folder = spec.folder(Path(params.dataset.root))
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    into[f"{key}/{f.name}"] = absolute(f)

    spec = DATASETS[params.dataset.name]
    if spec.name == "custom":
        from pipeline.data.custom import CustomConfig, build_table

        cfg = parse(CustomConfig, params.prepare.get("custom"), "prepare.custom")
        source = out["dataset"]
        # the description (CSV or folder tree, class names) under `source/`: what it says is in
        # prepare's split table; the images' bytes are the content (`content_sha256`), the same
        # whichever form lists them
        if cfg.csv is not None:
            source["source/custom.csv"] = absolute(cfg.csv)
        else:
            source["source/custom-folder"] = absolute(cfg.folder)
        table, _ = build_table(replace(cfg, check_images=False))
        width = len(str(len(table)))
        for i, f in enumerate(table["path"]):
            source[f"custom/images/{i:0{width}d}-{Path(f).name}"] = absolute(f)
        if isinstance(cfg.classnames, str):
            source["source/classnames.txt"] = absolute(cfg.classnames)
    elif not spec.generated:
        release(spec, spec.name, out["dataset"])
    for t in resolve_tasks(params.retention, params.dataset.name, Path(params.dataset.root)):
        key = t.name.replace("/", "_")
        if t.kind == "folder" and t.dataset is None:
            out["retention"][key] = absolute(t.folder)
            if isinstance(t.classnames, str):
                out["retention"][f"{key}.classnames.txt"] = absolute(t.classnames)
        elif t.kind != "folder" and t.dataset != params.dataset.name:
            other = get_spec(t.dataset)
            if not other.generated:
                release(other, other.name, out["retention"])
    return out


def write_external(params: Params) -> dict[str, dict]:
    """Mirror `external_links` under data/external (`pipeline.core.external.sync`); returns
    each role's digest record. The check stage's output, never the check command's."""
    from pipeline.core.external import DigestCache, sync

    cache = DigestCache(paths.DIGEST_CACHE if paths.DIGEST_CACHE.parent.parent.is_dir() else None)
    try:
        return {role: sync(paths.EXTERNAL / role, links, cache) for role, links in external_links(params).items()}
    finally:
        cache.save()


@guard
def command(params_file: Path = ParamsOpt,
            write: bool = typer.Option(False, "--write", help="Also write the stage's outputs: data/check.json, "
                                       "data/image_key.json and data/external/ (links to the files params.yaml names "
                                       "outside the project). `dvc repro` runs it so; by hand, leave it out.")):
    """Check all of params.yaml: names, every method's settings, generator options, the files it
    names and the resources it asks for (devices, processes, workers). Changes nothing on disk
    unless --write."""
    params, clip = _check(params_file)
    check_generated(params, params_file)
    if write:
        # what determines the image cache: the images stage depends on this file, not on `model`,
        # so another architecture with the same resize rebuilds nothing
        from pipeline.stages.common import image_key

        key = image_key(params, clip.preprocess_val)
        paths.CHECKED.parent.mkdir(parents=True, exist_ok=True)
        write_external(params)
        write_code_records(params)
        _write_if_changed(paths.IMAGE_KEY, json.dumps(key, indent=1, sort_keys=True) + "\n")
        _write_if_changed(paths.CHECKED, json.dumps({"params": "valid"}) + "\n")
    typer.echo(f"{params_file}: valid")


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "check")
