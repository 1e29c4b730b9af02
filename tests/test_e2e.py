"""End to end: the real stages under real DVC on a tiny synthetic setup, tracked in a real
MLflow store. One pipeline run serves several checks (module-scoped fixture)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e_project import ROOT, copy_pipeline, init_and_repro, merge, sh, start_until, write_trials

pytestmark = pytest.mark.slow

TINY = {
    "prepare": {"synthetic": {"n_train": 400, "n_id_val": 100, "n_id_test": 150, "n_val": 100,
                              "n_test": 150, "n_heldout": 200, "n_corpus": 3000}},
    "pretrained": {"builtin": {"steps": 200, "batch_size": 64, "warmup": 20}},
    "reference": {"max_samples": 300},
    "embed": {"iimm_samples": 200},
    "sample": {"levels": [4, "10%"], "seeds": [0]},
    "finetune": {"methods": ["lp", "flyp", "dive", "vision_lp"],
                 "trials": {"lp-a": {"method": "lp"}, "flyp-a": {"method": "flyp"},
                            "dive-lam10": {"method": "dive", "lam": 10.0},
                            "dive-lam100": {"method": "dive", "lam": 100.0},
                            "vision_lp-a": {"method": "vision_lp"}},
                 "train": {"epochs": 1.0, "min_steps": 12, "max_steps": 12, "batch_size": 16,
                           "checkpoint_every": 6}},
    # dive's two trials make its soups (flyp, lp: one trial, no soup; vision_lp: one trial)
    "evaluate": {"wise_alphas": [0.0, 0.5, 1.0], "rsa_samples": 150, "soups": ["uniform", "greedy"]},
}



@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh git + DVC project holding this repository's pipeline with tiny params."""
    work = tmp_path_factory.mktemp("project")
    env = copy_pipeline(work)
    # two more architectures, part of the code from the start: one with the tiny CLIP's 32-px
    # input, one with 48 px (test_the_image_cache_follows_the_image_size)
    cfg = json.loads((work / "pipeline/models/configs/tiny-clip.json").read_text())
    cfg["vision_cfg"]["width"] = 64
    (work / "pipeline/models/configs/tiny-clip-narrow.json").write_text(json.dumps(cfg))
    cfg["vision_cfg"]["image_size"] = 48
    (work / "pipeline/models/configs/tiny-clip-48.json").write_text(json.dumps(cfg))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_and_repro(work, env)
    return work, env


def metrics(work: Path, method: str, level: str = "4", seed: int = 0) -> dict:
    return json.loads((work / "runs/evaluate" / method / level / f"seed{seed}" / "metrics.json").read_text())


TRIALS = {"lp": ["lp-a"], "flyp": ["flyp-a"], "dive": ["dive-lam10", "dive-lam100"]}  # the CLIP methods
VISION_TRIALS = {"vision_lp": ["vision_lp-a"]}  # the vision-only baseline (tiny-vit)


