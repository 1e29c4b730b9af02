"""Where every stage reads and writes (one place; dvc.yaml mirrors these paths)."""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")
PREPARED_INFO = PREPARED / "dataset.json"
PREPARED_PROMPTS = PREPARED / "prompts.json"
SPLIT_TABLE = PREPARED / "split_table.csv"
GENERATED_ROOT = PREPARED / "wilds"  # generated datasets (the synthetic one) live here
BUILTIN_REFERENCE = PREPARED / "reference"

PRETRAINED = Path("models/pretrained")
PRETRAINED_WEIGHTS = PRETRAINED / "model.safetensors"
PRETRAINED_INFO = PRETRAINED / "info.json"

EMBED = Path("data/embed")
EMBED_FEATURES = EMBED / "features.safetensors"
EMBED_INFO = EMBED / "info.json"
EMBED_METRICS = EMBED / "metrics.json"

SAMPLES = Path("data/samples")
RUNS = Path("runs")
CHECKPOINTS = Path("checkpoints")
REPORTS = Path("reports")
REPORT_METRICS = Path("metrics/report.json")
REPORT_PLOT_DATA = Path("metrics/shots.csv")


def sample_file(k: int, seed: int) -> Path:
    return SAMPLES / f"k{k}_seed{seed}.json"


def run_name(method: str, k: int, seed: int) -> str:
    return f"{method}/k{k}_seed{seed}"


def finetune_dir(method: str, k: int, seed: int) -> Path:
    return RUNS / "finetune" / run_name(method, k, seed)


def checkpoint_dir(method: str, k: int, seed: int) -> Path:
    return CHECKPOINTS / run_name(method, k, seed)


def evaluate_dir(method: str, k: int, seed: int) -> Path:
    return RUNS / "evaluate" / run_name(method, k, seed)
