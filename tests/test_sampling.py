import numpy as np
import pytest

from pipeline.core.levels import parse_level
from pipeline.data.sampling import fraction_size, sample_fraction, sample_kshot, sample_level


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


def test_200k_labels():
    y = np.random.default_rng(0).integers(0, 182, size=200_000)
    s = sample_kshot(y, np.arange(len(y)), k=16, seed=0)
    assert s["n"] == 182 * 16 and s["n_val"] == 182 * 16
    assert not set(s["indices"]) & set(s["val_indices"])


# ---- the few-shot validation set (selection protocol fewshot_val) ---------------------------


@pytest.mark.parametrize("seed", [0, 3])
def test_fewshot_val_is_disjoint_balanced_nested_and_seeded(seed):
    y = labels(per_class=40)
    rows = np.arange(len(y)) + 500
    samples = [sample_kshot(y, rows, k, seed) for k in (1, 4, 16)]
    vals = [set(s["val_indices"]) for s in samples]
    for s, val in zip(samples, vals):
        assert not val & set(s["indices"])  # never a training row
        assert s["n_val"] == s["n"]  # the same k per class
        assert np.bincount(y[np.array(sorted(val)) - 500]).tolist() == [s["k"]] * 5
    for small, big in zip(vals, vals[1:]):
        assert small < big  # nested like the training samples
    assert sample_kshot(y, rows, 4, seed)["val_indices"] == samples[1]["val_indices"]
    assert sample_kshot(y, rows, 4, seed + 1)["val_indices"] != samples[1]["val_indices"]


def test_fewshot_val_of_a_small_class_takes_what_training_leaves():
    y = np.array([0] * 6 + [1] * 3)
    s = sample_kshot(y, np.arange(len(y)), k=4, seed=0)
    val = np.array(s["val_indices"])
    assert np.bincount(y[val], minlength=2).tolist() == [2, 0]  # 6 - 4 = 2 left; class 1 has none
    assert not set(val) & set(s["indices"])


# ---- fractions of the train split -----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 5])
def test_fractions_are_nested_seeded_and_sized(seed):
    y = labels(per_class=40)  # 200 rows
    rows = np.arange(len(y)) * 2
    shares = (0.03, 0.1, 0.25, 0.5, 1.0)
    sets = [set(sample_fraction(y, rows, f, seed, f"{f:%}")["indices"]) for f in shares]
    assert [len(s) for s in sets] == [6, 20, 50, 100, 200]
    for small, big in zip(sets, sets[1:]):
        assert small < big
    assert sets[-1] == set(rows.tolist())  # 100 % is the whole split
    again = sample_fraction(y, rows, 0.25, seed, "25%")
    assert set(again["indices"]) == sets[2]
    assert set(sample_fraction(y, rows, 0.25, seed + 1, "25%")["indices"]) != sets[2]


def test_fraction_val_is_disjoint_and_empty_at_100_percent():
    y = labels(per_class=40)
    rows = np.arange(len(y))
    s = sample_fraction(y, rows, 0.1, 0, "10%")
    assert s["n_val"] == s["n"] == 20 and not set(s["val_indices"]) & set(s["indices"])
    s60 = sample_fraction(y, rows, 0.6, 0, "60%")
    assert s60["n_val"] == 80 and not set(s60["val_indices"]) & set(s60["indices"])  # the rest
    assert sample_fraction(y, rows, 1.0, 0, "100%")["n_val"] == 0


def test_fraction_size_rounds_and_keeps_one_row():
    assert fraction_size(0.03, 200) == 6
    assert fraction_size(0.001, 200) == 1
    assert fraction_size(1.0, 7) == 7


def test_sample_level_dispatches_on_the_kind():
    y = labels(per_class=40)
    rows = np.arange(len(y))
    assert sample_level(y, rows, parse_level(4), 0) == sample_kshot(y, rows, 4, 0)
    s = sample_level(y, rows, parse_level("25%"), 0)
    assert s["kind"] == "fraction" and s["level"] == "25%" and s["n"] == 50