def test_pipeline_outputs(project):
    work, _ = project
    zs = json.loads((work / "data/embed/metrics.json").read_text())
    assert {"id_test/acc_avg", "test/acc_avg", "iimm", "silhouette/modality", "silhouette/class",
            "zs/synthetic/colour/acc", "zs/synthetic/heldout-shapes/acc"} <= zs.keys()
    sample = json.loads((work / "data/samples/4/seed0.json").read_text())
    assert sample["n"] == 4 * len(sample["per_class"]) and sample["n_val"] == sample["n"]
    share = json.loads((work / "data/samples/10%/seed0.json").read_text())
    assert share["kind"] == "fraction" and share["n"] == 40 and share["n_val"] == 40  # 10 % of 400
    assert not set(share["val_indices"]) & set(share["indices"])
    assert (work / "runs/evaluate/dive/10%/seed0/metrics.json").exists()
    for m, trials in TRIALS.items():
        for t in trials:
            run = work / "runs/finetune" / t / "4" / "seed0"
            assert (run / "weights.safetensors").exists()
            assert {"id_val/acc_avg", "val/acc_avg", "fewshot_val/acc_avg",
                    "zs/synthetic/heldout-shapes/acc"} <= json.loads((run / "scores.json").read_text()).keys()
            assert json.loads((run / "train_summary.json").read_text())["steps"] == 12
            assert not (work / "checkpoints" / t / "4" / "seed0" / "last.pt").exists()
        got = metrics(work, m)
        assert {"id_test/acc_avg", "test/acc_avg", "rsa/image", "rsa/text", "selected/alpha",
                "selection/trials"} <= got.keys()
        assert got["selection/trials"] == len(trials)
        sel = json.loads((work / "runs/evaluate" / m / "4" / "seed0" / "selection.json").read_text())
        assert sel["protocol"] == "id_val" and sel["split"] == "id_val" and sel["trial"] in trials
        record = json.loads((work / "runs/select" / m / "4.json").read_text())
        scores = record["seeds"]["0"]["scores"]
        assert record["seeds"]["0"]["trial"] == max(trials, key=lambda t: (scores[t], -trials.index(t)))
        assert set(record["seeds"]["0"]["retention"]) == set(trials)  # every trial's retention, for the report
    assert (work / "reports/summary.md").exists() and (work / "reports/selection.csv").exists()
    assert (work / "metrics/report.json").exists()
    assert {"zs/synthetic/colour/acc", "zs/synthetic/heldout-shapes/acc",
            "selected/zs/synthetic/heldout-shapes/acc"} <= got.keys()
    flat = json.loads((work / "metrics/report.json").read_text())
    assert {"flyp/k4/zs_delta", "dive/k4/zs_delta/synthetic/heldout-shapes"} <= flat.keys()
    # LP changes neither tower: its zero-shot answers on tasks it never saw are the pre-trained ones
    assert flat["lp/k4/zs_delta"] == pytest.approx(0.0, abs=1e-9)
    assert "## Zero-shot retention: change from the pre-trained model" in (work / "reports/summary.md").read_text()
    for png in ("id_vs_shots", "ood_vs_shots", "id_vs_ood", "retention", "rsa_vs_shots"):
        data = (work / "reports" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_the_vision_only_baseline_is_a_row_without_zero_shot(project):
    """vision_lp trains a new head on the tiny-vit backbone the `vision` stage pre-trained on the
    corpus's shape labels; it is evaluated like every method but has no zero-shot level, no
    WiSE-FT, no retention or RSA: the report says n/a and its curve starts at its first level."""
    work, env = project
    info = json.loads((work / "models/vision/info.json").read_text())
    assert info["built"] and info["for"] == ["vision_lp"] and info["classes"] == 12  # 8 task + 4 held-out shapes
    assert info["final_train_acc"] > 1 / 12  # it learnt the labels beyond chance
    got = metrics(work, "vision_lp")
    assert {"id_test/acc_avg", "test/acc_avg", "selected/alpha", "selection/trials"} <= got.keys()
    assert got["selected/alpha"] == 1.0
    assert not [k for k in got if k.startswith(("zs/", "rsa/", "wise/", "selected/zs/", "selected/rsa/"))], got
    scores = json.loads((work / "runs/finetune/vision_lp-a/4/seed0/scores.json").read_text())
    assert "id_val/acc_avg" in scores and not [k for k in scores if k.startswith("zs/")]
    config = json.loads((work / "runs/finetune/vision_lp-a/4/seed0/config.json").read_text())
    assert config["arch"] == "tiny-vit" and config["pretrained"] == "builtin"
    md = (work / "reports/summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| vision_lp |")]
    assert len(rows) >= 2 and all("n/a" in r for r in rows[:2]), rows
    assert "**n/a**: vision_lp fine-tunes a vision-only model" in md
    client, _, runs = _runs(env)
    steps = [h.step for h in client.get_metric_history(runs["report"].info.run_id, "curve/vision_lp/selected_ood")]
    assert sorted(steps)[0] > 0 and len(steps) == 2  # no k = 0 point: it has no zero-shot level


def test_dive_keeps_geometry_better_than_flyp(project):
    work, _ = project
    flyp, dive = metrics(work, "flyp"), metrics(work, "dive")
    assert dive["rsa/image"] > flyp["rsa/image"]
    assert dive["rsa/text"] > flyp["rsa/text"]


