"""How one stage reads another's outputs: every artifact path (dvc.yaml mirrors them) and the
small readers of the files stages hand each other. Stages share only files, never code: a
stage imports this module, the library and `pipeline.config`, never another stage."""

from __future__ import annotations

import json
from pathlib import Path

CHECKED = Path("data/check.json")  # the check stage's marker: params.yaml passed
IMAGE_KEY = Path("data/image_key.json")  # written by check: what determines the image cache
# written by check: links to every file params.yaml names outside the project, one folder per
# role (pipeline.core.external), which the stages that read those files depend on
EXTERNAL = Path("data/external")
EXTERNAL_ROLES = ("model", "vision", "reference", "dataset", "retention")
# the external files' SHA-256 by (size, times, inode): beside DVC's own state, never an output
DIGEST_CACHE = Path(".dvc/tmp/external-digests.json")
IMAGES = Path("data/images")  # the image cache (the images stage; pipeline.data.imagecache)
# written by check: what a method's code is (the digests of its module's import closure), so each
# DVC entry depends on the code it runs, not on every method's (pipeline.stages.common.code_records)
TRIAL_RECORDS = Path("data/trials")  # <trial>.json: method, hyper-parameters, code (finetune entries)
METHOD_RECORDS = Path("data/methods")  # <method>.json: backbone, code (evaluate entries)
BACKBONES = Path("data/backbones.json")  # which backbone each compared method starts from (vision)
PREPARED = Path("data/prepared")
PREPARED_INFO = PREPARED / "dataset.json"
PREPARED_MANIFEST = PREPARED / "manifest.json"  # digest of everything prepared: what stages depend on
PREPARED_PROMPTS = PREPARED / "prompts.json"
PREPARED_RETENTION = PREPARED / "retention.json"  # the retention tasks: images, labels, prompts
SPLIT_TABLE = PREPARED / "split_table.csv"
GENERATED_ROOT = PREPARED / "wilds"  # generated datasets (the synthetic one) live here
BUILTIN_REFERENCE = PREPARED / "reference"

PRETRAINED = Path("models/pretrained")
PRETRAINED_WEIGHTS = PRETRAINED / "model.safetensors"
PRETRAINED_INFO = PRETRAINED / "info.json"
VISION = Path("models/vision")  # the vision-only counterpart (the `vision` stage)
VISION_WEIGHTS = VISION / "model.safetensors"  # absent when no vision-only method is compared
VISION_INFO = VISION / "info.json"

EMBED = Path("data/embed")
EMBED_FEATURES = EMBED / "features.safetensors"
EMBED_INFO = EMBED / "info.json"
EMBED_METRICS = EMBED / "metrics.json"

SAMPLES = Path("data/samples")
RUNS = Path("runs")
CHECKPOINTS = Path("checkpoints")
REPORTS = Path("reports")
REPORT_METRICS = Path("metrics/report.json")
REPORT_PLOT_DATA = Path("metrics/levels.csv")
REPORT_METHODS = Path("metrics/methods")  # <method>.json: what `dvc metrics show` prints, a row per method


SELECT = RUNS / "select"


def sample_file(level: str, seed: int) -> Path:
    """The training sample (and few-shot validation set) of a level (its params.yaml name,
    e.g. `16` or `25%`) and seed."""
    return SAMPLES / level / f"seed{seed}.json"


def finetune_dir(trial: str, level: str, seed: int) -> Path:
    return RUNS / "finetune" / trial / level / f"seed{seed}"


def checkpoint_dir(trial: str, level: str, seed: int) -> Path:
    return CHECKPOINTS / trial / level / f"seed{seed}"


LOGS = Path("logs")  # what changes from run to run (wall time, host): never a DVC output


def trial_record(trial: str) -> Path:
    return TRIAL_RECORDS / f"{trial}.json"


def method_record(method: str) -> Path:
    return METHOD_RECORDS / f"{method}.json"


def run_time_file(trial: str, level: str, seed: int) -> Path:
    """When, where and how fast a fine-tuning run trained (written by finetune beside, not in,
    its DVC output, so re-running an unchanged finetune changes no output and re-runs nothing
    downstream). Evaluate logs it to MLflow and the report's time column reads it."""
    return LOGS / "finetune" / trial / level / f"seed{seed}.json"


def select_file(method: str, level: str) -> Path:
    """The selection record of a method at a level: the chosen trial of every seed."""
    return SELECT / method / f"{level}.json"


def mlflow_record(method: str) -> Path:
    """The MLflow runs a method's evaluation went into (run keys per level and seed, and per level
    the method's parent run)."""
    return RUNS / "mlflow" / f"{method}.json"


def evaluate_dir(method: str, level: str, seed: int) -> Path:
    return RUNS / "evaluate" / method / level / f"seed{seed}"


def soup_dirname(kind: str) -> str:
    """The folder of a method's soup (`evaluate.soups`) inside `evaluate_dir`: its metrics.json
    and selection.json (the ingredients, the greedy pass)."""
    return f"{kind}_soup"


def soup_dir(method: str, kind: str, level: str, seed: int) -> Path:
    return evaluate_dir(method, level, seed) / soup_dirname(kind)


# ---- the prepare stage's outputs ------------------------------------------------------------


def dataset_root(generated: bool, root: str | Path) -> Path:
    """Where the WILDS folder of a dataset lives: generated datasets under data/prepared/wilds,
    real ones under `dataset.root`."""
    return GENERATED_ROOT if generated else Path(root)


def reference_csv(csv: str) -> Path:
    """The reference CSV named by `reference.csv`: a registered corpus name (generated by
    prepare into data/prepared/reference) or a path."""
    from pipeline.data.datasets import CORPORA

    return BUILTIN_REFERENCE / "corpus.csv" if csv in CORPORA else Path(csv)


def read_info() -> dict:
    if not PREPARED_INFO.exists():
        raise FileNotFoundError(f"{PREPARED_INFO} not found: run `dvc repro prepare` first")
    return json.loads(PREPARED_INFO.read_text())


# ---- the embed stage's outputs --------------------------------------------------------------


def load_features() -> dict:
    from safetensors.torch import load_file

    if not EMBED_FEATURES.exists():
        raise FileNotFoundError(f"{EMBED_FEATURES} not found: run `dvc repro embed` first")
    return load_file(str(EMBED_FEATURES))


# ---- the finetune stage's outputs (files inside finetune_dir) --------------------------------

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
TRAIN_LOG = "train_log.csv"
SUMMARY = "train_summary.json"  # written last: the run is finished (deterministic: no wall time)


SCORES = "scores.json"  # the fine-tuned model (alpha = 1) on every split a protocol may read


def read_run(trial: str, level: str, seed: int):
    """(trained state, run config, train summary) of a finished fine-tuning run."""
    from pipeline import models

    out = finetune_dir(trial, level, seed)
    if not (out / SUMMARY).exists():
        raise FileNotFoundError(f"{out}: no finished fine-tuning run; run `dvc repro` first")
    state = models.load_state_dict(out / WEIGHTS)
    return state, json.loads((out / CONFIG).read_text()), json.loads((out / SUMMARY).read_text())


def read_json(path: Path, made_by: str) -> dict:
    """A JSON object another stage wrote (FileNotFoundError naming the stage that makes it)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `dvc repro {made_by}` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-run `dvc repro {made_by}`") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object; re-run `dvc repro {made_by}`")
    return data


# ---- the evaluate stage's outputs ------------------------------------------------------------

EVAL_METRICS = "metrics.json"
EVAL_SELECTION = "selection.json"
