"""Model selection: which trial (and WiSE-FT α) stands for a method at a level and seed.

A *protocol* (`evaluate.selection`) names the data the choice is made on; it is never a test
split (`check_selection_split` refuses one before any work):

- `id_val`: the dataset's in-distribution validation split (the default where one exists);
- `ood_val`: its out-of-distribution validation split (the WILDS official protocol);
- `fewshot_val`: a validation set drawn from the train split, disjoint from the training
  sample, the same size, seeded and nested like it (`pipeline.data.sampling`): what a
  practitioner with k labelled examples per class really has;
- `none`: no selection: each method's first trial (params.yaml order) at α = 1;
- `auto`: `id_val` where the dataset has one, else `ood_val`.

Selection is two-step, as in the WiSE-FT paper: first the trial, on the fine-tuned model
(α = 1); then, for that trial, the α of the WiSE-FT sweep. Both are the argmax of the
protocol's score (the dataset's official headline metric on the protocol's data). Ties go to
the trial listed first in params.yaml, and to the larger α (closer to the fine-tuned model).

A method whose evaluated model carries post-hoc settings (a `TunedClassifier`: Tip-Adapter's
α and β, Tip-Adapter-F's epoch) has them chosen per trial before the trial is: the finetune
stage searches them on every validation split (`search_posthoc`) and writes each split's
choice (`posthoc/<split>/<name>`) with the score at it; the selection stage carries the
protocol's split's choice into its record, and `none` keeps the method's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.data.sampling import FEWSHOT_VAL

PROTOCOLS = ("id_val", "ood_val", "fewshot_val", "none")


def check_selection_split(split: str) -> None:
    if "test" in split:
        raise ValueError(f"model selection on {split!r} would leak the test set; use a val split")


@dataclass(frozen=True)
class Protocol:
    """A resolved protocol: its name and the metrics prefix it reads (None for `none`)."""

    name: str
    split: str | None

    def key(self, metric: str) -> str | None:
        return None if self.split is None else f"{self.split}/{metric}"


def resolve_protocol(name: str, spec, levels=()) -> Protocol:
    """`evaluate.selection` for this dataset (ParamsError naming the key when impossible)."""
    from pipeline.core.validation import ParamsError

    if name == "auto":
        name = "id_val" if spec.id_val else "ood_val"
    if name == "none":
        return Protocol("none", None)
    if name == FEWSHOT_VAL:
        full = [lv.name for lv in levels if lv.kind == "fraction" and lv.value >= 1.0]
        if full:
            raise ParamsError(
                f"evaluate.selection: 'fewshot_val' holds out part of the train split, but level "
                f"{full[0]} trains on all of it; use id_val or ood_val, or drop {full[0]} from sample.levels")
        return Protocol(FEWSHOT_VAL, FEWSHOT_VAL)
    split = {"id_val": spec.id_val, "ood_val": spec.ood_val}.get(name)
    if split is None:
        allowed = [p for p in PROTOCOLS if p in ("fewshot_val", "none")
                   or (p == "id_val" and spec.id_val) or (p == "ood_val" and spec.ood_val)]
        raise ParamsError(f"evaluate.selection: {name!r} is not allowed for {spec.name} (it has no such "
                          f"split); allowed: auto, {', '.join(allowed)}")
    check_selection_split(split)
    return Protocol(name, split)


def select_trial(scores: dict[str, float], order: list[str]) -> str:
    """The trial with the highest score; ties (and NaN scores) go to the one listed first."""
    if not order:
        raise ValueError("no trial to select from")

    def rank(name: str) -> tuple[float, int]:
        s = scores.get(name, math.nan)
        return (-math.inf if s is None or math.isnan(s) else s, -order.index(name))

    return max(order, key=rank)


def search_posthoc(classifier, score) -> tuple[dict, float]:
    """The post-hoc setting of a `TunedClassifier` with the best `score(classifier.at(**setting))`
    (a validation split's official metric: the caller's `score` reads validation data only),
    searched stage by stage (`classifier.search`), each stage's choice fixed for the next.
    Ties and NaN go to the setting met first in the grid's order (the official Tip-Adapter
    search keeps the first of equal accuracies). Returns (setting, its score)."""
    setting, best = dict(classifier.setting), math.nan
    for stage in range(len(classifier.search)):
        best, chosen = -math.inf, None
        for candidate in classifier.grid(stage):
            s = float(score(classifier.at(**{**setting, **candidate})))
            if chosen is None or s > best:
                best, chosen = (-math.inf if math.isnan(s) else s), candidate
        setting.update(chosen)
    if classifier.search and best == -math.inf:
        best = math.nan
    return setting, best


def posthoc_of(scores: dict[str, float], split: str | None) -> dict[str, float]:
    """The post-hoc setting the finetune stage chose on `split` (its `posthoc/<split>/<name>`
    scores); {} for the `none` protocol (split None: the method's defaults) or a method without."""
    if split is None:
        return {}
    check_selection_split(split)
    prefix = f"posthoc/{split}/"
    return {k[len(prefix):]: v for k, v in scores.items() if k.startswith(prefix)}


def alpha_key(alpha: float) -> str:
    return f"wise/{alpha:g}"


def select_alpha(scores: dict[float, float]) -> float:
    """Best α on the protocol's data; ties go to the larger α (closer to the fine-tuned)."""
    return max(scores, key=lambda a: (scores[a], a))


def edges(chosen: dict, tried: list[dict]) -> list[str]:
    """Hyper-parameters of the chosen trial that sit on the edge of what was tried: for each
    setting that differs between trials, the chosen value is the smallest or largest tried.
    `chosen` and `tried` are the trials' full hyper-parameters (numbers compared as numbers)."""
    out = []
    for key in sorted(chosen):
        values = [t.get(key) for t in tried]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        distinct = sorted(set(values))
        if len(distinct) < 2:
            continue
        v = chosen[key]
        if v == distinct[0]:
            out.append(f"{key}={v:g} is the smallest tried")
        elif v == distinct[-1]:
            out.append(f"{key}={v:g} is the largest tried")
    return out


def space_edges(chosen: str, hparams: dict[str, dict], origin: dict[str, str | None], searches: dict) -> list[str]:
    """The hyper-parameters of the `chosen` trial at the edge of what was searched: for a trial
    drawn by a search (`origin[chosen]`), the edge of that search's *space*
    (`pipeline.core.search.edge`: the first or last of a grid list, the outer 1/(2n) of a
    distribution's range in its scale), not of the values that happened to be drawn; for a
    hand-written trial, the smallest or largest of the method's hand-written trials (`edges`).
    `hparams`: every trial's full hyper-parameters; `searches`: name -> `Search`."""
    from pipeline.core.search import edge, span

    search = origin.get(chosen)
    if search is None:
        hand = [hparams[t] for t, s in origin.items() if s is None and t in hparams]
        return edges(hparams[chosen], hand)
    s = searches[search]
    others = [searches[o] for o in dict.fromkeys(origin.values()) if o is not None and o != search]
    out = []
    for d in s.dims:
        value = hparams[chosen].get(d.key)
        found = edge(d, value, s.n)
        if found is None:
            continue
        side, why = found
        # another search of the method reaches past this edge: the space is wider there
        beyond = [r for o in others if (od := o.dim(d.key)) is not None and (r := span(od)) is not None]
        if any((r[0] < value) if side == "low" else (r[1] > value) for r in beyond):
            continue
        out.append(why)
    return out
