"""Class-balanced, nested k-shot sampling of the training split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def class_orders(labels: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """For each class, its training rows in a seeded random order.

    The k-shot set is the first k rows of every class's order, so for one seed the k = 4 set
    contains the k = 2 set (nesting), whatever the shot list.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keys = rng.random(labels.shape[0])
    # sort by (class, random key): one O(n log n) pass for all classes
    order = np.lexsort((keys, labels))
    sorted_labels = labels[order]
    classes, starts = np.unique(sorted_labels, return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(c): order[s:e] for c, s, e in zip(classes, starts, ends)}


def sample_kshot(labels: np.ndarray, rows: np.ndarray, k: int, seed: int,
                 n_classes: int | None = None) -> dict:
    """Class-balanced k-shot index of the training rows `rows` (WILDS indices) with labels
    `labels`. Classes with fewer than k examples take all they have and are listed under
    `short_classes`; classes with no example at all are listed under `empty_classes`."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    rows = np.asarray(rows)
    orders = class_orders(labels, seed)
    chosen, counts, short = [], {}, []
    for c, order in orders.items():
        take = order[:k]
        chosen.append(rows[take])
        counts[c] = int(len(take))
        if len(take) < k:
            short.append(c)
    indices = np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)
    n_classes = n_classes if n_classes is not None else (max(orders) + 1 if orders else 0)
    empty = [c for c in range(n_classes) if c not in orders]
    return {
        "k": k,
        "seed": seed,
        "n": int(len(indices)),
        "indices": [int(i) for i in indices],
        "per_class": {str(c): counts[c] for c in sorted(counts)},
        "short_classes": sorted(short),
        "empty_classes": empty,
    }


def write_sample(sample: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sample, indent=1))
    tmp.replace(path)


def read_sample(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: k-shot sample not found; run `dvc repro sample` first")
    return json.loads(path.read_text())
