"""Search spaces (`finetune.search` of params.yaml) -> named trials, seeded and prefix-stable.

A search is a method and a `space` over its hyper-parameters. Each entry of the space is either

- a YAML list: a grid axis (every value is tried), or
- a one-key mapping, a distribution: `{loguniform: [lo, hi]}` (log-uniform on [lo, hi], lo > 0),
  `{uniform: [lo, hi]}`, `{int: [lo, hi]}` (an integer in lo..hi, both included),
  `{choice: [a, b, ...]}` (one of the options, equally likely).

The distributions are drawn together, `n` times, by the search's `sampler`:

- `random`: draw i of hyper-parameter `key` is a uniform number from its own generator, seeded
  with SHA-256(search seed, search name, i, key): independent of `n` and of the other keys;
- `sobol`: the first `n` points of one scrambled Sobol sequence (`scipy.stats.qmc.Sobol`, seeded
  with SHA-256(search seed, search name)), one dimension per distribution in the space's order.
  The sequence does not depend on `n`; its balance is best when `n` is a power of 2.

Either way raising `n` from 8 to 16 keeps the first 8 draws (values and names) and adds 8. The
uniform number u of a draw becomes a value in the distribution's scale: lo + u (hi - lo), log
scale for loguniform, floor(lo + u (hi - lo + 1)) for int, option floor(u · count) for choice.
Drawn floats keep 3 significant digits (readable in names and tables; clipped to [lo, hi]).

Grid × distributions: every grid point (the product of the lists, the first list varying
slowest) is crossed with the same `n` draws, |grid| · n trials. A space of lists only is a grid
and takes no `n`.

Trial names are `<search>-<i>-<summary>` (i = the draw, from 0) or `<search>-<summary>` for a
pure grid; the summary is every searched value as `<key><value>`, values in 2 significant
digits without a dot (DVC reads a dot in a params key as nesting): 2.1e-3 is written `21e-4`,
37.2 `37`, 0.25 `25e-2`. The name is only a label: the trial's values are in the generated
trials file and its records.

"At the edge of the space" (the report's "widen the search"): a grid value that is the smallest
or largest of its list, a numeric choice that is the smallest or largest option, a drawn value
in the outer 1/(2n) of its range in its scale (log for loguniform): closer to a bound than half
the spacing of n evenly spread draws. An edge another search of the same method reaches past
(a second search added to widen the first, whose draws then stay) is not an edge.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from pipeline.core.validation import ParamsError

__all__ = ["SAMPLERS", "DISTRIBUTIONS", "Dimension", "Search", "parse_search", "expand", "edge", "span", "value_label"]

SAMPLERS = ("random", "sobol")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
SEARCH_KEYS = ("method", "space", "n", "sampler", "seed")
DEFAULT_SAMPLER = "random"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_DIGITS = 3  # significant digits a drawn float keeps


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Dimension:
    """One hyper-parameter of a space: a grid list (`kind` 'grid', `values`) or a distribution
    (`kind` one of DISTRIBUTIONS; `values` = (lo, hi), or the options of a choice)."""

    key: str
    kind: str
    values: tuple

    @property
    def drawn(self) -> bool:
        return self.kind != "grid"

    def value(self, u: float) -> Any:
        """The value at uniform number u in [0, 1) (see the module docstring)."""
        if self.kind == "choice":
            return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
        lo, hi = self.values
        if self.kind == "int":
            return min(int(math.floor(lo + u * (hi - lo + 1))), hi)
        if self.kind == "loguniform":
            v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        else:
            v = lo + u * (hi - lo)
        return min(max(float(f"{v:.{_DIGITS}g}"), float(lo)), float(hi))

    def describe(self) -> str:
        """The dimension as params.yaml writes it, short: `lr ~ loguniform[1e-05, 0.001]`."""
        if self.kind == "grid":
            return f"{self.key} ∈ [{', '.join(_short(v) for v in self.values)}]"
        if self.kind == "choice":
            return f"{self.key} ~ choice[{', '.join(_short(v) for v in self.values)}]"
        return f"{self.key} ~ {self.kind}[{_short(self.values[0])}, {_short(self.values[1])}]"


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Search:
    """A parsed search: its name, method, dimensions (space order), draws, sampler and seed."""

    name: str
    method: str
    dims: tuple[Dimension, ...]
    n: int  # draws of the distributions (1 for a pure grid)
    sampler: str
    seed: int

    @property
    def grid(self) -> tuple[Dimension, ...]:
        return tuple(d for d in self.dims if not d.drawn)

    @property
    def drawn(self) -> tuple[Dimension, ...]:
        return tuple(d for d in self.dims if d.drawn)

    def dim(self, key: str) -> Dimension | None:
        return next((d for d in self.dims if d.key == key), None)

    def describe(self) -> dict:
        """JSON-able summary (selection records, the report)."""
        return {"method": self.method, "sampler": self.sampler if self.drawn else "grid", "n": self.n,
                "seed": self.seed, "space": {d.key: {"kind": d.kind, "values": list(d.values)} for d in self.dims},
                "text": "; ".join(d.describe() for d in self.dims)}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ParamsError(f"{key}: {value!r} is not allowed; {allowed}")


def _parse_dim(key: str, hp: str, raw: Any) -> Dimension:
    forms = ("a list (a grid: every value is tried) or one of {loguniform: [lo, hi]}, {uniform: [lo, hi]}, "
             "{int: [lo, hi]}, {choice: [a, b, ...]}")
    if isinstance(raw, list):
        if not raw:
            _fail(key, raw, "a grid lists at least one value")
        raw = [_number(v) for v in raw]
        dup = [v for i, v in enumerate(raw) if v in raw[:i]]
        if dup:
            _fail(key, raw, f"each grid value once (repeated: {dup[0]!r})")
        return Dimension(hp, "grid", tuple(raw))
    if not isinstance(raw, dict) or len(raw) != 1:
        _fail(key, raw, f"use {forms}")
    (kind, arg), = raw.items()
    if kind not in DISTRIBUTIONS:
        raise ParamsError(f"{key}.{kind}: unknown distribution; allowed: {', '.join(DISTRIBUTIONS)} "
                          "(or a list, a grid)")
    if kind == "choice":
        if not isinstance(arg, list) or len(arg) < 2:
            _fail(f"{key}.choice", arg, "give a list of at least two options")
        arg = [_number(v) for v in arg]
        dup = [v for i, v in enumerate(arg) if v in arg[:i]]
        if dup:
            _fail(f"{key}.choice", arg, f"each option once (repeated: {dup[0]!r})")
        return Dimension(hp, kind, tuple(arg))
    if not (isinstance(arg, list) and len(arg) == 2):
        _fail(f"{key}.{kind}", arg, "give the bounds as a list [lo, hi]")
    lo, hi = (_number(v) for v in arg)
    if kind == "int":
        if not all(isinstance(v, int) for v in (lo, hi)):
            _fail(f"{key}.int", arg, "the bounds of an int distribution are integers, e.g. [0, 10]")
    elif not all(_is_number(v) for v in (lo, hi)):
        _fail(f"{key}.{kind}", arg, "the bounds are numbers, e.g. [1.0e-5, 1.0e-3]")
    if not lo < hi:
        _fail(f"{key}.{kind}", arg, "lo < hi (a single value is a one-value list, e.g. [1.0e-4])")
    if kind == "loguniform" and lo <= 0:
        _fail(f"{key}.loguniform", arg, "the bounds of a log-uniform distribution are positive")
    return Dimension(hp, kind, (lo, hi))


def _number(v: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `1e-4` as a string: accept numeric strings, as `Float` does."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def parse_search(name: str, raw: Any, prefix: str = "finetune.search") -> Search:
    """One entry of `finetune.search` -> a Search, or ParamsError naming the key and what is
    allowed. Checks the shape only: that each key is a hyper-parameter of the method is the
    check stage's (it knows the registry)."""
    key = f"{prefix}.{name}"
    if not NAME.match(str(name)):
        _fail(prefix, name, "search names use letters, digits, '-' and '_' (they begin trial names, DVC stages)")
    if not isinstance(raw, dict):
        _fail(key, raw, "a search is a mapping: {method: <name>, space: {<hparam>: ...}, n: <draws>, "
                        f"sampler: {'|'.join(SAMPLERS)}, seed: <int>}}")
    unknown = [k for k in raw if k not in SEARCH_KEYS]
    if unknown:
        raise ParamsError(f"{key}.{unknown[0]}: unknown key. Allowed keys in {key}: {', '.join(SEARCH_KEYS)}")
    method = raw.get("method", name)
    if not isinstance(method, str):
        _fail(f"{key}.method", method, "name a method (default: the search's own name)")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        _fail(f"{key}.space", space, "give a mapping of hyper-parameters to lists or distributions, "
                                     "e.g. {lr: {loguniform: [1.0e-5, 1.0e-3]}}")
    dims = tuple(_parse_dim(f"{key}.space.{hp}", str(hp), v) for hp, v in space.items())
    sampler = raw.get("sampler", DEFAULT_SAMPLER)
    if sampler not in SAMPLERS:
        _fail(f"{key}.sampler", sampler, f"allowed: {', '.join(SAMPLERS)}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        _fail(f"{key}.seed", seed, "use a non-negative integer")
    n = raw.get("n")
    drawn = [d for d in dims if d.drawn]
    if drawn:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            _fail(f"{key}.n", n, f"give the number of draws of {', '.join(d.key for d in drawn)} "
                                 "(a positive integer; raising it later keeps the first draws)")
    else:
        if n is not None:
            _fail(f"{key}.n", n, "this space is a grid (lists only): every value is tried; n draws from "
                                 "distributions ({loguniform: [lo, hi]}, ...), so leave it out")
        if "sampler" in raw:
            _fail(f"{key}.sampler", sampler, "this space is a grid (lists only): nothing is drawn, leave it out")
        n = 1
    return Search(str(name), method, dims, n, sampler, seed)


def _seed(*parts: Any) -> int:
    h = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big")


def _uniforms(search: Search) -> list[list[float]]:
    """n rows of one uniform number per drawn dimension (the sampler's points)."""
    drawn = search.drawn
    if not drawn:
        return [[]]
    if search.sampler == "random":
        return [[random.Random(_seed(search.seed, search.name, i, d.key)).random() for d in drawn]
                for i in range(search.n)]
    import warnings

    from scipy.stats import qmc

    sobol = qmc.Sobol(d=len(drawn), scramble=True, seed=_seed(search.seed, search.name) % 2**32)
    with warnings.catch_warnings():  # n need not be a power of 2 (the balance is then approximate)
        warnings.simplefilter("ignore", UserWarning)
        return sobol.random(search.n).tolist()


def value_label(v: Any) -> str:
    """A value in a trial name: 2 significant digits, no dot (DVC reads a dot in a params key as
    nesting): 0.0021 -> 21e-4, 37.2 -> 37, 1000 -> 1000, 0.5 -> 5e-1, True -> true."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v) if v >= 0 else f"m{-v}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        sign = "m" if v < 0 else ""
        mant, exp = f"{abs(v):.1e}".split("e")
        digits, exp = int(mant.replace(".", "")), int(exp) - 1  # v ≈ digits · 10^exp
        while digits % 10 == 0 and digits:
            digits, exp = digits // 10, exp + 1
        if 0 <= exp <= 3:
            return f"{sign}{digits * 10 ** exp}"
        return f"{sign}{digits}e{exp}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(v))


def expand(search: Search) -> dict[str, dict]:
    """The search's trials: name -> {method, <hparam>: value, ...} (see the module docstring
    for the order, the names and the crossing of grid and draws)."""
    grid = search.grid
    points = list(itertools.product(*(d.values for d in grid)))
    draws = _uniforms(search)
    out: dict[str, dict] = {}
    for point in points:
        fixed = dict(zip((d.key for d in grid), point))
        for i, us in enumerate(draws):
            drawn = {d.key: d.value(u) for d, u in zip(search.drawn, us)}
            values = {d.key: fixed[d.key] if d.key in fixed else drawn[d.key] for d in search.dims}
            summary = "-".join(f"{k}{value_label(v)}" for k, v in values.items())
            name = f"{search.name}-{i}-{summary}" if search.drawn else f"{search.name}-{summary}"
            if name in out:
                raise ParamsError(f"finetune.search.{search.name}.space: two of its trials would both be named "
                                  f"{name!r} (grid values that agree in 2 significant digits); use values that "
                                  "differ more")
            out[name] = {"method": search.method, **values}
    return out


def span(dim: Dimension) -> tuple[float, float] | None:
    """The smallest and largest value the dimension can give (None: not numeric)."""
    nums = [v for v in dim.values if _is_number(v)]
    if not nums or len(nums) != len(dim.values):
        return None
    return min(nums), max(nums)


def edge(dim: Dimension, value: Any, n: int) -> tuple[str, str] | None:
    """('low' | 'high', why) when `value` sits at that edge of the dimension's space, else None
    (see the module docstring)."""
    if dim.kind in ("grid", "choice"):
        nums = [v for v in dim.values if _is_number(v)]
        if len(nums) < 2 or len(nums) != len(dim.values) or not _is_number(value):
            return None
        if value == min(nums):
            return "low", f"{dim.key}={_short(value)} is the smallest of {dim.describe()}"
        if value == max(nums):
            return "high", f"{dim.key}={_short(value)} is the largest of {dim.describe()}"
        return None
    if not _is_number(value):
        return None
    lo, hi = dim.values
    if dim.kind == "loguniform":
        if value <= 0:
            return None
        pos = (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    else:
        pos = (value - lo) / (hi - lo)
    zone = 1.0 / (2 * max(n, 1))
    scale = "log " if dim.kind == "loguniform" else ""
    if pos <= zone:
        return "low", f"{dim.key}={_short(value)} is in the lowest 1/{2 * n} ({scale}scale) of {dim.describe()}"
    if pos >= 1 - zone:
        return "high", f"{dim.key}={_short(value)} is in the highest 1/{2 * n} ({scale}scale) of {dim.describe()}"
    return None
