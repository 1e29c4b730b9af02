"""params.yaml -> frozen, validated settings (pydantic, through `pipeline.core.validation`).

This module knows the *shape* of params.yaml: every section is a frozen dataclass; unknown
keys, wrong types and impossible values are rejected with a sentence that names the dotted key,
the value and what is allowed. It imports no registry, so every stage can load params without
depending on code it does not run. The free-form sections are typed by the layer that owns
them: each trial of `finetune.trials` by its method (`pipeline.methods.parse_hparams`),
`prepare.<dataset>` by the generated dataset (`DatasetSpec.options`), `pretrained.builtin` by
the pre-trainer (`PretrainConfig`). Names against registries (datasets, methods, tasks) and the
files params.yaml points at are checked by the first DVC stage, `check`
(`pipeline/stages/check.py`), before any stage that owns outputs runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.core.levels import Level, parse_levels
from pipeline.core.validation import Bool, Float, Int, ParamsError, Settings, Str, check, parse, to_dict

__all__ = ["Params", "ParamsError", "load_params", "read_raw", "check", "to_dict"]


# ---------------------------------------------------------------------------------------------
# the sections of params.yaml


@dataclass(frozen=True)
class DatasetParams(Settings):
    name: Str = "synthetic"
    root: Str = "data/wilds"  # where real WILDS data lives (the synthetic data is generated)
    download: Bool = False


@dataclass(frozen=True)
class ModelParams(Settings):
    arch: Str = "tiny-clip"
    pretrained: Str = "builtin"  # 'builtin' | open_clip tag | path to a weights file
    # a saved Hugging Face tokenizer folder, for archs whose open_clip config names a hub
    # tokenizer (SigLIP's) on a machine that cannot download it; null = the arch's own
    # (`pipeline.models.load_tokenizer`)
    tokenizer: Str | None = None


@dataclass(frozen=True)
class VisionParams(Settings):
    """The vision-only backbone of the vision-only methods (`pipeline.models.vision`)."""

    arch: Str = "tiny-vit"  # 'tiny-vit' (built in) | a timm model name
    pretrained: Str = "builtin"  # 'builtin' (pre-trained on the corpus labels) | path to a weights file


@dataclass(frozen=True)
class ReferenceParams(Settings):
    """Image-caption pairs: DiVE's reference data, RSA's probe set, the builtin corpus."""

    csv: Str = "builtin"  # 'builtin' (the synthetic caption corpus) or a filepath,title CSV
    separator: Str = ","
    max_samples: Int = 2000  # embedded once by `embed`; DiVE and RSA draw from these

    def __post_init__(self):
        check(self.max_samples >= 2, "reference.max_samples", self.max_samples, "use 2 or more")
        check(len(self.separator) == 1, "reference.separator", self.separator, "use one character")


@dataclass(frozen=True)
class RetentionTaskParams(Settings):
    """One zero-shot retention task of `retention.tasks` (the kinds and what each field
    defaults to: `pipeline.data.datasets.RetentionTask`, `pipeline.data.retention`)."""

    name: Str | None = None  # default: the folder's name, or '<dataset>' / '<dataset>/<label>'
    dataset: Str | None = None  # a registered dataset (its `split`, labelled by `label`)
    split: Str | None = None
    label: Str | None = None  # 'y' (default) or a metadata field of the dataset
    folder: Str | None = None  # or an image folder <folder>/<class>/<image>
    classnames: tuple[Str, ...] | Str | None = None  # folder: names in sorted-folder order, or a file
    templates: tuple[Str, ...] | None = None  # folder: prompt templates with {c}
    max_samples: Int | None = None  # default: retention.max_samples

    def check(self, key: str) -> None:
        given = {k: v for k, v in to_dict(self).items() if v is not None}
        check((self.dataset is None) != (self.folder is None), key, given,
              "give either `dataset` (a registered dataset) or `folder` (<folder>/<class>/<image>)")
        if self.folder is not None:
            for field_ in ("split", "label"):
                check(getattr(self, field_) is None, f"{key}.{field_}", getattr(self, field_),
                      "a folder task has no split or label (its classes are the sub-folders)")
        else:
            for field_ in ("classnames", "templates"):
                check(getattr(self, field_) is None, f"{key}.{field_}", getattr(self, field_),
                      "a dataset task takes its class names and templates from the dataset's prompt file")
        for i, t in enumerate(self.templates or ()):
            check("{c}" in t, f"{key}.templates[{i}]", t, "a template contains {c}, where the class name goes")
        if self.templates is not None:
            check(len(self.templates) > 0, f"{key}.templates", [], "give at least one template, or leave it out")
        if self.max_samples is not None:
            check(self.max_samples >= 1, f"{key}.max_samples", self.max_samples, "use a positive integer")
        if self.name is not None:
            check(bool(TASK_NAME.match(self.name)), f"{key}.name", self.name,
                  "names use letters, digits and '-', '_', '.', '/' (they are metric keys)")


TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")


@dataclass(frozen=True)
class RetentionParams(Settings):
    """Zero-shot retention: tasks the fine-tuned models are never trained on, evaluated with
    their own prompts before and after fine-tuning (`prepare` draws their images)."""

    # 'auto': the dataset's own retention tasks plus every other WILDS dataset found under
    # dataset.root; or a list of tasks: 'auto', '<dataset>', '<dataset>/<label>' or a mapping
    tasks: tuple[Str | RetentionTaskParams, ...] | Str = "auto"
    max_samples: Int = 1000  # images per task at most (a seeded subsample, the same for every model)

    def __post_init__(self):
        check(self.max_samples >= 1, "retention.max_samples", self.max_samples, "use a positive integer")
        if isinstance(self.tasks, str):
            check(self.tasks == "auto", "retention.tasks", self.tasks,
                  "use 'auto' or a list of tasks ('auto', '<dataset>', '<dataset>/<label>' or a mapping)")
            return
        for i, t in enumerate(self.tasks):
            if isinstance(t, RetentionTaskParams):
                t.check(f"retention.tasks[{i}]")
            else:
                check(bool(TASK_NAME.match(t)), f"retention.tasks[{i}]", t,
                      "use 'auto', '<dataset>' or '<dataset>/<label>' (e.g. synthetic/colour)")

    @property
    def entries(self) -> tuple:
        return ("auto",) if isinstance(self.tasks, str) else self.tasks


IMAGE_FORMATS = ("raw", "jpeg", "none")  # pipeline.data.imagecache says what each stores


@dataclass(frozen=True)
class ImagesParams(Settings):
    """The prepared image cache (`images` stage, `pipeline.data.imagecache`): every image the
    model stages read, decoded once at the model's resolution."""

    format: Str = "raw"  # raw (uint8, memory-mapped: exact) | jpeg (re-encoded at `quality`) | none
    quality: Int = 95  # jpeg only
    num_workers: Int = 0  # decoding processes while building (not part of the cache's key)

    def __post_init__(self):
        check(self.format in IMAGE_FORMATS, "images.format", self.format, f"allowed: {', '.join(IMAGE_FORMATS)}")
        check(1 <= self.quality <= 100, "images.quality", self.quality, "use 1 to 100 (JPEG quality)")
        check(self.num_workers >= 0, "images.num_workers", self.num_workers, "use 0 or more")


