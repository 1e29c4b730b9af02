"""Levels of data availability: how much of the train split a run learns from.

Two kinds, written in `sample.levels` of params.yaml:

- an integer k: k examples per class (a class-balanced k-shot sample; `16`);
- a percentage: that share of the train split, drawn uniformly (`25%`, `2.5%`, `100%` = all
  of it).

A level's `name` is the value exactly as DVC writes it into matrix entry names and paths
(`16`, `25%`), so `runs/finetune/<trial>/<name>/seed<S>` is the same string in dvc.yaml and
in the code. Level 0 is the zero-shot model (no training data); the embed stage evaluates it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline.core.validation import ParamsError

__all__ = ["Level", "ZERO_SHOT", "parse_level", "parse_levels"]

_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
ALLOWED = ("a positive integer k (k examples per class, e.g. 16) or a percentage of the train "
           "split in (0%, 100%] (e.g. 25%)")


@dataclass(frozen=True)
class Level:
    """One level: `kind` 'shots' (value = k) or 'fraction' (value = share in (0, 1])."""

    kind: str
    value: float
    name: str

    @property
    def shots(self) -> int | None:
        return int(self.value) if self.kind == "shots" else None

    @property
    def fraction(self) -> float | None:
        return self.value if self.kind == "fraction" else None

    @property
    def label(self) -> str:
        """How tables and plots name it: `k=16`, `25%`, `zero-shot`."""
        if self.kind == "shots":
            return "zero-shot" if self.value == 0 else f"k={int(self.value)}"
        return f"{_percent(self.value)}%"

    @property
    def sort_key(self) -> tuple[int, float]:
        return (0 if self.kind == "shots" else 1, self.value)


ZERO_SHOT = Level("shots", 0, "0")


def _percent(share: float) -> str:
    return f"{100 * share:.6g}"


def parse_level(raw: Any, key: str = "sample.levels") -> Level:
    """A params.yaml level -> Level, or ParamsError naming `key`, the value and what is allowed."""
    if isinstance(raw, bool):
        raise ParamsError(f"{key}: {raw!r} is not allowed; a level is {ALLOWED}")
    if isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit()):
        k = int(raw)
        if k <= 0:
            raise ParamsError(f"{key}: {raw!r} is not allowed; a level is {ALLOWED} (the zero-shot "
                              "level, k = 0, is always evaluated by the embed stage)")
        return Level("shots", k, str(raw))
    if isinstance(raw, str):
        hit = _PERCENT.match(raw)
        if hit:
            share = float(hit.group(1)) / 100
            if 0 < share <= 1:
                return Level("fraction", share, raw)
    hint = ""
    if isinstance(raw, float) and 0 < raw <= 1:
        hint = f" (write a share of the train split as a percentage: {_percent(raw)}%)"
    raise ParamsError(f"{key}: {raw!r} is not allowed; a level is {ALLOWED}{hint}")


def parse_levels(raws: list | tuple, key: str = "sample.levels") -> tuple[Level, ...]:
    """Every level of the list, each once (`25%` and `25.0%` are the same level)."""
    if not raws:
        raise ParamsError(f"{key}: give at least one level ({ALLOWED})")
    levels = tuple(parse_level(r, f"{key}[{i}]") for i, r in enumerate(raws))
    seen: dict[tuple[str, float], str] = {}
    for lv in levels:
        same = seen.get((lv.kind, lv.value))
        if same is not None:
            raise ParamsError(f"{key}: {same!r} and {lv.name!r} are the same level; list each once")
        seen[(lv.kind, lv.value)] = lv.name
    return levels
