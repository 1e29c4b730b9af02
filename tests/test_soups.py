"""Model soups (Wortsman et al. 2022): the uniform soup is the mean of the state dicts; the
greedy soup's order and acceptance on a hand-built table of validation scores, against an
independent implementation written here; the names of soup rows; which methods get soups; and
the `evaluate.soups` check. End to end (a dvc repro with two trials of one method): test_e2e.py."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import pipeline  # noqa: F401  (offline environment setup)
from pipeline.config import SOUPS, EvaluateParams
from pipeline.core.validation import ParamsError
from pipeline.evaluation import soups
from pipeline.models.weights import uniform_soup


# ---- the uniform soup ------------------------------------------------------------------------


def test_uniform_soup_is_the_mean_of_hand_made_state_dicts():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0, -3.0]),
         "step": torch.tensor(7), "h": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([[3.0, 0.0], [1.0, 8.0]]), "b": torch.tensor([6.0, 3.0]),
         "step": torch.tensor(7), "h": torch.tensor([3.0, 5.0], dtype=torch.bfloat16)}
    c = {"w": torch.tensor([[2.0, 1.0], [-1.0, 0.0]]), "b": torch.tensor([3.0, 0.0]),
         "step": torch.tensor(7), "h": torch.tensor([2.0, 1.0], dtype=torch.bfloat16)}
    two = uniform_soup([a, b])
    assert torch.equal(two["w"], torch.tensor([[2.0, 1.0], [2.0, 6.0]]))
    assert torch.equal(two["b"], torch.tensor([3.0, 0.0]))
    assert two["h"].dtype == torch.bfloat16 and torch.equal(two["h"].float(), torch.tensor([2.0, 4.0]))
    assert two["step"].item() == 7 and two["step"].dtype == torch.int64
    three = uniform_soup([a, b, c])
    assert torch.equal(three["w"], torch.tensor([[2.0, 1.0], [1.0, 4.0]]))
    assert torch.equal(three["b"], torch.tensor([3.0, 0.0]))
    # one ingredient: a copy of it, not the same tensors
    one = uniform_soup([a])
    assert torch.equal(one["w"], a["w"]) and one["w"] is not a["w"]


def test_uniform_soup_matches_torch_mean_on_random_states():
    g = torch.Generator().manual_seed(0)
    for n, shape in ((2, (5,)), (3, (4, 7)), (5, (2, 3, 4))):
        states = [{"x": torch.randn(shape, generator=g), "y": torch.randn(3, generator=g)} for _ in range(n)]
        got = uniform_soup(states)
        for k in ("x", "y"):
            want = torch.stack([s[k] for s in states]).mean(0)
            assert torch.allclose(got[k], want, atol=1e-6), (n, k)


def test_uniform_soup_refuses_different_ingredients():
    a = {"w": torch.zeros(2), "n": torch.tensor(1)}
    with pytest.raises(KeyError, match="only in 0 \\['n'\\]"):
        uniform_soup([a, {"w": torch.zeros(2)}])
    with pytest.raises(ValueError, match="w: shape \\(3,\\)"):
        uniform_soup([a, {"w": torch.zeros(3), "n": torch.tensor(1)}])
    with pytest.raises(ValueError, match="n: non-floating"):
        uniform_soup([a, {"w": torch.zeros(2), "n": torch.tensor(2)}])
    with pytest.raises(ValueError, match="at least one"):
        uniform_soup([])


# ---- the greedy soup -------------------------------------------------------------------------


def reference_greedy(individual: dict[str, float], listed: list[str], soup_score) -> list[str]:
    """Wortsman et al.'s Algorithm 1, written here independently: rank by the individual
    score (ties: the order listed; no score last), then keep each next model whose addition
    leaves the soup's score at least where it was."""
    ranked = []
    for name in listed:
        s = individual.get(name)
        ranked.append((s if s is not None and not math.isnan(s) else -1e300, -listed.index(name), name))
    ranked.sort(reverse=True)
    names = [n for *_, n in ranked]
    kept = [names[0]]
    current = soup_score(frozenset(kept))
    for n in names[1:]:
        candidate = soup_score(frozenset(kept + [n]))
        if candidate >= current:
            kept.append(n)
            current = candidate
    return kept


