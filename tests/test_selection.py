"""Model selection (the WiSE-FT α) never looks at a test split."""

import pytest

from pipeline.data.datasets import DATASETS
from pipeline.evaluation.selection import check_selection_split, select_alpha


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_selects_on_a_validation_split(name):
    spec = DATASETS[name]
    assert "test" not in spec.select_split
    assert spec.select_split in (*spec.id_splits, *spec.ood_splits)
    check_selection_split(spec.select_split)


@pytest.mark.parametrize("split", ["test", "id_test"])
def test_selection_on_a_test_split_is_refused(split):
    with pytest.raises(ValueError, match="leak"):
        check_selection_split(split)


def test_selected_alpha_follows_validation_not_test():
    per_alpha = {
        0.0: {"id_val/acc_avg": 0.50, "test/acc_avg": 0.90},
        0.5: {"id_val/acc_avg": 0.70, "test/acc_avg": 0.60},
        1.0: {"id_val/acc_avg": 0.65, "test/acc_avg": 0.40},
    }
    assert select_alpha({a: m["id_val/acc_avg"] for a, m in per_alpha.items()}) == 0.5


def test_ties_prefer_the_fine_tuned_end():
    assert select_alpha({0.0: 0.5, 0.5: 0.7, 1.0: 0.7}) == 1.0
