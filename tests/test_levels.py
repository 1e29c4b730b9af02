"""Levels of data availability as written in params.yaml (`sample.levels`)."""

import pytest

from pipeline.core.levels import ZERO_SHOT, parse_level, parse_levels
from pipeline.core.validation import ParamsError


def test_an_integer_is_k_shots_and_keeps_dvc_s_spelling():
    lv = parse_level(16)
    assert (lv.kind, lv.shots, lv.fraction, lv.name, lv.label) == ("shots", 16, None, "16", "k=16")
    assert parse_level("16") == lv  # the same string DVC renders in `${item.level}`


@pytest.mark.parametrize("raw, share, label", [("25%", 0.25, "25%"), ("2.5%", 0.025, "2.5%"),
                                               ("100%", 1.0, "100%"), ("3%", 0.03, "3%")])
def test_a_percentage_is_a_share_of_the_train_split(raw, share, label):
    lv = parse_level(raw)
    assert lv.kind == "fraction" and lv.fraction == pytest.approx(share)
    assert lv.name == raw and lv.label == label


@pytest.mark.parametrize("raw, hint", [(0, "zero-shot"), (-3, "positive integer"), ("0%", "percentage"),
                                       ("150%", "percentage"), (0.25, "25%"), (True, "positive"),
                                       ("25 %", "percentage"), ("k16", "positive integer"), (None, "level")])
def test_bad_levels_name_the_key_and_what_is_allowed(raw, hint):
    with pytest.raises(ParamsError, match=r"sample\.levels\[0\]") as err:
        parse_levels([raw])
    assert hint in str(err.value)


def test_each_level_once_and_at_least_one():
    with pytest.raises(ParamsError, match="same level"):
        parse_levels([4, "25%", "25.0%"])
    with pytest.raises(ParamsError, match="same level"):
        parse_levels([4, "4"])
    with pytest.raises(ParamsError, match="at least one"):
        parse_levels([])


def test_zero_shot_level():
    assert ZERO_SHOT.label == "zero-shot" and ZERO_SHOT.shots == 0