def test_greedy_order_and_acceptance_on_a_hand_built_table():
    individual = {"a": 0.60, "b": 0.70, "c": 0.65, "d": 0.50}
    # the validation score of the soup of each set of trials (hand-made: d helps, c hurts)
    table = {frozenset("b"): 0.70, frozenset("bc"): 0.68, frozenset("ba"): 0.72, frozenset("bad"): 0.72}
    calls = []

    def score(names):
        calls.append(names)
        return table[frozenset(names)]

    assert soups.greedy_order(individual, ["a", "b", "c", "d"]) == ["b", "c", "a", "d"]
    kept, steps = soups.greedy_soup(["b", "c", "a", "d"], score)
    assert kept == ["b", "a", "d"]  # c lowers the soup; d leaves it equal: kept (≥)
    assert [(s["trial"], s["score"], s["accepted"]) for s in steps] == [
        ("b", 0.70, True), ("c", 0.68, False), ("a", 0.72, True), ("d", 0.72, True)]
    # each candidate soup is the current soup plus the next trial, and nothing else is scored
    assert calls == [("b",), ("b", "c"), ("b", "a"), ("b", "a", "d")]
    assert kept == reference_greedy(individual, ["a", "b", "c", "d"], lambda s: table[s])


def test_greedy_ties_and_missing_scores():
    # ties keep the listed order; a trial without a score goes last
    assert soups.greedy_order({"x": 0.5, "y": 0.5, "z": math.nan, "w": 0.9}, ["x", "y", "z", "w"]) == ["w", "x", "y", "z"]
    assert soups.greedy_order({"x": 0.5, "y": 0.5}, ["y", "x"]) == ["y", "x"]
    assert soups.greedy_order({"x": None, "y": 0.1}, ["x", "y"]) == ["y", "x"]
    # a candidate soup whose score is NaN is not taken
    kept, _ = soups.greedy_soup(["p", "q"], lambda n: math.nan if len(n) == 2 else 0.3)
    assert kept == ["p"]
    with pytest.raises(ValueError):
        soups.greedy_soup([], lambda n: 0.0)


def test_greedy_soup_equals_the_reference_on_random_tables():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        names = [f"t{i}" for i in range(n)]
        # coarse scores so that ties (in the order and in the acceptance) happen often
        individual = {t: rng.choice([0.1, 0.2, 0.3, math.nan]) for t in names}
        table = {frozenset(c): rng.choice([0.1, 0.2, 0.3]) for r in range(1, n + 1)
                 for c in itertools.combinations(names, r)}
        order = soups.greedy_order(individual, names)
        # the order's first score is the individual's: the table agrees for singletons
        for t in names:
            table[frozenset([t])] = individual[t] if not math.isnan(individual[t]) else 0.0
        got, steps = soups.greedy_soup(order, lambda s: table[frozenset(s)])
        assert got == reference_greedy(individual, names, lambda s: table[s]), (individual, table)
        assert [s["trial"] for s in steps] == order and sum(s["accepted"] for s in steps) == len(got)


# ---- rows, methods, params -------------------------------------------------------------------


def test_row_names_round_trip():
    assert soups.row_name("ft", "greedy") == "ft+greedy_soup"
    assert soups.parse_row("vision_ft+uniform_soup") == ("vision_ft", "uniform")
    assert soups.parse_row("ft") is None and soups.parse_row("ft+other_soup") is None
    assert soups.base_method("flyp+greedy_soup") == "flyp" and soups.base_method("flyp") == "flyp"
    with pytest.raises(ValueError, match="allowed: uniform, greedy"):
        soups.row_name("ft", "mean")
    assert SOUPS == soups.KINDS  # config's list (config imports only core) is the library's


def test_which_methods_get_soups():
    from pipeline.methods import METHODS

    assert soups.soup_kinds(True, 2, ("uniform", "greedy")) == ["uniform", "greedy"]
    assert soups.soup_kinds(True, 1, ("uniform",)) == []  # a soup of one trial is that trial
    assert soups.soup_kinds(False, 4, ("uniform",)) == []
    # the methods declare it: full weights in one space yes; LoRA's factors, a new adapter no
    assert METHODS["ft"].soups and METHODS["flyp"].soups and METHODS["dive"].soups and METHODS["lp"].soups
    assert not METHODS["lora"].soups and not METHODS["clip_lora"].soups and not METHODS["zeroshot"].soups
    for name in METHODS:  # every method declares a family the report groups it by
        assert METHODS[name].family != "other", name


def test_evaluate_soups_is_checked():
    assert EvaluateParams().soups == ()
    assert EvaluateParams(soups=("greedy", "uniform")).soups == ("greedy", "uniform")
    with pytest.raises(ParamsError, match="evaluate.soups.*allowed: a list of uniform, greedy"):
        EvaluateParams(soups=("mean",))
    with pytest.raises(ParamsError, match="evaluate.soups.*once"):
        EvaluateParams(soups=("uniform", "uniform"))
    with pytest.raises(ParamsError, match="evaluate.soups.*evaluate.selection: none"):
        EvaluateParams(soups=("greedy",), selection="none")
    assert EvaluateParams(soups=("uniform",), selection="none").soups == ("uniform",)
