"""The `evaluate` stage: one method at every level and seed, on the trial `selection` chose for
each. ID and OOD through the dataset's official eval, every measure registered for
evaluation (zero-shot retention, RSA, ...), the WiSE-FT α sweep with α chosen by the same
protocol, and one MLflow run per seed.

It evaluates the test splits and the validation data the protocol reads (the trials' scores
on every validation split are in their finetune `scores.json`). Metric keys are flat
`split/metric` (the α = 1 model, i.e. the fine-tuned one) with the registered measures
(`zs/<task>/acc`, `rsa/image`, `rsa/text`, ...), `wise/<α>/split/metric` for every α of the
sweep, `selected/...` at the chosen α (measures included), `selection/score` (the chosen trial's validation score) and
`selection/trials` (how many trials it was chosen from). `selection.json` says which trial,
on which data, and its hyper-parameters.

With `evaluate.soups`, each soup of the method's trials (`pipeline.evaluation.soups`: uniform,
greedy on the protocol's validation data) is evaluated the same way into
`<level>/seed<S>/<kind>_soup/` (metrics.json with `soup/ingredients`, and selection.json with the
ingredients and the greedy pass) and gets an MLflow run of its own under the row
`<method>+<kind>_soup`.

In MLflow the headline metrics and both files are added to the training run of the chosen
trial (tag `selected`), child of the method's run at the level, which gets the seed mean and
95 % interval of the headline metrics (see stages/common.py for the run structure).

One process runs every level and seed of a method: the start-up (~6 s of imports) and the
decoded eval images are paid once, for every level, seed and α.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import math
from pathlib import Path

import torch
import typer

from pipeline import artifacts as paths, models
from pipeline.artifacts import EVAL_METRICS as METRICS, EVAL_SELECTION, TRAIN_LOG
from pipeline.config import Params, load_params
from pipeline.core import tracking
from pipeline.core.env import resolve_device, set_threads
from pipeline.data.datasets import split_metrics, split_rows
from pipeline.data.sampling import FEWSHOT_VAL, read_sample
from pipeline.data.torchdata import ImageFiles, LabeledImages, read_caption_csv
from pipeline.evaluation import soups
from pipeline.evaluation.measures import MeasureInputs, compute_all
from pipeline.evaluation.selection import alpha_key, resolve_protocol, select_alpha
from pipeline.data.retention import read_records
from pipeline.evaluation.zeroshot import retention_tasks
from pipeline.methods import code_record, get_method, parse_hparams
from pipeline.models.encode import FeatureMemo, encode_images, preload, weights_digest
from pipeline.stages.common import (ParamsOpt, expect_record, group_info, guard, has_text, headline, method_model,
                                    mlflow_metrics, open_task, run_command, sample_input, train_key, training_metrics,
                                    training_run_info)


def run(params: Params, method: str, log_mlflow: bool = True) -> dict[tuple, dict]:
    """Evaluate the chosen trial of every level and seed, and the method's soups
    (`evaluate.soups`); returns {(level, seed): metrics} and {(soup row, level, seed): metrics}."""
    set_threads(params.threads)
    device = resolve_device(params.evaluate.device)
    task = open_task(params, device)
    spec, dataset = task.spec, task.dataset
    protocol = resolve_protocol(params.evaluate.selection, spec, params.sample.parsed_levels)
    ep = params.evaluate
    method_cls = get_method(method)
    expect_record(paths.method_record(method), code_record(method))
    clip = method_model(params, method_cls, task, device)  # the method's model (a vision-only one: no text tower)
    cache = paths.load_features()
    alphas = sorted(set(ep.wise_alphas)) if method_cls.weight_space else [1.0]

    # Every image is decoded once and reused by every seed and α (kept in memory up to
    # models.encode.PRELOAD_BUDGET); a retention task on the rows of an eval split reuses its features.
    transform = clip.preprocess_val
    bs, nw = ep.batch_size, ep.num_workers
    # the test splits, and the validation split the protocol chooses α on (the trials' scores
    # on every validation split are in their finetune scores.json)
    splits = {}
    for split in (s for s in spec.eval_splits if s == protocol.split or s not in spec.val_splits):
        rows = split_rows(dataset, split)
        splits[split] = (rows, preload(LabeledImages(dataset, rows.tolist(), transform), bs, nw, desc=f"decode {split}"))
    # a model without text tower has no zero-shot head: no retention task, no RSA (the measures
    # that need one are skipped, `compute_all`)
    tasks = (retention_tasks(read_records(paths.PREPARED_RETENTION), clip.tokenizer, dataset, spec.name, task.images)
             if has_text(clip.model) else [])
    same_rows = {t.name: split for t in tasks for split, (rows, _) in splits.items()
                 if t.dataset is dataset and torch.equal(t.rows, rows)}
    task_images = {t.name: preload(LabeledImages(t.dataset, t.rows.tolist(), transform), bs, nw, desc=f"decode {t.name}")
                   for t in tasks if t.name not in same_rows}
    n_ref = min(ep.rsa_samples, cache["ref/image"].shape[0])
    ref_files, _ = read_caption_csv(paths.reference_csv(params.reference.csv), params.reference.separator, limit=n_ref)
    ref_images = preload(ImageFiles(ref_files, transform, task.images.store("reference")), bs, nw, desc="decode reference")
    inputs = dict(device=device, batch_size=bs, num_workers=nw, transform=transform, tasks=tasks,
                  reference_images=ref_images, reference_image_pre=cache["ref/image"],
                  reference_text_pre=cache["ref/text"], reference_tokens=cache["ref/tokens"][:n_ref])

    pristine = clip.model  # never changed: each α merges into a copy
    key = protocol.key(spec.metric)
    memo = FeatureMemo()  # a model equal to one already encoded (α = 0 at every seed and level) is not again

    def evaluate_state(state: dict, hp, seed: int, fewshot, what: str = "",
                       posthoc: dict | None = None) -> dict[str, float]:
        """A saved state (a trial's, a soup's) at every α of the sweep on every split, the
        registered measures at α = 1 and at the α the protocol chooses: the metric keys of the
        module docstring (but selection/ and train/). `posthoc`: the training-free settings of
        the method's classifier chosen on the protocol's split (Tip-Adapter's α, β)."""
        # the sweep: every split at every α; then the registered measures (retention, RSA, ...)
        # at α = 1 (the fine-tuned model) and at the chosen α only
        per_alpha: dict[float, dict[str, float]] = {}
        feats_at: dict[float, dict[str, torch.Tensor]] = {}
        digests: dict[float, str] = {}
        models_at = {}
        for alpha in alphas:
            model = method_cls.eval_model(copy.deepcopy(pristine), state, hp, cache["head"].to(device), alpha=alpha)
            model = model.to(device).eval()
            head = _at_posthoc(model.task_head(task.class_tokens.to(device)).cpu(), posthoc or {})
            digests[alpha] = weights_digest(model)
            m: dict[str, float] = {}
            feats_at[alpha] = {}
            tag = f"{what}seed={seed} α={alpha:g}"
            for split, (rows, images) in splits.items():
                feats_at[alpha][split] = memo.encode(digests[alpha], model, images, device, bs, nw,
                                                     desc=f"eval {split} {tag}")
                m.update(split_metrics(dataset, split, feats_at[alpha][split], head, rows))
            if fewshot is not None:
                feats = memo.encode(digests[alpha], model, fewshot[1], device, bs, nw, desc=f"eval {FEWSHOT_VAL} {tag}")
                m.update(split_metrics(dataset, FEWSHOT_VAL, feats, head, fewshot[0]))
            per_alpha[alpha] = m
            models_at[alpha] = model if alpha == 1.0 else None
        best = select_alpha({a: per_alpha[a][key] for a in alphas}) if key else 1.0
        for alpha in dict.fromkeys((1.0, best)):
            model = models_at.get(alpha) or method_cls.eval_model(
                copy.deepcopy(pristine), state, hp, cache["head"].to(device), alpha=alpha).to(device).eval()
            task_feats = {name: feats_at[alpha][split] for name, split in same_rows.items()}
            task_feats.update({name: memo.encode(digests[alpha], model, images, device, bs, nw,
                                                 desc=f"zs {name} {what}seed={seed} α={alpha:g}")
                               for name, images in task_images.items()})
            per_alpha[alpha].update(compute_all("evaluate", MeasureInputs(model=model, task_features=task_feats, **inputs)))
        del models_at, feats_at

        metrics: dict[str, float] = {}
        if method_cls.weight_space:
            for alpha, m in per_alpha.items():
                metrics.update({f"{alpha_key(alpha)}/{k_}": v for k_, v in m.items()})
        metrics.update(per_alpha[1.0])
        metrics["selected/alpha"] = best
        metrics.update({f"selected/{k_}": v for k_, v in per_alpha[best].items()})
        return metrics

    def val_score(state: dict, hp, fewshot) -> float:
        """The protocol's validation score of a state at α = 1 (a soup's, in the greedy pass)."""
        model = method_cls.eval_model(copy.deepcopy(pristine), state, hp, cache["head"].to(device), alpha=1.0)
        model = model.to(device).eval()
        head = model.task_head(task.class_tokens.to(device)).cpu()
        rows, images = fewshot if protocol.split == FEWSHOT_VAL else splits[protocol.split]
        feats = encode_images(model, images, device, bs, nw, desc=f"soup {protocol.split}")
        return float(split_metrics(dataset, protocol.split, feats, head, rows)[key])

    # the soups of this method (evaluate.soups; none where the method declares none or has one trial)
    kinds = soups.soup_kinds(method_cls.soups, len(params.finetune.trials_of(method)), ep.soups)

    def evaluate_soup(kind: str, record: dict, chosen: dict, level, seed: int, fewshot,
                      trial_metrics: dict) -> tuple[dict, dict]:
        """(metrics, selection record) of one soup of every trial of the method at a level and seed."""
        from pipeline.models.weights import uniform_soup

        trials = record["trials"]
        digests = chosen.get("soup_weights_sha256") or {}
        states, hps, summaries = {}, {}, {}
        for t in trials:
            weights = paths.finetune_dir(t, level.name, seed) / paths.WEIGHTS
            if digests.get(t) != models.file_sha256(weights):
                raise ValueError(f"{paths.select_file(method, level.name)}: no digest of {t}'s weights, or they "
                                 "changed since the selection; run `dvc repro selection`")
            states[t], config, summaries[t] = paths.read_run(t, level.name, seed)
            hps[t] = parse_hparams(method, config["hparams"], f"finetune.trials.{t}")
        order = soups.greedy_order(chosen["scores"], trials)
        steps: list[dict] = []
        if kind == "greedy":
            measured: dict[tuple[str, ...], float] = {}

            def score(names: tuple[str, ...]) -> float:
                if names not in measured:
                    measured[names] = val_score(uniform_soup([states[n] for n in names]), hps[names[0]], fewshot)
                return measured[names]

            ingredients, steps = soups.greedy_soup(order, score)
        else:
            ingredients = order
        # the best ingredient's hyper-parameters build the model (a soupable method's eval_model
        # reads none: the soup's weights are the model)
        hp = hps[ingredients[0]]
        m = evaluate_state(uniform_soup([states[t] for t in ingredients]), hp, seed, fewshot, f"{kind} soup ")
        if key is not None:
            m["selection/score"] = m[key]  # the soup at α = 1 on the protocol's data
        m["selection/trials"] = len(trials)
        m["soup/ingredients"] = len(ingredients)
        for k_ in ("train/trainable_params", "train/trainable_share", "train/n_train"):
            m[k_] = trial_metrics[k_]
        # a soup costs the training of every trial it was chosen from
        times = [paths.run_time_file(t, level.name, seed) for t in trials]
        m["train/wall_time_s"] = sum(json.loads(f.read_text()).get("wall_time_s", math.nan) if f.is_file()
                                     else math.nan for f in times)
        m["train/steps"] = sum(summaries[t]["steps"] for t in trials)
        m = {k_: m[k_] for k_ in sorted(m)}
        sel = {"soup": kind, "method": method, "protocol": protocol.name, "split": protocol.split,
               "metric": spec.metric, "trial": soups.SEP.join(ingredients), "ingredients": ingredients,
               "order": order, "greedy": steps, "score": m.get("selection/score"), "trials": trials,
               "scores": chosen["scores"], "alpha": m["selected/alpha"], "alphas": alphas, "level": level.name,
               "level_kind": level.kind, "seed": seed, "n_train": summaries[ingredients[0]]["n_train"],
               "headline": spec.metric}
        return m, sel

    results, staged, logged = {}, [], {}
    for level, seed in ((lv, s) for lv in params.sample.parsed_levels for s in params.sample.seeds):
        # nothing of a previous run may look finished while this one works
        (paths.evaluate_dir(method, level.name, seed) / METRICS).unlink(missing_ok=True)
        for kind in soups.KINDS:
            shutil.rmtree(paths.evaluate_dir(method, level.name, seed) / paths.soup_dirname(kind), ignore_errors=True)
    for level, seed in ((lv, s) for lv in params.sample.parsed_levels for s in params.sample.seeds):
        record = paths.read_json(paths.select_file(method, level.name), "selection")
        chosen = record["seeds"].get(str(seed))
        if chosen is None:
            raise ValueError(f"{paths.select_file(method, level.name)}: no seed {seed}; run `dvc repro selection`")
        trial = chosen["trial"]
        state, config, summary = paths.read_run(trial, level.name, seed)
        if models.file_sha256(paths.finetune_dir(trial, level.name, seed) / paths.WEIGHTS) != chosen["weights_sha256"]:
            raise ValueError(f"{paths.select_file(method, level.name)}: the weights of {trial} changed since "
                             "the selection; run `dvc repro selection`")
        hp = parse_hparams(method, config["hparams"], f"finetune.trials.{trial}")
        posthoc = chosen.get("posthoc") or {}  # chosen on the protocol's split by finetune (none: defaults)
        sample = read_sample(paths.sample_file(level.name, seed))
        fewshot = None
        if sample["n_val"]:
            fewshot = (torch.as_tensor(sample["val_indices"]),
                       preload(LabeledImages(dataset, sample["val_indices"], transform), bs, nw, desc="decode fewshot_val"))
        metrics = evaluate_state(state, hp, seed, fewshot, posthoc=posthoc)
        if chosen["score"] is not None:
            metrics["selection/score"] = chosen["score"]
        metrics["selection/trials"] = len(record["trials"])
        metrics["train/trainable_params"] = summary["trainable_params"]
        metrics["train/trainable_share"] = summary["trainable_share"]
        # the run's wall time and peak memory live outside DVC's outputs (artifacts.run_time_file):
        # NaN when absent (outputs restored from a DVC cache on another machine)
        times = paths.run_time_file(trial, level.name, seed)
        times = json.loads(times.read_text()) if times.is_file() else {}
        metrics["train/wall_time_s"] = times.get("wall_time_s", math.nan)
        metrics["train/peak_memory_mb"] = times.get("peak_memory_mb", math.nan)
        metrics["train/steps"] = summary["steps"]
        metrics["train/n_train"] = summary["n_train"]
        metrics = {k_: metrics[k_] for k_ in sorted(metrics)}
        selection = {"protocol": protocol.name, "split": protocol.split, "metric": spec.metric,
                     "trial": trial, "score": chosen["score"], "trials": record["trials"],
                     "scores": chosen["scores"], "edges": chosen["edges"], "hparams": config["hparams"],
                     "alpha": metrics["selected/alpha"], "alphas": alphas, "posthoc": posthoc, "level": level.name,
                     "level_kind": level.kind,
                     "seed": seed, "n_train": summary["n_train"], "headline": spec.metric}
        out = paths.evaluate_dir(method, level.name, seed)
        # staged, logged to MLflow from the staging folder, and moved into place only then:
        # metrics.json (the finished marker) appears last, after everything else succeeded
        staging = out / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / EVAL_SELECTION).write_text(json.dumps(selection, indent=1))
        (staging / METRICS).write_text(json.dumps(metrics, indent=1))
        if log_mlflow:
            log_to_mlflow(params, method, level, seed, record["trials"], metrics, selection, staging, dataset, sample,
                          chosen["weights_sha256"])
            logged[f"{level.name}/seed{seed}"] = train_key(trial, level.name, seed)
        for kind in kinds:
            row = soups.row_name(method, kind)
            soup_m, soup_sel = evaluate_soup(kind, record, chosen, level, seed, fewshot, metrics)
            soup_out = staging / paths.soup_dirname(kind)
            soup_out.mkdir()
            (soup_out / EVAL_SELECTION).write_text(json.dumps(soup_sel, indent=1))
            (soup_out / METRICS).write_text(json.dumps(soup_m, indent=1))
            if log_mlflow:
                logged[f"{row}/{level.name}/seed{seed}"] = log_soup(params, row, level, seed, soup_m, soup_sel, soup_out)
            results[(row, level.name, seed)] = soup_m
        staged.append(out)
        results[(level.name, seed)] = metrics
    if log_mlflow:
        for level in params.sample.parsed_levels:
            log_seed_means(params, method, level, [results[(level.name, s)] for s in params.sample.seeds])
            logged[level.name] = group_info(params, method, level)[0]
            for kind in kinds:
                row = soups.row_name(method, kind)
                log_seed_means(params, row, level, [results[(row, level.name, s)] for s in params.sample.seeds])
                logged[f"{row}/{level.name}"] = group_info(params, row, level)[0]
    for out in staged:  # the finished markers, once everything (MLflow included) succeeded
        for kind in kinds:
            done = out / paths.soup_dirname(kind)
            shutil.rmtree(done, ignore_errors=True)
            os.replace(out / ".staging" / paths.soup_dirname(kind), done)
        os.replace(out / ".staging" / EVAL_SELECTION, out / EVAL_SELECTION)
        os.replace(out / ".staging" / METRICS, out / METRICS)
        (out / ".staging").rmdir()
    record_file = paths.mlflow_record(method)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_file.with_suffix(".tmp")
    # the run keys, not ids: the file is the same as long as the same runs hold the results
    tmp.write_text(json.dumps({"tracking_uri": tracking.display_uri(), "experiment": params.dataset.name,
                               "runs": logged}, indent=1))
    tmp.replace(record_file)
    return results