@dataclass(frozen=True)
class PretrainedParams(Settings):
    builtin: dict = field(default_factory=dict)  # PretrainConfig overrides
    device: Str = "auto"


@dataclass(frozen=True)
class EmbedParams(Settings):
    batch_size: Int = 256
    iimm_samples: Int = 2000  # train images used for IIMM / silhouette (seeded subsample)
    device: Str = "auto"
    num_workers: Int = 0

    def __post_init__(self):
        check(self.batch_size > 0, "embed.batch_size", self.batch_size, "use a positive integer")
        check(self.iimm_samples >= 2, "embed.iimm_samples", self.iimm_samples, "use 2 or more")
        check(self.num_workers >= 0, "embed.num_workers", self.num_workers, "use 0 or more")


@dataclass(frozen=True)
class SampleParams(Settings):
    # levels of data availability (pipeline.core.levels): k examples per class (an integer)
    # or a share of the train split ("25%"); the zero-shot level is always evaluated
    levels: tuple[Int | Str | Float, ...] = (1, 16)  # floats only to say how to write a share
    seeds: tuple[Int, ...] = (0, 1, 2)

    def __post_init__(self):
        parse_levels(self.levels)
        check(len(self.seeds) > 0, "sample.seeds", list(self.seeds), "give at least one seed")
        dup = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        check(not dup, "sample.seeds", list(self.seeds), f"each seed once (repeated: {dup})")
        for s in self.seeds:
            check(s >= 0, "sample.seeds", s, "seeds are non-negative integers")

    @property
    def parsed_levels(self) -> tuple[Level, ...]:
        return parse_levels(self.levels)

    def level(self, name: str) -> Level:
        """The configured level written `name` (as in a DVC matrix entry), or ParamsError."""
        for lv in self.parsed_levels:
            if lv.name == name:
                return lv
        raise ParamsError(f"--level: {name!r} is not in sample.levels "
                          f"({', '.join(lv.name for lv in self.parsed_levels)})")


