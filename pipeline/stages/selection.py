"""The `selection` stage: for every method × level × seed, the trial that stands for the method,
chosen by `evaluate.selection` on validation data (never a test split; see
`pipeline.evaluation.selection`) -> runs/select/<method>/<level>.json.

It reads only the trials' validation scores (`scores.json`, written by `finetune`), so it is
quick and imports no model code; changing the protocol re-runs this stage and the evaluation
of the chosen trials, never the training. Each record carries the SHA-256 of the chosen
weights, so a re-trained trial re-runs its evaluation even when the choice stays the same; with
`evaluate.soups` on, the SHA-256 of every trial's weights (a soup averages them all)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from pipeline import artifacts as paths
from pipeline.config import Params, load_params
from pipeline.core.hashing import file_sha256
from pipeline.stages.common import ParamsOpt, guard, run_command


def select_cell(params: Params, protocol, metric: str, method: str, level: str) -> dict:
    """The selection record of one method at one level (every seed)."""
    from pipeline.evaluation.selection import posthoc_of, select_trial, space_edges

    ft = params.finetune
    trials = ft.trials_of(method)
    key = protocol.key(metric)
    origin = {t: ft.origin(t) for t in trials}
    # the spaces the trials were drawn from (the report shows them and plots the score against them)
    searches = {s: ft.searches[s].describe() for s in dict.fromkeys(origin.values()) if s is not None}
    record = {"method": method, "level": level, "protocol": protocol.name, "split": protocol.split,
              "metric": metric, "score_key": key, "trials": trials, "origin": origin, "searches": searches,
              "hparams": {}, "seeds": {}}
    for seed in params.sample.seeds:
        scores, hparams, retention, posthoc = {}, {}, {}, {}
        for trial in trials:
            run = paths.finetune_dir(trial, level, seed)
            made_by = f"finetune@{trial}-{level}"
            s = paths.read_json(run / paths.SCORES, made_by)
            hparams[trial] = paths.read_json(run / paths.CONFIG, made_by)["hparams"]
            retention[trial] = {k: float(v) for k, v in s.items() if k.startswith("zs/")}
            # post-hoc settings (Tip-Adapter's α, β) chosen on the protocol's split; none: defaults
            posthoc[trial] = posthoc_of(s, protocol.split)
            if key is not None:
                if key not in s:
                    raise ValueError(f"{run / paths.SCORES}: no {key!r}; it was written by an older "
                                     f"pipeline: re-run `dvc repro {made_by}`")
                scores[trial] = float(s[key])
        chosen = select_trial(scores, trials) if key is not None else trials[0]
        score = scores.get(chosen, math.nan)
        record["hparams"] = hparams  # the same for every seed
        record["seeds"][str(seed)] = {
            "trial": chosen,
            "score": None if math.isnan(score) else score,
            "scores": scores,
            "hparams": hparams[chosen],
            "posthoc": posthoc[chosen],
            "edges": space_edges(chosen, hparams, origin, ft.searches) if key is not None else [],
            "weights_sha256": file_sha256(paths.finetune_dir(chosen, level, seed) / paths.WEIGHTS),
            # every trial's zero-shot retention (what the choice kept or gave up; not a criterion)
            "retention": retention,
        }
        if params.evaluate.soups and len(trials) > 1:
            # the soups average every trial: a re-trained one re-runs the method's evaluation
            record["seeds"][str(seed)]["soup_weights_sha256"] = {
                t: file_sha256(paths.finetune_dir(t, level, seed) / paths.WEIGHTS) for t in trials}
    return record


def run(params: Params) -> list[dict]:
    from pipeline.data.datasets import get_spec
    from pipeline.evaluation.selection import resolve_protocol

    spec = get_spec(params.dataset.name)
    protocol = resolve_protocol(params.evaluate.selection, spec, params.sample.parsed_levels)
    records = [select_cell(params, protocol, spec.metric, m, lv.name)
               for m in params.finetune.methods for lv in params.sample.parsed_levels]
    for r in records:  # written only once every record is made: no half-finished selection
        path = paths.select_file(r["method"], r["level"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=1))
        tmp.replace(path)
    return records


@guard
def command(params_file: Path = ParamsOpt):
    """Choose each method's trial per level and seed on validation data (evaluate.selection)
    -> runs/select/<method>/<level>.json."""
    params = load_params(params_file)
    for r in run(params):
        chosen = ", ".join(f"seed {s}: {c['trial']}" for s, c in r["seeds"].items())
        typer.echo(f"{r['method']} at {r['level']} ({r['protocol']}): {chosen}")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "selection")
