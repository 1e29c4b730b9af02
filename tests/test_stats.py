"""The report's intervals over seeds (`pipeline.evaluation.stats.mean_ci`) are scipy's Student-t
confidence intervals of the mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pipeline.evaluation.stats import CONFIDENCE, mean_ci


def _scipy(values, confidence):
    x = np.asarray(values, dtype=float)
    lo, hi = stats.t.interval(confidence, x.size - 1, loc=x.mean(), scale=stats.sem(x))
    return (lo + hi) / 2, (hi - lo) / 2


@pytest.mark.parametrize("values", [
    [0.61, 0.64],
    [0.61, 0.64, 0.58],
    [0.1, 0.5, 0.2, 0.9, 0.3],
    list(np.random.default_rng(0).normal(0.7, 0.05, size=10)),
])
@pytest.mark.parametrize("confidence", [CONFIDENCE, 0.9, 0.99])
def test_mean_ci_equals_scipy(values, confidence):
    mean, half = mean_ci(values, confidence)
    want_mean, want_half = _scipy(values, confidence)
    assert mean == pytest.approx(want_mean, rel=1e-12, abs=1e-15)
    assert half == pytest.approx(want_half, rel=1e-9)
    assert half > 0


def test_default_confidence_is_95_percent():
    assert CONFIDENCE == 0.95
    values = [0.61, 0.64, 0.58]
    assert mean_ci(values) == mean_ci(values, 0.95)
    # three seeds: t_{0.975, 2} = 4.3027, the interval is wide
    assert mean_ci(values)[1] == pytest.approx(4.302652729911275 * np.std(values, ddof=1) / math.sqrt(3))


def test_nan_and_missing_values_are_dropped():
    assert mean_ci([0.61, math.nan, 0.64, None, 0.58]) == pytest.approx(mean_ci([0.61, 0.64, 0.58]))


def test_one_value_has_no_interval_and_none_no_mean():
    mean, half = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)
    mean, half = mean_ci([])
    assert math.isnan(mean) and math.isnan(half)
    mean, half = mean_ci([math.nan, None])
    assert math.isnan(mean) and math.isnan(half)


def test_equal_values_have_a_zero_width_interval():
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)