@dataclass(frozen=True)
class TrainParams(Settings):
    """Shared by every method; the per-method sections hold lr, weight decay and the rest."""

    # the budget scales with the data: `epochs` passes over the training sample, bounded by
    # min_steps and max_steps (pipeline.training.train.budget_steps)
    epochs: Float = 15.0
    min_steps: Int = 30
    max_steps: Int = 300
    batch_size: Int = 32  # global batch (summed over DDP processes)
    grad_accum: Int = 1
    grad_clip: Float = 1.0  # 0 disables
    checkpoint_every: Int = 20
    device: Str = "auto"
    precision: Str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    num_workers: Int = 0
    nproc_per_node: Int = 1  # >1 launches torchrun (DDP)
    # activation memory (MiB) for the class prompts the prompt-CE methods encode with
    # gradient every step: they go through the text tower in chunks that fit it, recomputed
    # in the backward pass (pipeline.models.zeroshot); the result does not depend on it
    prompt_memory_mb: Int = 1024
    # SWA (Izmailov et al. 2018; pipeline.training.train.fit): after this fraction of the run,
    # the trainable parameters of the last step and of every `swa_every`-th step before it are
    # averaged, and the average is what is saved (evaluation and WiSE-FT see it). 0 = off.
    # Weight-space methods only, whose saved state is their parameters (`check` refuses others)
    swa_start: Float = 0.0
    swa_every: Int = 1
    # draw each batch uniformly over the dataset's domains (WILDS uniform_over_groups over the
    # domain grouper, DatasetSpec.domain_fields): sample i with probability ∝ 1 / (samples of
    # its domain in the training sample), with replacement (pipeline.training.train.balanced_plan)
    group_balanced: Bool = False

    def __post_init__(self):
        check(self.epochs > 0, "finetune.train.epochs", self.epochs, "use a positive number of epochs")
        check(self.min_steps > 0, "finetune.train.min_steps", self.min_steps, "use a positive integer")
        check(self.max_steps >= self.min_steps, "finetune.train.max_steps", self.max_steps,
              f"use at least finetune.train.min_steps ({self.min_steps})")
        check(self.batch_size > 0, "finetune.train.batch_size", self.batch_size, "use a positive integer")
        check(self.grad_accum > 0, "finetune.train.grad_accum", self.grad_accum, "use a positive integer")
        check(self.batch_size % self.grad_accum == 0, "finetune.train.grad_accum", self.grad_accum,
              f"it must divide finetune.train.batch_size ({self.batch_size})")
        check(self.grad_clip >= 0, "finetune.train.grad_clip", self.grad_clip, "use 0 (off) or a positive number")
        check(self.checkpoint_every > 0, "finetune.train.checkpoint_every", self.checkpoint_every,
              "use a positive integer")
        check(self.precision in ("auto", "fp32", "bf16"), "finetune.train.precision", self.precision,
              "allowed: auto, fp32, bf16")
        check(self.num_workers >= 0, "finetune.train.num_workers", self.num_workers, "use 0 or more")
        check(self.nproc_per_node >= 1, "finetune.train.nproc_per_node", self.nproc_per_node,
              "use 1 or more")
        check(self.prompt_memory_mb >= 1, "finetune.train.prompt_memory_mb", self.prompt_memory_mb,
              "use a positive number of MiB (e.g. 1024)")
        check(0.0 <= self.swa_start < 1.0, "finetune.train.swa_start", self.swa_start,
              "use 0 (off) or the fraction of the run after which SWA averages, in (0, 1), e.g. 0.75")
        check(self.swa_every >= 1, "finetune.train.swa_every", self.swa_every, "use a positive number of steps")


