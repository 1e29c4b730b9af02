"""Model selection on a validation split (never a test split)."""

from __future__ import annotations


def check_selection_split(split: str) -> None:
    if "test" in split:
        raise ValueError(f"model selection on {split!r} would leak the test set; use a val split")


def alpha_key(alpha: float) -> str:
    return f"wise/{alpha:g}"


def select_alpha(scores: dict[float, float]) -> float:
    """Best α on the validation split; ties go to the larger α (closer to the fine-tuned)."""
    return max(scores, key=lambda a: (scores[a], a))