def test_soups_of_a_methods_trials_are_rows_of_their_own(project, monkeypatch, tmp_path):
    """evaluate.soups: dive's two trials make a uniform and a greedy soup per level and seed,
    each evaluated like a chosen trial and a row of its own in the report, `dvc metrics` and
    MLflow (its own run under its row's parent). The greedy pass starts from the best trial by
    validation score and its scores are the soups' validation figures; scrambling every test
    figure changes no soup (the soups read only the validation split)."""
    import shutil

    import pandas as pd
    import torch
    from safetensors.torch import load_file

    from pipeline.models.weights import uniform_soup

    work, env = project
    for lv in ("4", "10%"):
        record = json.loads((work / "runs/select/dive" / f"{lv}.json").read_text())["seeds"]["0"]
        chosen = metrics(work, "dive", lv)
        soups = {k: (json.loads((work / f"runs/evaluate/dive/{lv}/seed0/{k}_soup/metrics.json").read_text()),
                     json.loads((work / f"runs/evaluate/dive/{lv}/seed0/{k}_soup/selection.json").read_text()))
                 for k in ("uniform", "greedy")}
        (um, us), (gm, gs) = soups["uniform"], soups["greedy"]
        assert us["ingredients"] == gs["order"] and set(us["ingredients"]) == set(TRIALS["dive"])
        assert um["soup/ingredients"] == 2 and um["selection/trials"] == 2
        # the greedy order: by the trials' validation scores (the selection's), best first
        best = max(TRIALS["dive"], key=lambda t: (record["scores"][t], -TRIALS["dive"].index(t)))
        assert gs["order"][0] == best == record["trial"]
        steps = gs["greedy"]
        assert [st["trial"] for st in steps] == gs["order"] and steps[0]["accepted"]
        # the soup of one is the chosen trial: its score there is the trial's own validation figure
        assert steps[0]["score"] == pytest.approx(chosen["id_val/acc_avg"])
        assert steps[1]["accepted"] == (steps[1]["score"] >= steps[0]["score"])
        assert gm["soup/ingredients"] == len(gs["ingredients"]) == 1 + steps[1]["accepted"]
        assert gm["selection/score"] == pytest.approx([st["score"] for st in steps if st["accepted"]][-1])
        assert gm["selection/score"] == pytest.approx(gm["id_val/acc_avg"])
        if steps[1]["accepted"]:  # both soups hold both trials: the same model
            assert gm["test/acc_avg"] == pytest.approx(um["test/acc_avg"])
        else:  # the greedy soup is the best trial alone
            assert gm["test/acc_avg"] == pytest.approx(chosen["test/acc_avg"])
        assert {"test/acc_avg", "id_test/acc_avg", "rsa/image", "selected/alpha", "wise/0.5/test/acc_avg"} <= um.keys()
    # the uniform soup's weights are the mean of the trials' (what evaluate loads)
    w = [load_file(str(work / f"runs/finetune/{t}/4/seed0/weights.safetensors")) for t in TRIALS["dive"]]
    soup = uniform_soup(w)
    key = next(k for k in w[0] if k.startswith("clip.visual") and w[0][k].is_floating_point())
    assert torch.allclose(soup[key], (w[0][key] + w[1][key]) / 2, atol=1e-6)

    # the report: rows of their own, after their method; dvc metrics; MLflow
    runs_csv = pd.read_csv(work / "reports/runs.csv", dtype={"level": str})
    for kind in ("uniform", "greedy"):
        row = runs_csv[runs_csv["method"] == f"dive+{kind}_soup"]
        assert sorted(row["level"]) == ["10%", "4"], row
        m = json.loads((work / f"runs/evaluate/dive/4/seed0/{kind}_soup/metrics.json").read_text())
        assert row[row["level"] == "4"]["ood"].iloc[0] == pytest.approx(m["test/acc_avg"])
        assert (work / f"metrics/methods/dive+{kind}_soup.json").is_file()
    order = list(dict.fromkeys(runs_csv["method"]))
    assert order.index("dive+uniform_soup") == order.index("dive") + 1
    assert "dive+greedy_soup" in (work / "reports/summary.md").read_text()
    client, _, mlruns = _runs(env)
    run = mlruns["dive+greedy_soup/4/seed0"]
    assert run.data.tags["run_kind"] == "soup" and run.data.tags["base_method"] == "dive"
    assert run.data.tags["mlflow.parentRunId"] == mlruns["dive+greedy_soup/4"].info.run_id
    gm = json.loads((work / "runs/evaluate/dive/4/seed0/greedy_soup/metrics.json").read_text())
    assert run.data.metrics["test/acc_avg"] == pytest.approx(gm["test/acc_avg"])
    assert mlruns["dive+greedy_soup/4"].data.metrics["mean/test/acc_avg"] == pytest.approx(gm["test/acc_avg"])

    # only validation: the evaluation again, in this process, with every test figure scrambled
    import random

    import pipeline.stages.evaluate as evaluate
    from pipeline.config import load_params

    real = evaluate.split_metrics
    rng = random.Random(0)

    def scrambled(dataset, split, *args, **kwargs):
        out = real(dataset, split, *args, **kwargs)
        return out if "val" in split else {k: rng.random() for k in out}

    saved = tmp_path / "saved"
    shutil.copytree(work / "runs/evaluate/dive", saved / "evaluate")
    shutil.copy(work / "runs/mlflow/dive.json", saved / "mlflow.json")
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setattr(evaluate, "split_metrics", scrambled)
    try:
        evaluate.run(load_params(work / "params.yaml"), "dive", log_mlflow=False)
        for lv in ("4", "10%"):
            for kind in ("uniform", "greedy"):
                folder = f"{lv}/seed0/{kind}_soup"
                again = json.loads((work / "runs/evaluate/dive" / folder / "selection.json").read_text())
                before = json.loads((saved / "evaluate" / folder / "selection.json").read_text())
                assert again["ingredients"] == before["ingredients"] and again["greedy"] == before["greedy"]
                assert again["alpha"] == before["alpha"]
                m_again = json.loads((work / "runs/evaluate/dive" / folder / "metrics.json").read_text())
                m_before = json.loads((saved / "evaluate" / folder / "metrics.json").read_text())
                assert m_again["test/acc_avg"] != m_before["test/acc_avg"]  # the scrambling took effect
    finally:
        shutil.rmtree(work / "runs/evaluate/dive")
        shutil.copytree(saved / "evaluate", work / "runs/evaluate/dive")
        shutil.copy(saved / "mlflow.json", work / "runs/mlflow/dive.json")
    assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout) == {}