# The default search: each default method's most sensitive setting drawn twice from a
# log-uniform range (Sobol, seeded) around its recipe's value: 12 trials, as the two-value
# lists before it (params.yaml has the same; tests/test_config.py checks it)
DEFAULT_SEARCH: dict[str, dict] = {
    "lp": {"space": {"lr": {"loguniform": [1.0e-3, 3.0e-2]}}, "sampler": "sobol", "n": 2},
    "ft": {"space": {"lr": {"loguniform": [1.0e-5, 3.0e-4]}}, "sampler": "sobol", "n": 2},
    "flyp": {"space": {"lr": {"loguniform": [1.0e-5, 3.0e-4]}}, "sampler": "sobol", "n": 2},
    "dive": {"space": {"lam": {"loguniform": [1.0, 1.0e3]}}, "sampler": "sobol", "n": 2},
    "vision_lp": {"space": {"lr": {"loguniform": [1.0e-3, 3.0e-2]}}, "sampler": "sobol", "n": 2},
    "vision_ft": {"space": {"lr": {"loguniform": [3.0e-5, 1.0e-3]}}, "sampler": "sobol", "n": 2},
}

# no dot: DVC reads `trials.<name>` (a params dep of the trial's finetune entries) as nested keys
TRIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class FinetuneParams(Settings):
    # the methods compared (the report's order); each needs at least one trial
    methods: tuple[Str, ...] = ("lp", "ft", "flyp", "dive", "vision_lp", "vision_ft")
    train: TrainParams = field(default_factory=TrainParams)
    # hand-written trials: trial name -> {method: <name>, <hparam>: <value>, ...}. A trial sets
    # the hyper-parameters it changes from the method's defaults (its Hparams class, the one
    # source: `python -m pipeline methods`).
    trials: dict[Str, dict] = field(default_factory=dict)
    # search spaces: search name -> {method (default: the name), space, n, sampler, seed}
    # (`pipeline.core.search`: grids, distributions, samplers, trial names). Every trial, written
    # or drawn, runs at every level and seed, and evaluate.selection picks one per method, level
    # and seed.
    search: dict[Str, dict] = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SEARCH.items()})

    def __post_init__(self):
        from pipeline.core.search import parse_search

        check(len(self.methods) > 0, "finetune.methods", [], "list at least one method")
        dup = sorted({m for m in self.methods if self.methods.count(m) > 1})
        check(not dup, "finetune.methods", list(self.methods), f"each method once (repeated: {dup})")
        for name, spec in self.trials.items():
            check(bool(TRIAL_NAME.match(name)), "finetune.trials", name,
                  "trial names use letters, digits, '-' and '_' (they name DVC stages, params keys and folders)")
            check(isinstance(spec.get("method"), str), f"finetune.trials.{name}.method", spec.get("method"),
                  "every trial names its method, e.g. {method: ft, lr: 1.0e-4}")
            check(spec["method"] in self.methods, f"finetune.trials.{name}.method", spec["method"],
                  f"the method must be in finetune.methods ({', '.join(self.methods)})")
        searches = {name: parse_search(name, raw) for name, raw in self.search.items()}
        for name, s in searches.items():
            key = f"finetune.search.{name}.method" if "method" in self.search[name] else f"finetune.search.{name}"
            what = "the method" if "method" in self.search[name] else "the method (the search's name: no `method:` given)"
            check(s.method in self.methods, key, s.method,
                  f"{what} must be in finetune.methods ({', '.join(self.methods)})")
        object.__setattr__(self, "_searches", searches)
        for m in self.methods:
            check(any(t["method"] == m for t in self.trials.values()) or any(s.method == m for s in searches.values()),
                  "finetune.methods", m,
                  f"give {m} at least one trial: a search in finetune.search (e.g. {m}: {{space: {{lr: [1.0e-4]}}}}) "
                  f"or a trial in finetune.trials (e.g. {m}-default: {{method: {m}}})")

    @property
    def searches(self) -> dict:
        """search name -> `pipeline.core.search.Search` (validated shape)."""
        return self._searches

    @property
    def all_trials(self) -> dict[str, dict]:
        """Every trial: the hand-written ones (params.yaml order), then each search's (its order);
        name -> {method, <hparam>: value}. Computed once (a name clash is a ParamsError)."""
        cached = self.__dict__.get("_all_trials")
        if cached is None:
            cached, origin = expand_trials(self.trials, self.searches, self.__dict__.get("_generated"))
            object.__setattr__(self, "_all_trials", cached)
            object.__setattr__(self, "_origin", origin)
        return cached

    def origin(self, trial: str) -> str | None:
        """The search a trial was drawn by, or None for a hand-written trial."""
        self.all_trials  # noqa: B018
        return self._origin.get(trial)

    def trial(self, name: str) -> tuple[str, dict]:
        """(method, hparam overrides) of a trial, or ParamsError naming the allowed ones."""
        if name not in self.all_trials:
            raise ParamsError(f"--trial: {name!r} is not a trial of finetune.trials or finetune.search "
                              f"({', '.join(self.all_trials) or 'none'})")
        spec = dict(self.all_trials[name])
        return spec.pop("method"), spec

    def trials_of(self, method: str) -> list[str]:
        """The method's trials, hand-written first (params.yaml order; the `none` protocol takes
        the first), then drawn."""
        return [n for n, t in self.all_trials.items() if t["method"] == method]