def _at_posthoc(head, posthoc: dict):
    """The task head at the post-hoc setting the selection carried (a `TunedClassifier`'s)."""
    from pipeline.models.evalmodel import TunedClassifier

    if not posthoc:
        return head
    if not isinstance(head, TunedClassifier):
        raise ValueError(f"the selection carries post-hoc settings {posthoc}, but the method's model has none; "
                         "run `dvc repro selection`")
    return head.at(**posthoc)


def log_to_mlflow(params: Params, method: str, level, seed: int, trials: list[str], metrics: dict,
                  selection: dict, staging: Path, dataset, sample: dict, weights_sha256: str) -> str:
    """Add the evaluation to the chosen trial's training run (the one whose weights digest is
    `weights_sha256`). Every trial the selection chose
    from gets its training run if it has none (outputs restored from DVC's cache were never
    tracked here) or if it still carries an earlier evaluation (it is no longer chosen: only the
    chosen run may show test metrics), rebuilt from the finetune outputs."""
    experiment = params.dataset.name
    chosen = selection["trial"]
    run_id = None
    for trial in trials:
        # the chosen trial's live run carries the digest of the weights (checked against the file)
        run = tracking.find_run(experiment, train_key(trial, level.name, seed),
                                {"weights_sha256": weights_sha256} if trial == chosen else {})
        if run is None or (trial != chosen and "evaluated" in run.data.tags):
            rid = rebuild_training_run(params, trial, level, seed, dataset, sample)
        else:
            rid = run.info.run_id
        if trial == chosen:
            run_id = rid
    tags = {"selected": "true", "evaluated": "true", "selection": selection["protocol"],
            "select_split": selection["split"] or "none", "selected_alpha": f"{selection['alpha']:g}",
            "evaluated_git_commit": tracking.git_commit()}
    tracking.add_to_run(run_id, mlflow_metrics(experiment, metrics), tags,
                        artifacts=[staging / METRICS, staging / EVAL_SELECTION], marker="evaluated")
    return run_id


