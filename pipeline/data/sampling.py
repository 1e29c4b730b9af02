"""Training samples at every level of data availability, and the few-shot validation set.

For one seed, every sample is a prefix of one seeded order of the train split, so samples are
**nested**: the k = 4 set contains the k = 1 set, the 25 % set contains the 10 % set, whatever
the list of levels.

- k shots: each class's train rows in a seeded random order (`class_orders`); the sample is the
  first k of every class (class-balanced; a class with fewer than k rows gives all it has).
- a fraction f: one seeded random order of all train rows; the sample is its first
  round(f · N) rows (at least one), a uniform draw that keeps the split's label distribution.

The few-shot validation set (selection protocol `fewshot_val`) is drawn from the *other end*
of the same order: the last k rows of each class's order (minus any row the training sample
took), or the last round(f · N) rows of the global order, capped at the rows the training sample
leaves. So it is disjoint from the training sample, seeded with it, the same size (while the
split has room), and nested across levels while a class has at least twice the largest k (and,
for fractions, up to 50 %). At 100 % nothing is left to validate on: `fewshot_val` is refused
there before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.core.levels import Level

FEWSHOT_VAL = "fewshot_val"  # the metrics prefix of the few-shot validation rows


def class_orders(labels: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """For each class, its positions in `labels` in a seeded random order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keys = rng.random(labels.shape[0])
    # sort by (class, random key): one O(n log n) pass for all classes
    order = np.lexsort((keys, labels))
    sorted_labels = labels[order]
    classes, starts = np.unique(sorted_labels, return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(c): order[s:e] for c, s, e in zip(classes, starts, ends)}


def global_order(n: int, seed: int) -> np.ndarray:
    """All n positions in a seeded random order (the fraction levels' order)."""
    return np.random.default_rng([seed, 1]).permutation(n)


def fraction_size(share: float, n: int) -> int:
    """Rows of a fraction level: round(share · n), at least 1 (numpy rounding: half to even)."""
    return int(min(n, max(1, round(share * n))))


def sample_kshot(labels: np.ndarray, rows: np.ndarray, k: int, seed: int,
                 n_classes: int | None = None) -> dict:
    """Class-balanced k-shot index of the training rows `rows` (WILDS indices) with labels
    `labels`, and its few-shot validation set. Classes with fewer than k examples take all
    they have and are listed under `short_classes`; classes with no example at all are listed
    under `empty_classes`."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    rows = np.asarray(rows)
    orders = class_orders(labels, seed)
    chosen, held, counts, short = [], [], {}, []
    for c, order in orders.items():
        take = order[:k]
        chosen.append(rows[take])
        held.append(rows[order[::-1][: min(k, len(order) - len(take))]])
        counts[c] = int(len(take))
        if len(take) < k:
            short.append(c)
    n_classes = n_classes if n_classes is not None else (max(orders) + 1 if orders else 0)
    return _result("shots", k, str(k), seed, chosen, held, counts, short,
                   [c for c in range(n_classes) if c not in orders])


def sample_fraction(labels: np.ndarray, rows: np.ndarray, share: float, seed: int, name: str,
                    n_classes: int | None = None) -> dict:
    """A uniform `share` of the training rows (nested across shares for one seed) and its
    few-shot validation set (the same number of rows from the other end of the order)."""
    if not 0 < share <= 1:
        raise ValueError(f"a fraction lies in (0, 1], got {share}")
    labels, rows = np.asarray(labels), np.asarray(rows)
    order = global_order(len(rows), seed)
    n = fraction_size(share, len(rows))
    take = order[:n]
    held = order[::-1][: min(n, len(rows) - n)]
    n_classes = n_classes if n_classes is not None else (int(labels.max()) + 1 if len(labels) else 0)
    present, counts = np.unique(labels[take], return_counts=True)
    per_class = {int(c): int(m) for c, m in zip(present, counts)}
    in_split = set(np.unique(labels).tolist())
    return _result("fraction", share, name, seed, [rows[take]], [rows[held]], per_class, [],
                   [c for c in range(n_classes) if c not in in_split],
                   missing=[c for c in sorted(in_split) if c not in per_class])


def sample_level(labels: np.ndarray, rows: np.ndarray, level: Level, seed: int,
                 n_classes: int | None = None) -> dict:
    """The training sample (and few-shot validation set) of one level and seed."""
    if level.kind == "shots":
        return sample_kshot(labels, rows, int(level.value), seed, n_classes)
    return sample_fraction(labels, rows, level.value, seed, level.name, n_classes)


def _result(kind: str, value: float, name: str, seed: int, chosen: list, held: list,
            counts: dict, short: list, empty: list, missing: list | None = None) -> dict:
    indices = np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)
    val = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    out = {
        "level": name, "kind": kind, "value": value, "seed": seed,
        "n": int(len(indices)), "indices": [int(i) for i in indices],
        "n_val": int(len(val)), "val_indices": [int(i) for i in val],
        "per_class": {str(c): counts[c] for c in sorted(counts)},
        "short_classes": sorted(short),  # k-shot: classes with fewer than k train rows
        "empty_classes": empty,  # classes with no train row at all
    }
    if kind == "shots":
        out["k"] = int(value)
    if missing is not None:
        out["missing_classes"] = missing  # fraction: classes of the split the draw missed
    return out


def write_sample(sample: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sample, indent=1))
    tmp.replace(path)


def read_sample(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: training sample not found; run `dvc repro sample` first")
    return json.loads(path.read_text())