def expand_trials(trials: dict, searches: dict, generated=None) -> tuple[dict, dict]:
    """(all trials, {trial: its search}) of hand-written `trials` and parsed `searches`.
    `generated`: the generated trials file beside params.yaml (`TRIALS_FILE`); when its
    recorded spec digest is this spec's, its trials are taken as they are (no sampler runs:
    Sobol's scipy import costs a second per process), otherwise they are drawn here."""
    digest = spec_digest(trials, {n: s for n, s in searches.items()})
    if generated is not None:
        record = read_generated(generated)
        if record is not None and record.get("spec_sha256") == digest and isinstance(record.get("trials"), dict):
            origin = record.get("origin") or {}
            return {k: dict(v) for k, v in record["trials"].items()}, dict(origin)
    return draw_trials(trials, searches)


def draw_trials(trials: dict, searches: dict) -> tuple[dict, dict]:
    """`expand_trials` without the generated file: always draws."""
    from pipeline.core.search import expand

    out = {k: dict(v) for k, v in trials.items()}
    origin: dict[str, str] = {}
    for name, s in searches.items():
        for t, spec in expand(s).items():
            if t in out:
                other = f"a trial of search {origin[t]}" if t in origin else "a hand-written trial of finetune.trials"
                raise ParamsError(f"finetune.search.{name}: its trial {t!r} is also {other}; rename the search "
                                  "or that trial (trial names must be unique)")
            out[t] = spec
            origin[t] = name
    return out, origin


# The generated trials file: every trial DVC's finetune matrix runs (dvc.yaml `vars:`), written
# by `python -m pipeline search` (and `python -m pipeline repro`) from finetune.trials and
# finetune.search; the check stage refuses a file that does not match params.yaml.
TRIALS_FILE = "trials.yaml"


def spec_digest(trials: dict, searches: dict) -> str:
    """SHA-256 of what determines the trials: the hand-written trials, the parsed searches and
    the code that draws (`pipeline/core/search.py`)."""
    import hashlib
    import json

    from pipeline.core import search as search_module

    spec = {"trials": trials, "search": {n: to_dict(s) for n, s in searches.items()}}
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    h.update(Path(search_module.__file__).read_bytes())
    return h.hexdigest()


def read_generated(path: Path) -> dict | None:
    """The generated trials file as data, or None when absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def render_generated(finetune: "FinetuneParams") -> str:
    """The generated trials file's text for these params."""
    trials, origin = draw_trials(finetune.trials, finetune.searches)
    head = ("# GENERATED by `python -m pipeline search` from finetune.trials and finetune.search of params.yaml:\n"
            "# every trial dvc.yaml's finetune matrix runs. Do not edit: `python -m pipeline repro` rewrites it, and\n"
            "# the check stage refuses a copy that does not match params.yaml. Commit it with params.yaml.\n")
    body = {"spec_sha256": spec_digest(finetune.trials, finetune.searches),
            "origin": origin, "trials": trials}
    return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120)


SELECTIONS = ("auto", "id_val", "ood_val", "fewshot_val", "none")
SOUPS = ("uniform", "greedy")  # = pipeline.evaluation.soups.KINDS (config imports only core; a test checks)