def rebuild_training_run(params: Params, trial: str, level, seed: int, dataset, sample: dict) -> str:
    """A training run made from a finished finetune's outputs (what the live run would hold:
    its params, every logged step, validation scores, times), replacing the key's runs."""
    out = paths.finetune_dir(trial, level.name, seed)
    config = json.loads((out / paths.CONFIG).read_text())
    summary = json.loads((out / paths.SUMMARY).read_text())
    scores = json.loads((out / paths.SCORES).read_text())
    times = paths.run_time_file(trial, level.name, seed)
    times = json.loads(times.read_text()) if times.is_file() else {}
    steps = []
    if (out / TRAIN_LOG).exists():
        with open(out / TRAIN_LOG) as f:
            steps = list(csv.DictReader(f))
    info = training_run_info(params, trial, level, seed, config)
    parent = tracking.group_run(params.dataset.name, *info["group"])
    end = start = None
    if times.get("finished_at"):
        import datetime

        end = int(datetime.datetime.strptime(times["finished_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp() * 1000)
        start = end - int(1000 * times.get("wall_time_s", 0.0))
    return tracking.log_run(
        experiment=params.dataset.name, key=info["key"], run_name=info["name"], params=info["params"],
        tags={**info["tags"], "run_kind": "train", "weights_sha256": models.file_sha256(out / paths.WEIGHTS),
              "rebuilt_from_outputs": "true"},
        metrics=training_metrics(params.dataset.name, summary, scores, times), step_metrics=steps,
        inputs=[sample_input(params, level, seed, dataset, sample)], parent=parent, start_time=start, end_time=end)


def log_soup(params: Params, row: str, level, seed: int, metrics: dict, selection: dict, folder: Path) -> str:
    """A soup's own MLflow run (`<method>+<kind>_soup/<level>/seed<S>`, no training of its own),
    child of the soup row's run at the level; returns its key."""
    key = f"{row}/{level.name}/seed{seed}"
    parent = tracking.group_run(params.dataset.name, *group_info(params, row, level))
    tracking.log_run(
        experiment=params.dataset.name, key=key, run_name=f"{row} {level.label} seed={seed}",
        params={"method": selection["method"], "soup": selection["soup"], "level": level.name, "seed": seed,
                "ingredients": ",".join(selection["ingredients"]), "trials": ",".join(selection["trials"])},
        tags={"run_kind": "soup", "method": row, "base_method": selection["method"], "soup": selection["soup"],
              "level": level.name, "level_kind": level.kind, "seed": str(seed), "dataset": params.dataset.name,
              "selected": "true", "evaluated": "true", "selection": selection["protocol"],
              "select_split": selection["split"] or "none", "selected_alpha": f"{selection['alpha']:g}"},
        metrics=mlflow_metrics(params.dataset.name, metrics), artifacts=[folder / METRICS, folder / EVAL_SELECTION],
        parent=parent)
    return key


def log_seed_means(params: Params, method: str, level, per_seed: list[dict]) -> str:
    """The method's run at the level: mean over seeds (and the 95 % interval's half-width with
    two seeds or more) of the official metric on every eval split, at α = 1 and at the
    selected α."""
    from pipeline.data.datasets import get_spec
    from pipeline.evaluation.stats import mean_ci

    spec = get_spec(params.dataset.name)
    keys = [f"{p}{split}/{spec.metric}" for p in ("", "selected/") for split in spec.eval_splits]
    out = {}
    for key in keys:
        values = [m[key] for m in per_seed if key in m]
        if not values:
            continue
        mean, ci = mean_ci(values)
        out[f"mean/{key}"] = mean
        if len(values) > 1:
            out[f"ci95/{key}"] = ci
    out["seeds"] = len(per_seed)
    parent = tracking.group_run(params.dataset.name, *group_info(params, method, level))
    tracking.add_to_run(parent, out, {"seeds": ",".join(map(str, params.sample.seeds))})
    return parent


@guard
def command(method: str = typer.Option(..., "--method", "-m", help="A method of finetune.methods."),
            params_file: Path = ParamsOpt):
    """Evaluate the chosen trial of one method at every level and seed (ID, OOD, zero-shot
    retention, RSA, WiSE-FT sweep) -> runs/evaluate/<method>/<level>/seed<S>/metrics.json and
    one MLflow run per level and seed."""
    params = load_params(params_file)
    if method not in params.finetune.methods:
        raise ValueError(f"--method: {method!r} is not in finetune.methods ({', '.join(params.finetune.methods)})")
    for key, metrics in run(params, method).items():
        typer.echo(f"{' '.join(key[:-2])}{' ' if len(key) > 2 else ''}level {key[-2]} seed {key[-1]}: "
                   + headline(params.dataset.name, metrics))


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv, "evaluate")
