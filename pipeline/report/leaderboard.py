"""A leaderboard of DVC experiments that fits a terminal: one row per experiment and method,
one column per level, from the per-method headline files (`metrics/methods/<method>.json`,
mean over seeds at the selected α) in `dvc exp show --json`.

`dvc exp show` itself prints every param and metric of every file as a column (hundreds);
`python -m pipeline leaderboard` reads its JSON and keeps what answers "which method, at
which level": the chosen value (`ood` or `id`) per level, the mean over levels to sort by,
and the params that differ between experiments.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

METHOD_FILE = re.compile(r"(?:^|/)metrics/methods/(?P<method>[^/]+)\.json$")


@dataclass
class Entry:
    experiment: str
    method: str
    values: dict[str, float]  # level label -> value
    params: dict[str, object]

    @property
    def mean(self) -> float:
        v = [x for x in self.values.values() if not math.isnan(x)]
        return sum(v) / len(v) if v else math.nan


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _revisions(node, out: list) -> None:
    """Every revision record (workspace, commits, experiments) in `dvc exp show --json`."""
    if isinstance(node, dict):
        if isinstance(node.get("data"), dict) and "metrics" in node["data"]:
            out.append(node)
        for v in node.values():
            if isinstance(v, (dict, list)):
                _revisions(v, out)
    elif isinstance(node, list):
        for v in node:
            _revisions(v, out)


def entries(exp_show: list | dict, value: str = "ood") -> list[Entry]:
    """The rows of the leaderboard from `dvc exp show --json` output."""
    found: list[Entry] = []
    records: list = []
    _revisions(exp_show, records)
    seen = set()
    for rec in records:
        data = rec["data"]
        name = rec.get("name") or data.get("name") or (rec.get("rev") or data.get("rev") or "?")
        name = name if name == "workspace" or len(name) < 20 else name[:7]
        params: dict = {}
        for content in (data.get("params") or {}).values():
            _flat("", (content or {}).get("data", {}), params)
        for path, content in (data.get("metrics") or {}).items():
            match = METHOD_FILE.search(path)
            if not match or not (content or {}).get("data"):
                continue
            values = {k.rsplit("/", 1)[0]: float(v) for k, v in content["data"].items()
                      if k.endswith(f"/{value}") and isinstance(v, (int, float))}
            key = (name, match["method"])
            if values and key not in seen:
                seen.add(key)
                found.append(Entry(name, match["method"], values, params))
    return found


def _level_order(label: str) -> tuple:
    number = re.sub(r"[^0-9.]", "", label) or "0"
    return (label.endswith("%"), float(number))


def differing_params(rows: list[Entry], limit: int = 3) -> list[str]:
    """The params whose values differ between the experiments shown (at most `limit`)."""
    keys = sorted({k for r in rows for k in r.params})
    differ = [k for k in keys if len({repr(r.params.get(k)) for r in rows}) > 1]
    return differ[:limit]


def render(rows: list[Entry], value: str = "ood", width: int = 120) -> str:
    """The table: sorted by the mean over levels (best first); values to 3 decimals."""
    if not rows:
        return ("no per-method metrics found in `dvc exp show`: run `dvc repro` (or `dvc exp run`) first, "
                "so metrics/methods/<method>.json exist")
    levels = sorted({lv for r in rows for lv in r.values}, key=_level_order)
    shown = differing_params(rows)
    head = ["experiment", "method", *levels, "mean", *[k.split(".")[-1] for k in shown]]
    body = []
    for r in sorted(rows, key=lambda r: (-r.mean if not math.isnan(r.mean) else math.inf, r.experiment, r.method)):
        cells = [r.experiment, r.method, *[_num(r.values.get(lv, math.nan)) for lv in levels], _num(r.mean)]
        cells += [_short(r.params.get(k)) for k in shown]
        body.append(cells)
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head, *body]]
    title = f"{value.upper()} per level (seed mean, selected α), sorted by the mean over levels"
    return "\n".join(line[:width] for line in [title, *lines])


def _num(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def _short(v) -> str:
    s = str(v)
    return s if len(s) <= 18 else s[:15] + "..."