def test_nothing_to_do_when_unchanged(project):
    """Right after `dvc repro`, `dvc status --json` is `{}`: no stage, dependency or output
    differs from dvc.lock (the check the other end-to-end tests make, not a word search in
    the human-readable text)."""
    work, env = project
    status = json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout)
    assert status == {}, status


def test_rerunning_an_unchanged_finetune_reruns_nothing_downstream(project):
    """Its outputs are deterministic (the wall time and host go to logs/, outside DVC), so a
    forced re-run leaves `dvc status` clean: selection, evaluate and report stay as they are."""
    work, env = project
    times = work / "logs/finetune/dive-lam10/4/seed0.json"
    before = json.loads(times.read_text())
    out = sh([sys.executable, "-m", "dvc", "repro", "-f", "-s", "finetune@dive-lam10-4"], work, env)
    assert "Running stage 'finetune@dive-lam10-4'" in out.stdout
    assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout) == {}
    after = json.loads(times.read_text())
    assert after["finished_at"] >= before["finished_at"] and after["wall_time_s"] > 0
    assert not list((work / "checkpoints/dive-lam10/4/seed0").glob("*.jsonl"))  # the step log is spent too
    assert metrics(work, "dive")["train/wall_time_s"] > 0  # evaluate read it from logs/


def _outputs(work: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(work)): (p.stat().st_mtime_ns, p.stat().st_size)
            for top in ("data", "models", "runs", "metrics", "reports") for p in (work / top).rglob("*") if p.is_file()}


# the mistakes of the issue, each through the command a user types. Two of them break dvc.yaml's
# matrix (sample.levels is what it expands), so DVC's parser would speak before any stage can:
# `python -m pipeline repro` (the README's command) checks params.yaml first, then runs `dvc repro`
PARSE_TIME = {"levels a string", "typo'd section key"}
REPRO_CASES = sorted(PARSE_TIME | {"unknown method", "misplaced top-level seeds", "a trial of a method not compared",
                                   "garbage weights file", "truncated weights file", "missing reference CSV",
                                   "cuda without CUDA"})


@pytest.mark.parametrize("case", REPRO_CASES)
def test_a_rejected_edit_deletes_nothing(project, tmp_path, case):
    """Each mistake stops `dvc repro` in its first stage (`check`) with one line naming the key
    or file, before any stage that owns outputs runs: no output is touched, and once the edit
    is undone nothing looks changed."""
    import re

    from tests.test_check import CASES, FILE_CASES, _files, _set

    work, env = project
    if case not in CASES:  # a machine with CUDA: nothing to refuse
        pytest.skip(f"{case}: not a mistake on this machine")
    original = (work / "params.yaml").read_text()
    edit, message = CASES[case]
    if case in FILE_CASES:
        section, key, name = FILE_CASES[case]
        edit = _set(section, key, str(_files(tmp_path)[name]))
    params = yaml.safe_load(original)
    edit(params)
    before = _outputs(work)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        cmd = ["-m", "pipeline", "repro"] if case in PARSE_TIME else ["-m", "dvc", "repro"]
        out = sh([sys.executable, *cmd], work, env, check=False)
        if case in PARSE_TIME:  # plain `dvc repro` stops in its parser: DVC's words, but nothing touched
            plain = sh([sys.executable, "-m", "dvc", "repro"], work, env, check=False)
            assert plain.returncode != 0 and "Running stage" not in plain.stdout
    finally:
        (work / "params.yaml").write_text(original)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), text[-3000:]
    assert "Traceback" not in text and "Running stage 'prepare'" not in out.stdout
    assert _outputs(work) == before  # nothing deleted, nothing rewritten
    if case == REPRO_CASES[-1]:
        assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout) == {}


def _runs(env):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("synthetic")
    return client, exp, {r.data.tags["run_key"]: r for r in client.search_runs([exp.experiment_id])}


