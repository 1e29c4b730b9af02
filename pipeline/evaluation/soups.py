"""Model soups (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", ICML 2022): after the search, the trials a
method already trained at a level and seed are averaged in weight space, a selection step like
WiSE-FT's α, not a new training (`evaluate.soups`).

- **uniform**: the mean of every trial's weights (`pipeline.models.weights.uniform_soup`).
- **greedy**: the trials sorted by their validation score (the protocol's, `evaluate.selection`,
  of each fine-tuned trial: the score the trial selection reads), best first; the soup starts
  with the best and takes each next trial if the soup with it scores at least as well on the
  protocol's validation data as the soup without it (`greedy_soup`).

A soup is a row of its own in the report and MLflow, `<method>+uniform_soup` /
`<method>+greedy_soup`, evaluated like a chosen trial (the test splits, the registered
measures, the WiSE-FT sweep with α chosen by the same protocol). It exists for a method that
declares its trials soupable (`Method.soups`) and has two trials or more (a soup of one trial is
that trial).

Choices (OPEN in the paper and the reference, checked against mlfoundations/model-soups):
- acceptance `>=`: the paper's Algorithm 1 ("if ValAcc(average(ingredients ∪ {θ})) ≥
  ValAcc(average(ingredients))") and the reference ("added if the soup's score does not
  fall"); the authors' main.py accepts only a strict increase (`>`). With ties the soup here is
  the larger one.
- the order's scores are the trials' own validation scores from finetune (`scores.json`, the
  ones the trial selection reads), as main.py sorts by the individual models' held-out accuracy;
  ties keep params.yaml's trial order (main.py's reversed stable sort puts the last listed
  first); a trial without a score (NaN) comes last.
- the soup's scores during the greedy pass are measured by the evaluate stage on the same data
  (the first ingredient re-measured there, not copied from finetune), at α = 1.
- never a test split: the protocol's split only; with `evaluate.selection: none` there is no
  validation score and a greedy soup is refused (`check`); a uniform soup needs none.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

KINDS = ("uniform", "greedy")
SEP = "+"  # method names are identifiers: a row name with "+" is never a method's
SUFFIX = "_soup"


def row_name(method: str, kind: str) -> str:
    """The report's and MLflow's name of a method's soup: `ft+greedy_soup`."""
    if kind not in KINDS:
        raise ValueError(f"unknown soup {kind!r}; allowed: {', '.join(KINDS)}")
    return f"{method}{SEP}{kind}{SUFFIX}"


def parse_row(name: str) -> tuple[str, str] | None:
    """(method, kind) of a soup row's name; None for a method's own row."""
    method, sep, rest = name.rpartition(SEP)
    if not sep or not rest.endswith(SUFFIX) or rest[: -len(SUFFIX)] not in KINDS:
        return None
    return method, rest[: -len(SUFFIX)]


def base_method(name: str) -> str:
    """The method a row belongs to (itself for a method's own row)."""
    parsed = parse_row(name)
    return parsed[0] if parsed else name


def soup_kinds(soupable: bool, n_trials: int, kinds: Sequence[str]) -> list[str]:
    """The soups a method gets: `kinds` (evaluate.soups) where it declares soups and has two
    trials or more, else none."""
    return list(kinds) if soupable and n_trials >= 2 else []


def greedy_order(scores: dict[str, float | None], trials: Sequence[str]) -> list[str]:
    """The trials by validation score, best first; ties keep `trials`' order; no score last."""

    def key(i_t: tuple[int, str]) -> tuple[float, int]:
        s = scores.get(i_t[1])
        s = -math.inf if s is None or math.isnan(s) else s
        return (-s, i_t[0])

    return [t for _, t in sorted(enumerate(trials), key=key)]


def greedy_soup(order: Sequence[str], score: Callable[[tuple[str, ...]], float]
                ) -> tuple[list[str], list[dict]]:
    """Greedy soup over `order` (best first): `score(ingredients)` is the validation score of
    the uniform soup of those trials. Returns (ingredients, steps): every trial considered, its
    candidate soup's score and whether it was taken."""
    if not order:
        raise ValueError("a greedy soup needs at least one trial")
    soup = [order[0]]
    best = float(score(tuple(soup)))
    steps = [{"trial": order[0], "score": best, "accepted": True}]
    for trial in order[1:]:
        s = float(score((*soup, trial)))
        taken = not math.isnan(s) and (math.isnan(best) or s >= best)
        steps.append({"trial": trial, "score": s, "accepted": taken})
        if taken:
            soup.append(trial)
            best = s
    return soup, steps
