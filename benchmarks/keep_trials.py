"""Reduce the workspace's search space to a few trials, for the queued studies
(benchmarks/crosstask.sh, benchmarks/compare.sh): params.yaml gets those trials as hand-written
`finetune.trials` (no `finetune.search`) and their methods as `finetune.methods`, and trials.yaml
is regenerated to match (the `check` stage refuses a stale one; `dvc exp run -S` cannot rewrite
it). A queued experiment is the last commit plus the workspace's changes to tracked files, so
the scripts queue right after this and then put both files back with `--restore`.

    python benchmarks/keep_trials.py ft@lr=1.0e-4 lp-0-lr73e-4   # prints the methods kept
    python benchmarks/keep_trials.py --restore

A trial is a trial name of the current params (written or drawn: `python -m pipeline search
--show` lists them) or `<method>@<hparam>=<value>[@...]`, named `<method>-<hparam><value>`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

BACKUP = Path("benchmarks/out/keep_trials")
FILES = (Path("params.yaml"), Path("trials.yaml"))


def _spec(text: str, known: dict) -> tuple[str, dict]:
    from pipeline.core.search import value_label

    if "@" not in text:
        if text not in known:
            sys.exit(f"{text}: not a trial of params.yaml ({', '.join(known)}); or write <method>@<hparam>=<value>")
        return text, dict(known[text])
    method, *sets = text.split("@")
    spec: dict = {"method": method}
    for s in sets:
        key, _, value = s.partition("=")
        spec[key] = yaml.safe_load(value)
        if isinstance(spec[key], str):
            try:
                spec[key] = float(spec[key])
            except ValueError:
                pass
    name = "-".join([method, *(f"{k}{value_label(v)}" for k, v in spec.items() if k != "method")])
    return name, spec


def keep(texts: list[str]) -> list[str]:
    from pipeline.config import load_params, render_generated
    from pipeline.core.validation import parse
    from pipeline.config import FinetuneParams

    known = load_params("params.yaml").finetune.all_trials
    kept = dict(_spec(t, known) for t in texts)
    methods = list(dict.fromkeys(s["method"] for s in kept.values()))
    BACKUP.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        if not (BACKUP / f.name).exists():  # an earlier run not restored: keep its originals
            shutil.copy2(f, BACKUP / f.name)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["finetune"].update(methods=methods, trials=kept, search={})
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    finetune = parse(FinetuneParams, raw["finetune"], "finetune")
    Path("trials.yaml").write_text(render_generated(finetune))
    return methods


def restore() -> None:
    for f in FILES:
        if (BACKUP / f.name).exists():
            shutil.copy2(BACKUP / f.name, f)
            (BACKUP / f.name).unlink()


if __name__ == "__main__":
    if sys.argv[1:] == ["--restore"]:
        restore()
    else:
        print(",".join(keep([t for arg in sys.argv[1:] for t in arg.split(",") if t])))