def test_mlflow_one_run_per_level(project):
    """A parent run per method and level, one child per trial and seed (live from training),
    the evaluation added to the chosen trial's; one run per key, none piled up as deleted."""
    from mlflow.entities import ViewType

    work, env = project
    client, exp, runs = _runs(env)
    keys = [r.data.tags["run_key"] for r in client.search_runs([exp.experiment_id])]
    assert len(keys) == len(set(keys))  # one active run per (method, level, seed, trial)
    groups = {f"{m}/{lv}" for m in {**TRIALS, **VISION_TRIALS} for lv in ("4", "10%")}
    trained = {f"{t}/{lv}/seed0" for ts in {**TRIALS, **VISION_TRIALS}.values() for t in ts for lv in ("4", "10%")}
    soups = {f"dive+{kind}_soup/{lv}{seed}" for kind in ("uniform", "greedy") for lv in ("4", "10%")
             for seed in ("", "/seed0")}  # each soup's run and its row's parent run per level
    assert set(keys) == groups | trained | soups | {"report", "zeroshot/k0/seed0"}
    for key in trained:
        run = runs[key]
        method, level = run.data.tags["method"], run.data.tags["level"]
        assert run.data.tags["mlflow.parentRunId"] == runs[f"{method}/{level}"].info.run_id, key
        times = json.loads((work / "logs/finetune" / run.data.tags["trial"] / level / "seed0.json").read_text())
        assert run.info.end_time - run.info.start_time >= 1000 * times["wall_time_s"], key  # real duration
    chosen = json.loads((work / "runs/evaluate/dive/4/seed0/selection.json").read_text())["trial"]
    other = next(t for t in TRIALS["dive"] if t != chosen)
    dive, passed_over = runs[f"{chosen}/4/seed0"], runs[f"{other}/4/seed0"]
    assert dive.data.tags["selected"] == dive.data.tags["evaluated"] == "true"
    assert dive.data.tags["selection"] == "id_val" and dive.data.params["method"] == "dive"
    assert dive.data.params["hparams.lam"] == ("10.0" if chosen == "dive-lam10" else "100.0")
    assert dive.data.metrics["test/acc_avg"] == pytest.approx(metrics(work, "dive")["test/acc_avg"])
    # only the chosen trial shows test-split figures; the other shows what selection read
    assert "selected" not in passed_over.data.tags and "id_val/acc_avg" in passed_over.data.metrics
    assert not [k for k in passed_over.data.metrics if k.split("/")[0] in ("test", "id_test")]
    group = runs["dive/4"].data.metrics
    assert group["mean/test/acc_avg"] == pytest.approx(dive.data.metrics["test/acc_avg"]) and group["seeds"] == 1
    history = client.get_metric_history(runs["flyp-a/4/seed0"].info.run_id, "train/flyp_loss")
    assert [h.step for h in history] == list(range(1, 13))
    # re-running evaluate adds to the same training runs: nothing replaced, nothing deleted
    sh([sys.executable, "-m", "dvc", "repro", "-f", "-s", "evaluate@flyp"], work, env)
    _, _, again = _runs(env)
    assert again["flyp-a/4/seed0"].info.run_id == runs["flyp-a/4/seed0"].info.run_id
    assert again["flyp-a/4/seed0"].info.end_time > runs["flyp-a/4/seed0"].info.end_time
    assert not client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    record = json.loads((work / "runs/mlflow/flyp.json").read_text())
    assert record["runs"]["4/seed0"] == "flyp-a/4/seed0" and record["runs"]["4"] == "flyp/4"


def test_the_mlflow_store_shows_the_question(project):
    """The experiment opens on its training runs; each run carries a few dozen headline
    metrics (none of an empty group) with the full breakdown as a JSON artifact, the git
    commit with a dirty flag, and the k-shot sample as its dataset input; the report run draws
    each method's curve with the training-set size as the step."""
    work, env = project
    client, exp, runs = _runs(env)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for key, run in runs.items():
        m = run.data.metrics
        assert 5 <= len(m) <= 60 or key == "report", (key, len(m))
        assert run.data.tags["git_dirty"] in ("true", "false") and run.data.tags["mlflow.source.git.commit"]
        empty = {k.split("count_", 1)[1] for k, v in m.items() if "count_" in k and v == 0}
        assert not empty, (key, empty)
    chosen = json.loads((work / "runs/evaluate/dive/4/seed0/selection.json").read_text())["trial"]
    dive = runs[f"{chosen}/4/seed0"]
    full = metrics(work, "dive")
    assert len(full) > len(dive.data.metrics)  # the full breakdown is the artifact
    assert not [k for k, v in full.items() if "/count_" in k and v == 0]  # no empty group there either
    assert "metrics.json" in {a.path for a in client.list_artifacts(dive.info.run_id)}
    for key in ("test/acc_avg", "id_test/acc_avg", "selected/test/acc_avg", "selected/alpha", "rsa/image",
                "train/trainable_share", "train/wall_time_s", "train/peak_memory_mb"):
        assert key in dive.data.metrics, key
    inputs = dive.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "synthetic k=4 seed0"
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    report = runs["report"]
    for method in ("lp", "flyp", "dive"):
        curve = client.get_metric_history(report.info.run_id, f"curve/{method}/selected_ood")
        steps = [h.step for h in sorted(curve, key=lambda h: h.step)]
        assert len(steps) == 3 and steps[0] == 0 and steps[1] < steps[2], (method, steps)


def test_dvc_views_work_offline(project):
    """`dvc plots show` draws the report's figures (one line per method) with no external
    script; `dvc metrics show` prints one short row per method."""
    import re

    work, env = project
    sh([sys.executable, "-m", "dvc", "plots", "show", "-o", "plots_html"], work, env)
    html = (work / "plots_html/index.html").read_text()
    assert not re.findall(r"(?:src|href)=[\"']?https?://", html) and "cdn." not in html
    assert "ood_vs_shots.png" in html and "id_vs_shots.png" in html
    out = sh([sys.executable, "-m", "dvc", "metrics", "show"], work, env).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 160, out
    for method in ("lp", "flyp", "dive"):
        assert any(f"metrics/methods/{method}.json" in line for line in lines), out