@dataclass(frozen=True)
class EvaluateParams(Settings):
    # how each method's trial (and WiSE-FT alpha) is chosen per level and seed, never on a test
    # split: id_val / ood_val (the dataset's ID / OOD validation split), fewshot_val (a
    # validation set the size of the training sample, held out of the train split), none (each
    # method's first trial, alpha = 1); auto = id_val where the dataset has one, else ood_val
    selection: Str = "auto"
    wise_alphas: tuple[Float, ...] = (0.0, 0.5, 1.0)
    # model soups of each method's trials per level and seed (pipeline.evaluation.soups), each a
    # report row of its own (`ft+greedy_soup`): uniform and/or greedy; off by default (they cost
    # an evaluation per trial and per soup, and add rows); methods that declare soups only
    soups: tuple[Str, ...] = ()
    rsa_samples: Int = 500
    batch_size: Int = 256
    device: Str = "auto"
    num_workers: Int = 0

    def __post_init__(self):
        for a in self.wise_alphas:
            check(0.0 <= a <= 1.0, "evaluate.wise_alphas", a, "alphas lie in [0, 1]")
        check(1.0 in self.wise_alphas, "evaluate.wise_alphas", list(self.wise_alphas),
              "include 1.0 (the fine-tuned model itself)")
        check(self.selection in SELECTIONS, "evaluate.selection", self.selection,
              f"allowed: {', '.join(SELECTIONS)}")
        for kind in self.soups:
            check(kind in SOUPS, "evaluate.soups", list(self.soups), f"allowed: a list of {', '.join(SOUPS)}")
        check(len(set(self.soups)) == len(self.soups), "evaluate.soups", list(self.soups), "name each soup once")
        check(not ("greedy" in self.soups and self.selection == "none"), "evaluate.soups", list(self.soups),
              "a greedy soup adds trials by their validation score, and evaluate.selection: none reads no "
              "validation data; use a validation protocol (auto, id_val, ood_val, fewshot_val) or only `uniform`")
        check(self.rsa_samples >= 3, "evaluate.rsa_samples", self.rsa_samples, "use 3 or more")
        check(self.batch_size > 0, "evaluate.batch_size", self.batch_size, "use a positive integer")


@dataclass(frozen=True)
class ReportParams(Settings):
    pass


@dataclass(frozen=True)
class Params(Settings):
    seed: Int = 0
    # torch's CPU threads (and the BLAS libraries') in every stage that computes results
    # (pretrained, vision, embed, finetune, evaluate): the count changes the order of the sums,
    # so the same params give the same bits on any machine only if params set it
    # (`pipeline.core.env.set_threads`). Data loading (num_workers) is not part of it.
    threads: Int = 1
    dataset: DatasetParams = field(default_factory=DatasetParams)
    model: ModelParams = field(default_factory=ModelParams)
    vision: VisionParams = field(default_factory=VisionParams)
    reference: ReferenceParams = field(default_factory=ReferenceParams)
    retention: RetentionParams = field(default_factory=RetentionParams)
    # generated dataset name -> overrides of its options (e.g. synthetic: SyntheticConfig)
    prepare: dict[Str, dict] = field(default_factory=dict)
    images: ImagesParams = field(default_factory=ImagesParams)
    pretrained: PretrainedParams = field(default_factory=PretrainedParams)
    embed: EmbedParams = field(default_factory=EmbedParams)
    sample: SampleParams = field(default_factory=SampleParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    report: ReportParams = field(default_factory=ReportParams)

    def __post_init__(self):
        check(self.threads >= 1, "threads", self.threads,
              "use 1 or more (the results depend on it, so it never comes from the machine)")


def read_raw(path: str | Path = "params.yaml") -> dict:
    """params.yaml as plain data (ParamsError when missing or not YAML)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found (run from the project root)")
    text = path.read_text()
    try:
        _refuse_duplicate_keys(yaml.compose(text), path)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def _refuse_duplicate_keys(node, path: Path, key: str = "") -> None:
    """PyYAML keeps the last of two equal keys; DVC refuses the file. Refuse it here, naming
    the dotted key and both lines."""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            dotted = f"{key}.{name}" if key else name
            if name in seen:
                raise ParamsError(f"{dotted}: duplicate key in {path} (lines {seen[name] + 1} and "
                                  f"{k.start_mark.line + 1}); keep one (DVC refuses a file with duplicate keys)")
            seen[name] = k.start_mark.line
            _refuse_duplicate_keys(v, path, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _refuse_duplicate_keys(v, path, f"{key}[{i}]")


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read params.yaml and validate its shape (see the module docstring for what else is
    checked, and where)."""
    raw = read_raw(path)
    if overrides:
        raw = _deep_merge(raw, overrides)
    params = parse(Params, raw, "")
    # the generated trials beside it: read instead of drawn when they are this spec's
    object.__setattr__(params.finetune, "_generated", Path(path).parent / TRIALS_FILE)
    return params


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
