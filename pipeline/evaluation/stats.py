"""Intervals over seeds: the mean and its Student-t 95 % confidence interval."""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95


def mean_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval of the mean of `values` (NaNs dropped):
    t_{(1+c)/2, n-1} · s / √n with the sample std s (ddof 1). One value has no interval
    (half-width NaN); none gives (NaN, NaN)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(float(v))], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, float(stats.t.ppf((1 + confidence) / 2, x.size - 1)) * sem