def changed_after(work: Path, env: dict, edit) -> set[str]:
    """Stages `dvc status` would re-run after `edit(params)` (and trials.yaml regenerated, as
    `python -m pipeline repro` does); params and trials.yaml restored afterwards."""
    original = (work / "params.yaml").read_text()
    trials = (work / "trials.yaml").read_text()
    params = yaml.safe_load(original)
    edit(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        write_trials(work, env)
        return set(json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout))
    finally:
        (work / "params.yaml").write_text(original)
        (work / "trials.yaml").write_text(trials)


def test_a_new_search_value_runs_only_the_new_trial(project):
    work, env = project
    changed = changed_after(work, env, lambda p: p["finetune"]["trials"].update(
        {"dive-lam1000": {"method": "dive", "lam": 1000.0}}))
    assert {name for name in changed if name.startswith("finetune@")} == {
        "finetune@dive-lam1000-4", "finetune@dive-lam1000-10%"}, changed
    assert not {"prepare", "pretrained", "embed", "sample"} & changed, changed


def test_a_new_level_runs_only_new_entries(project):
    work, env = project
    changed = changed_after(work, env, lambda p: p["sample"].update(levels=[4, "10%", "20%"]))
    assert {"finetune@lp-a-20%", "finetune@dive-lam10-20%", "evaluate@flyp"} <= changed, changed
    assert not any(name.startswith("finetune@") and name.endswith(("-4", "-10%")) for name in changed), changed
    assert not {"prepare", "pretrained", "embed"} & changed


def test_new_method_trains_only_its_entries(project):
    work, env = project

    def add_ft(p):
        p["finetune"]["methods"].append("ft")
        p["finetune"]["trials"]["ft-a"] = {"method": "ft"}

    changed = changed_after(work, env, add_ft)
    assert {"finetune@ft-a-4", "evaluate@ft"} <= changed
    assert not {"finetune@lp-a-4", "finetune@flyp-a-4", "finetune@dive-lam10-4", "sample",
                "prepare", "pretrained", "embed"} & changed, changed


def test_another_protocol_retrains_nothing(project):
    work, env = project
    changed = changed_after(work, env, lambda p: p["evaluate"].update(selection="fewshot_val"))
    assert "selection" in changed and "report" in changed
    assert not any(name.startswith("finetune@") for name in changed), changed


def test_the_image_cache_follows_the_image_size(project):
    """Another architecture with the same input size rebuilds no image; a new image size
    rebuilds the cache at that size; going back gives the same cache, so nothing downstream
    re-runs."""
    work, env = project
    dvc = [sys.executable, "-m", "dvc"]
    index = lambda: json.loads((work / "data/images/index.json").read_text())  # noqa: E731
    before = index()
    original = (work / "params.yaml").read_text()

    def use(arch: str) -> None:
        params = yaml.safe_load(original)
        params["model"]["arch"] = arch
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    try:
        use("tiny-clip-narrow")
        sh([*dvc, "repro", "check"], work, env)
        changed = set(json.loads(sh([*dvc, "status", "--json"], work, env).stdout))
        assert "pretrained" in changed and "images" not in changed, changed
        use("tiny-clip-48")
        sh([*dvc, "repro", "images"], work, env)
        after = index()
        assert "size=48" in after["key"]["resize"] and "size=32" in before["key"]["resize"]
        main = after["collections"]["main"]
        assert main["bytes"] == main["images"] * 48 * 48 * 3 == before["collections"]["main"]["bytes"] * 48 ** 2 // 32 ** 2
    finally:
        (work / "params.yaml").write_text(original)
    sh([*dvc, "repro", "images"], work, env)
    assert index() == before
    assert json.loads(sh([*dvc, "status", "--json"], work, env).stdout) == {}


def _edit_params(work: Path, edit) -> str:
    """Apply `edit` to the project's params.yaml; returns the original text."""
    original = (work / "params.yaml").read_text()
    params = yaml.safe_load(original)
    edit(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return original


def _status(work: Path, env: dict) -> set[str]:
    return set(json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout))


