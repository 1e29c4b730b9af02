"""params.yaml -> frozen, validated config objects.

Every section is a frozen dataclass. Unknown keys, wrong types and impossible values are
rejected before any work, with a sentence that names the dotted key, the value and what is
allowed. The method registry and the dataset table are the only lists of names: validation
reads them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ParamsError(ValueError):
    """A params.yaml value is wrong; the message names the key."""


# ---------------------------------------------------------------------------------------------
# generic strict dataclass loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ParamsError as err:
                errors.append(err)
        raise ParamsError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{key}: {value!r} is not null")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: {value!r} is not a list (expected {_type_name(tp)})")
        (arg, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: {value!r} is not a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(f"{key}: {value!r} is not true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{key}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string: accept numeric strings.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ParamsError(f"{key}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"{key}: {value!r} is not a string")
    if isinstance(value, tp):
        return value
    raise ParamsError(f"{key}: {value!r} is not a {_type_name(tp)}")


def from_dict(cls: type, data: Any, prefix: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a sentence."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{prefix}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(
            f"{where}{unknown[0]}: unknown key. Allowed keys{' in ' + prefix if prefix else ''}: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ParamsError:
        raise
    except ValueError as err:
        # a sub-config's own check ("lr: -1 must be positive"): prefix the section
        msg = str(err)
        head = msg.split(":", 1)[0].strip()
        raise ParamsError(f"{prefix}.{msg}" if head in fields else f"{prefix}: {msg}") from err
    except TypeError as err:
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and n not in data]
        if missing:
            raise ParamsError(f"{prefix}.{missing[0]}: required key is missing") from err
        raise ParamsError(f"{prefix}: {err}") from err


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ParamsError(f"{key}: {value!r} is not allowed; {allowed}")


# ---------------------------------------------------------------------------------------------
# the sections of params.yaml


@dataclass(frozen=True)
class DatasetParams:
    name: str = "synthetic"
    root: str = "data/wilds"  # where real WILDS data lives (the synthetic data is generated)
    download: bool = False


@dataclass(frozen=True)
class ModelParams:
    arch: str = "tiny-clip"
    pretrained: str = "builtin"  # 'builtin' | open_clip tag | path to a weights file


@dataclass(frozen=True)
class ReferenceParams:
    """Image-caption pairs: DiVE's reference data, RSA's probe set, the builtin corpus."""

    csv: str = "builtin"  # 'builtin' (the synthetic caption corpus) or a filepath,title CSV
    separator: str = ","
    max_samples: int = 2000  # embedded once by `embed`; DiVE and RSA draw from these

    def __post_init__(self):
        check(self.max_samples >= 2, "reference.max_samples", self.max_samples, "use 2 or more")
        check(len(self.separator) == 1, "reference.separator", self.separator, "use one character")


@dataclass(frozen=True)
class PrepareParams:
    synthetic: dict = field(default_factory=dict)  # SyntheticConfig overrides


@dataclass(frozen=True)
class PretrainedParams:
    builtin: dict = field(default_factory=dict)  # PretrainConfig overrides
    device: str = "auto"


@dataclass(frozen=True)
class EmbedParams:
    batch_size: int = 256
    iimm_samples: int = 2000  # train images used for IIMM / silhouette (seeded subsample)
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self):
        check(self.batch_size > 0, "embed.batch_size", self.batch_size, "use a positive integer")
        check(self.iimm_samples >= 2, "embed.iimm_samples", self.iimm_samples, "use 2 or more")
        check(self.num_workers >= 0, "embed.num_workers", self.num_workers, "use 0 or more")


@dataclass(frozen=True)
class SampleParams:
    shots: tuple[int, ...] = (1, 4, 16)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        check(len(self.shots) > 0, "sample.shots", list(self.shots), "give at least one shot count")
        for k in self.shots:
            check(k > 0, "sample.shots", k, "shot counts are positive integers (k = 0 is the "
                  "zero-shot level, evaluated by the embed stage)")
        dup = sorted({k for k in self.shots if self.shots.count(k) > 1})
        check(not dup, "sample.shots", list(self.shots), f"each shot count once (repeated: {dup})")
        check(len(self.seeds) > 0, "sample.seeds", list(self.seeds), "give at least one seed")
        dup = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        check(not dup, "sample.seeds", list(self.seeds), f"each seed once (repeated: {dup})")
        for s in self.seeds:
            check(s >= 0, "sample.seeds", s, "seeds are non-negative integers")


@dataclass(frozen=True)
class TrainParams:
    """Shared by every method; the per-method sections hold lr, weight decay and the rest."""

    steps: int = 100
    batch_size: int = 32  # global batch (summed over DDP processes)
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables
    checkpoint_every: int = 50
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    num_workers: int = 0
    nproc_per_node: int = 1  # >1 launches torchrun (DDP)
    # activation memory (MiB) for the class prompts the prompt-CE methods encode with
    # gradient every step: they go through the text tower in chunks that fit it, recomputed
    # in the backward pass (pipeline.zeroshot); the result does not depend on it
    prompt_memory_mb: int = 1024

    def __post_init__(self):
        check(self.steps > 0, "finetune.train.steps", self.steps, "use a positive integer")
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


@dataclass(frozen=True)
class FinetuneParams:
    methods: tuple[str, ...] = ("lp", "ft", "flyp", "dive")
    train: TrainParams = field(default_factory=TrainParams)
    # per-method hyper-parameters: method name -> overrides of its Hparams dataclass
    hparams: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateParams:
    wise_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    zs_tasks: tuple[str, ...] | str = "auto"  # 'auto' = the dataset's retention tasks
    rsa_samples: int = 500
    batch_size: int = 256
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self):
        for a in self.wise_alphas:
            check(0.0 <= a <= 1.0, "evaluate.wise_alphas", a, "alphas lie in [0, 1]")
        check(1.0 in self.wise_alphas, "evaluate.wise_alphas", list(self.wise_alphas),
              "include 1.0 (the fine-tuned model itself)")
        check(self.rsa_samples >= 3, "evaluate.rsa_samples", self.rsa_samples, "use 3 or more")
        check(self.batch_size > 0, "evaluate.batch_size", self.batch_size, "use a positive integer")


@dataclass(frozen=True)
class ReportParams:
    pass


@dataclass(frozen=True)
class Params:
    seed: int = 0
    dataset: DatasetParams = field(default_factory=DatasetParams)
    model: ModelParams = field(default_factory=ModelParams)
    reference: ReferenceParams = field(default_factory=ReferenceParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    pretrained: PretrainedParams = field(default_factory=PretrainedParams)
    embed: EmbedParams = field(default_factory=EmbedParams)
    sample: SampleParams = field(default_factory=SampleParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    report: ReportParams = field(default_factory=ReportParams)

    # typed views of the free-form sections, validated in `validate`
    def synthetic_config(self):
        from pipeline.data.synthetic import SyntheticConfig

        return from_dict(SyntheticConfig, self.prepare.synthetic, "prepare.synthetic")

    def pretrain_config(self):
        from pipeline.pretrain import PretrainConfig

        return from_dict(PretrainConfig, self.pretrained.builtin, "pretrained.builtin")

    def method_hparams(self, method: str):
        from pipeline.methods import get_method

        cls = get_method(method)
        return from_dict(cls.Hparams, self.finetune.hparams.get(method, {}), f"finetune.hparams.{method}")


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read and fully validate params.yaml (every name checked against its registry)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from err
    if overrides:
        raw = _deep_merge(raw, overrides)
    params = from_dict(Params, raw, "")
    validate(params)
    return params


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(params: Params) -> None:
    """Cross-section checks against the registries (dataset table, methods, archs)."""
    from pipeline.data.datasets import DATASETS
    from pipeline.methods import METHODS

    check(params.seed >= 0, "seed", params.seed, "use a non-negative integer")
    check(params.dataset.name in DATASETS, "dataset.name", params.dataset.name,
          f"allowed: {', '.join(sorted(DATASETS))}")
    check(len(params.finetune.methods) > 0, "finetune.methods", [], "list at least one method")
    for m in params.finetune.methods:
        check(m in METHODS, "finetune.methods", m, f"allowed: {', '.join(sorted(METHODS))}")
    dup = sorted({m for m in params.finetune.methods if params.finetune.methods.count(m) > 1})
    check(not dup, "finetune.methods", list(params.finetune.methods), f"each method once (repeated: {dup})")
    for m in params.finetune.hparams:
        check(m in METHODS, f"finetune.hparams.{m}", m,
              f"sections are named after methods: {', '.join(sorted(METHODS))}")
        params.method_hparams(m)
    for m in params.finetune.methods:
        params.method_hparams(m)
    if params.dataset.name == "synthetic" or params.reference.csv == "builtin":
        params.synthetic_config()
    if params.model.pretrained == "builtin":
        params.pretrain_config()
    if isinstance(params.evaluate.zs_tasks, str):
        check(params.evaluate.zs_tasks == "auto", "evaluate.zs_tasks", params.evaluate.zs_tasks,
              "use 'auto' or a list of tasks named '<dataset>/<label>' (e.g. synthetic/colour)")
    else:
        from pipeline.data.datasets import DATASETS as D
        for t in params.evaluate.zs_tasks:
            ds = t.split("/")[0]
            check("/" in t and ds in D, "evaluate.zs_tasks", t,
                  f"tasks are '<dataset>/<label>' with dataset one of {', '.join(sorted(D))}")
