import time

import numpy as np
import pytest

from pipeline.data.sampling import sample_kshot


def labels(n_classes=5, per_class=20, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    rng.shuffle(y)
    return y


def test_class_balance():
    y = labels()
    rows = np.arange(len(y)) + 1000
    s = sample_kshot(y, rows, k=4, seed=0)
    assert s["n"] == 20
    chosen = np.array(s["indices"]) - 1000
    assert np.bincount(y[chosen]).tolist() == [4] * 5
    assert s["per_class"] == {str(c): 4 for c in range(5)}
    assert s["short_classes"] == [] and s["empty_classes"] == []


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_nested_across_k(seed):
    y = labels()
    rows = np.arange(len(y))
    sets = [set(sample_kshot(y, rows, k, seed)["indices"]) for k in (1, 2, 4, 8, 16)]
    for small, big in zip(sets, sets[1:]):
        assert small < big


def test_deterministic_and_seed_dependent():
    y = labels()
    rows = np.arange(len(y))
    a = sample_kshot(y, rows, 4, seed=3)
    b = sample_kshot(y, rows, 4, seed=3)
    c = sample_kshot(y, rows, 4, seed=4)
    assert a == b
    assert a["indices"] != c["indices"]


def test_short_and_empty_classes():
    y = np.array([0] * 10 + [1] * 2 + [3] * 5)
    s = sample_kshot(y, np.arange(len(y)), k=4, seed=0, n_classes=5)
    assert s["per_class"] == {"0": 4, "1": 2, "3": 4}
    assert s["short_classes"] == [1]
    assert s["empty_classes"] == [2, 4]
    assert s["n"] == 10


def test_rejects_nonpositive_k():
    with pytest.raises(ValueError):
        sample_kshot(np.array([0, 1]), np.arange(2), k=0, seed=0)


def test_200k_labels_fast():
    y = np.random.default_rng(0).integers(0, 182, size=200_000)
    t = time.perf_counter()
    s = sample_kshot(y, np.arange(len(y)), k=16, seed=0)
    elapsed = time.perf_counter() - t
    assert s["n"] == 182 * 16
    # generous bound: a regression to per-class Python loops over rows would be ~100x slower
    assert elapsed < 5.0