def test_a_weights_file_rewritten_in_place_reruns_what_reads_it(project, tmp_path):
    """model.pretrained names a file outside the project; other weights written at the same
    path make `dvc status` list `pretrained`, and `dvc repro` copies the new weights."""
    import torch
    from safetensors.torch import load_file, save_file

    work, env = project
    dvc = [sys.executable, "-m", "dvc"]
    weights = tmp_path / "weights.safetensors"
    state = load_file(str(work / "models/pretrained/model.safetensors"))
    save_file(state, str(weights))
    original = _edit_params(work, lambda p: p["model"].__setitem__("pretrained", str(weights)))
    try:
        sh([*dvc, "repro", "pretrained"], work, env)
        assert not {"check", "pretrained"} & _status(work, env)
        save_file({k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}, str(weights))
        changed = _status(work, env)
        assert {"check", "pretrained"} <= changed and "prepare" not in changed, changed
        out = sh([*dvc, "repro", "pretrained"], work, env).stdout
        assert "Running stage 'pretrained'" in out, out
        copied = load_file(str(work / "models/pretrained/model.safetensors"))
        key = next(k for k, v in state.items() if v.is_floating_point())
        assert torch.equal(copied[key], state[key] + 1.0)
        assert {"embed", "finetune@lp-a-4"} <= _status(work, env)  # and on down the DAG
    finally:
        (work / "params.yaml").write_text(original)
    sh([*dvc, "repro", "pretrained"], work, env)  # the built-in weights, back from DVC's run cache
    assert _status(work, env) == set()


def test_a_reference_csv_rewritten_in_place_reruns_what_reads_it(project, tmp_path):
    """reference.csv names a CSV outside the project: a caption or an image rewritten at the
    same path re-runs `prepare`, whose manifest carries the digest to every stage reading the
    reference set."""
    import shutil

    work, env = project
    dvc = [sys.executable, "-m", "dvc"]
    images = sorted((work / "data/prepared/reference").rglob("*.png"))[:40]
    assert len(images) == 40
    (tmp_path / "img").mkdir()
    rows = ["filepath,title"]
    for i, f in enumerate(images):
        shutil.copy(f, tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a picture number {i}")
    csv = tmp_path / "captions.csv"
    csv.write_text("\n".join(rows) + "\n")
    original = _edit_params(work, lambda p: p["reference"].__setitem__("csv", str(csv)))
    manifest = lambda: json.loads((work / "data/prepared/manifest.json").read_text())["sha256"]  # noqa: E731
    try:
        sh([*dvc, "repro", "prepare"], work, env)
        assert "prepare" not in _status(work, env)
        before = manifest()
        csv.write_text(csv.read_text().replace("number 3\n", "number three\n"))  # same path, another caption
        assert {"check", "prepare"} <= _status(work, env)
        assert "Running stage 'prepare'" in sh([*dvc, "repro", "prepare"], work, env).stdout
        after_csv = manifest()
        assert after_csv != before
        shutil.copy(tmp_path / "img" / "39.png", tmp_path / "img" / "0.png")  # an image rewritten in place
        assert "prepare" in _status(work, env)
        sh([*dvc, "repro", "prepare"], work, env)
        assert manifest() not in (before, after_csv)
    finally:
        (work / "params.yaml").write_text(original)
    sh([*dvc, "repro", "prepare"], work, env)
    assert _status(work, env) == set()


def test_check_changes_nothing_and_clean_removes_what_no_stage_owns(project):
    """`python -m pipeline check` validates only (no output rewritten, `dvc status` clean);
    `clean --dry-run` lists a removed trial's leftovers, `clean` removes them and nothing else."""
    work, env = project
    before = _outputs(work)
    sh([sys.executable, "-m", "pipeline", "check"], work, env)
    assert _outputs(work) == before and _status(work, env) == set()
    gone = [work / "runs/finetune/gone-a/4/seed0", work / "checkpoints/gone-a/4/seed0", work / "runs/evaluate/gone"]
    for d in gone:
        d.mkdir(parents=True)
        (d / "weights.safetensors").write_bytes(b"old")
    (work / "logs/finetune/gone-a/4").mkdir(parents=True)
    listed = sh([sys.executable, "-m", "pipeline", "clean", "--dry-run"], work, env).stdout.splitlines()
    assert sorted(listed) == sorted(f"would remove {p}" for p in (
        "runs/finetune/gone-a/4", "checkpoints/gone-a/4", "logs/finetune/gone-a/4", "runs/evaluate/gone")), listed
    assert all(d.exists() for d in gone)
    sh([sys.executable, "-m", "pipeline", "clean"], work, env)
    assert not any(d.exists() for d in gone) and not (work / "runs/finetune/gone-a").exists()
    assert _outputs(work) == before and _status(work, env) == set()


def changed_after_code_edit(work: Path, env: dict, rel: str) -> set[str]:
    """Stages `dvc status` would re-run after editing the library file `rel` (restored after)."""
    path = work / rel
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        return set(json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout))
    finally:
        path.write_text(original)


def test_code_edits_rerun_the_stages_that_run_that_code(project):
    work, env = project
    assert changed_after_code_edit(work, env, "pipeline/report/plots.py") == {"report"}
    # a method's code: the check stage re-runs (its records of dive's trials and of dive
    # change), then exactly dive's entries (tests/test_e2e_seeds.py: the full set after check)
    changed = changed_after_code_edit(work, env, "pipeline/methods/dive.py")
    assert changed == {"check", "report"}, changed
    # the WiSE-FT merge: every evaluate entry notices (it was missing from evaluate's deps once)
    changed = changed_after_code_edit(work, env, "pipeline/models/weights.py")
    assert {"evaluate@flyp", "evaluate@lp"} <= changed, changed
    # the selection rule: the selection stage (and what reads its records), no training
    changed = changed_after_code_edit(work, env, "pipeline/evaluation/selection.py")
    assert "selection" in changed and not any(n.startswith(("prepare", "pretrained")) for n in changed), changed


def test_a_kill_while_logging_leaves_nothing_finished_looking(project):
    """SIGKILL evaluate while it logs to MLflow: no metrics.json of the method looks finished,
    no run is left RUNNING and the run being added to says `evaluated: partial`; `dvc repro`
    then completes cleanly with one finished run per key."""
    import signal

    work, env = project
    marker = work / "logging.started"
    script = (
        "import sys, time, pathlib\n"
        "from mlflow.tracking import MlflowClient\n"
        "real = MlflowClient.log_batch\n"
        "def slow(self, *a, **k):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('x')\n"
        "    real(self, *a, **k)\n"
        "    time.sleep(120)\n"
        "MlflowClient.log_batch = slow\n"
        "from pipeline.stages import evaluate\n"
        "evaluate.main(['--method', 'lp'])\n")
    proc = start_until(script, marker, work, env, "evaluate never reached MLflow logging")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = lambda: [p for p in (work / "runs/evaluate/lp").rglob("metrics.json") if ".staging" not in p.parts]  # noqa: E731
    assert not finished()  # (the staged copy MLflow was logging sits in a hidden .staging folder)
    client, exp, runs = _runs(env)
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert runs["lp-a/4/seed0"].data.tags["evaluated"] == "partial"  # the run says it was cut short
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    # evaluate runs again (its MLflow record is a persistent output, so DVC's run cache never
    # restores it behind MLflow's back) and completes the runs
    assert "Running stage 'evaluate@lp'" in out.stdout
    assert len(finished()) == 2 and not list((work / "runs/evaluate/lp").rglob(".staging"))  # levels 4, 10%
    keys = [r.data.tags["run_key"] for r in client.search_runs([exp.experiment_id])]
    _, _, runs = _runs(env)
    assert len(keys) == len(set(keys)) and {r.info.status for r in runs.values()} == {"FINISHED"}
    assert runs["lp-a/4/seed0"].data.tags["evaluated"] == runs["lp-a/10%/seed0"].data.tags["evaluated"] == "true"


def test_training_is_live_in_mlflow_and_a_killed_run_resumes_into_one_run(project):
    """A training run shows its losses in MLflow while it trains (beside the finished run it
    will replace); SIGKILLed at step 8, it is marked KILLED (never left RUNNING); `dvc repro`
    resumes from the step-6 checkpoint into one run that keeps the first start time, every step
    once, and (the weights being bit-identical) the evaluation, with nothing downstream re-run."""
    import signal

    work, env = project
    marker = work / "training.live"
    script = (
        "import pathlib, time\n"
        "from pipeline.core import tracking\n"
        "real = tracking.LiveRun.log_step\n"
        "def slow(self, step, values, prefix='train/'):\n"
        "    real(self, step, values, prefix)\n"
        "    if step == 8:\n"
        "        self.flush()\n"
        f"        pathlib.Path({str(marker)!r}).write_text(self.run_id)\n"
        "        time.sleep(300)\n"
        "tracking.LiveRun.log_step = slow\n"
        "from pipeline.stages import finetune\n"
        "finetune.main(['--trial', 'flyp-a', '--level', '4'])\n")
    _, _, before = _runs(env)
    proc = start_until(script, marker, work, env, "finetune never reached step 8")
    client, exp, _ = _runs(env)
    live = client.get_run(marker.read_text())
    assert live.info.status == "RUNNING" and live.data.tags["run_key"] == "flyp-a/4/seed0"
    assert [h.step for h in client.get_metric_history(live.info.run_id, "train/loss")] == list(range(1, 9))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sh([sys.executable, "-c", "from pipeline.core import tracking; tracking.find_run('synthetic', 'x', {})"], work, env)
    assert client.get_run(live.info.run_id).info.status == "KILLED"
    out = sh([sys.executable, "-m", "dvc", "repro"], work, env)
    assert "Running stage 'finetune@flyp-a-4'" in out.stdout and "Running stage 'evaluate@flyp'" not in out.stdout
    keys = [r.data.tags["run_key"] for r in client.search_runs([exp.experiment_id])]
    assert len(keys) == len(set(keys))  # the finished run it replaced is gone
    _, _, runs = _runs(env)
    run = runs["flyp-a/4/seed0"]
    assert run.info.status == "FINISHED" and run.info.start_time == live.info.start_time
    assert [h.step for h in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 13))
    assert run.data.tags["evaluated"] == "true"  # carried over: the same weights as the evaluated run
    assert run.data.metrics["test/acc_avg"] == before["flyp-a/4/seed0"].data.metrics["test/acc_avg"]
    assert set(runs) == set(before)
    assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout) == {}
