"""End to end, through real DVC, on a tiny project with two seeds per entry: the results do not
depend on the machine's thread count (params' `threads` sets it), and a finetune entry killed
during its second seed re-runs only that seed, to the bits of an uninterrupted run; an edit of
one method's file re-runs only that method's entries."""

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e_project import ROOT, copy_pipeline, init_and_repro, merge, sh, start_until

pytestmark = pytest.mark.slow

SMALL = {
    "prepare": {"synthetic": {"n_train": 300, "n_id_val": 60, "n_id_test": 60, "n_val": 60,
                              "n_test": 60, "n_heldout": 100, "n_corpus": 1500}},
    "pretrained": {"builtin": {"steps": 60, "batch_size": 64, "warmup": 6}},
    "reference": {"max_samples": 100},
    "retention": {"max_samples": 60},
    "embed": {"iimm_samples": 60},
    "sample": {"levels": [4], "seeds": [0, 1]},
    "finetune": {"methods": ["lp", "flyp"],
                 "trials": {"lp-a": {"method": "lp"}, "flyp-a": {"method": "flyp"}},
                 "train": {"epochs": 1.0, "min_steps": 12, "max_steps": 12, "batch_size": 16,
                           "checkpoint_every": 6}},
    "evaluate": {"wise_alphas": [0.5, 1.0], "rsa_samples": 50},
}
ENTRY = "finetune@flyp-a-4"



@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("seeds")
    env = copy_pipeline(work)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SMALL)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_and_repro(work, env)
    return work, env


def _digests(work: Path, trial: str = "flyp-a") -> dict[str, str]:
    """SHA-256 of every file of the entry's DVC output (weights, config, scores, logs)."""
    root = work / "runs/finetune" / trial / "4"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _status(work: Path, env: dict) -> dict:
    return json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout)


def test_the_weights_do_not_depend_on_the_machines_thread_count(project):
    """The same params with OMP_NUM_THREADS=1, unset (torch then takes every core) and 3 give
    the same bits; the count used is recorded with the run."""
    work, env = project
    before = _digests(work)
    assert any(k.endswith("weights.safetensors") for k in before)
    for omp in ("1", None, "3"):
        run_env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if omp is not None:
            run_env["OMP_NUM_THREADS"] = omp
        out = sh([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", ENTRY], work, run_env)
        assert f"Running stage '{ENTRY}'" in out.stdout
        assert _digests(work) == before, f"OMP_NUM_THREADS={omp} changed the weights"
    config = json.loads((work / "runs/finetune/flyp-a/4/seed1/config.json").read_text())
    assert config["threads"] == 1
    info = json.loads((work / "models/pretrained/info.json").read_text())
    assert info["threads"] == 1
    assert _status(work, env) == {}
    assert _runs(env)["flyp-a/4/seed1"].data.params["threads"] == "1"


def test_a_kill_during_the_second_seed_retrains_only_that_seed(project):
    """The entry trains afresh and is SIGKILLed at step 8 of seed 1 (seed 0 finished); `dvc
    repro` (which deletes the entry's output folder first) restores seed 0 from its kept copy
    without training it (its log line, its run-time record untouched), resumes seed 1 from its
    step-6 checkpoint, and ends with every file bit-identical to the uninterrupted run."""
    work, env = project
    uninterrupted = _digests(work)
    # as if the entry had never run: no outputs, no checkpoints
    shutil.rmtree(work / "runs/finetune/flyp-a/4")
    shutil.rmtree(work / "checkpoints/flyp-a/4", ignore_errors=True)
    marker = work / "seed1.step8"
    script = (
        "import pathlib, time\n"
        "from pipeline.core import tracking\n"
        "real = tracking.LiveRun.log_step\n"
        "seen = []\n"
        "def slow(self, step, values, prefix='train/'):\n"
        "    real(self, step, values, prefix)\n"
        "    if step == 8:\n"
        "        seen.append(step)\n"
        "        if len(seen) == 2:  # the second seed\n"
        f"            pathlib.Path({str(marker)!r}).write_text('x')\n"
        "            time.sleep(300)\n"
        "tracking.LiveRun.log_step = slow\n"
        "from pipeline.stages import finetune\n"
        "finetune.main(['--trial', 'flyp-a', '--level', '4'])\n")
    proc = start_until(script, marker, work, env, "finetune never reached step 8 of seed 1")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = work / "checkpoints/flyp-a/4"
    assert (ckpt / "seed0/finished/manifest.json").is_file() and (ckpt / "seed1/last.pt").is_file()
    assert not (work / "runs/finetune/flyp-a/4/seed1/train_summary.json").exists()
    seed0_time = (work / "logs/finetune/flyp-a/4/seed0.json").read_text()  # written when seed 0 trained

    out = sh([sys.executable, "-m", "dvc", "repro"], work, env)
    log = out.stdout + out.stderr
    assert f"Running stage '{ENTRY}'" in log
    assert "seed 0: finished earlier, restored" in log and "seed 1: finished earlier" not in log, log[-3000:]
    assert (work / "logs/finetune/flyp-a/4/seed0.json").read_text() == seed0_time  # seed 0 did not train
    assert _digests(work) == uninterrupted
    assert not list(ckpt.rglob("finished")) and not list(ckpt.rglob("last.pt"))  # spent once the entry is done
    runs = _runs(env)
    assert {runs[f"flyp-a/4/seed{s}"].info.status for s in (0, 1)} == {"FINISHED"}
    assert _status(work, env) == {}


def _runs(env) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("synthetic")
    return {r.data.tags["run_key"]: r for r in client.search_runs([exp.experiment_id])}


def _changed_after_edit(work: Path, env: dict, rel: str) -> set[str]:
    """What `dvc status` lists once the check stage has rewritten its records (the first thing
    `dvc repro` does) after a comment is appended to `rel`; the edit is undone after."""
    path = work / rel
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        sh([sys.executable, "-m", "dvc", "repro", "check"], work, env)
        return set(_status(work, env))
    finally:
        path.write_text(original)
        sh([sys.executable, "-m", "dvc", "repro", "check"], work, env)


def test_an_edit_of_one_method_reruns_only_that_method(project):
    """Appending a comment to a method's file changes only its records: `dvc status` lists
    its finetune entries, its evaluate entry and the report (which draws every method), not
    the other method's entries, nor `vision` (it reads only which methods are vision-only)."""
    work, env = project
    assert _changed_after_edit(work, env, "pipeline/methods/flyp.py") == {"finetune@flyp-a-4", "evaluate@flyp",
                                                                          "report"}
    assert _changed_after_edit(work, env, "pipeline/methods/lp.py") == {"finetune@lp-a-4", "evaluate@lp", "report"}
    # the methods' shared code: every method that imports it
    assert _changed_after_edit(work, env, "pipeline/methods/common.py") == {
        "finetune@flyp-a-4", "finetune@lp-a-4", "evaluate@flyp", "evaluate@lp", "report"}
    record = json.loads((work / "data/trials/flyp-a.json").read_text())
    assert record["method"] == "flyp" and "pipeline/methods/flyp.py" in record["code"]
    assert "pipeline/methods/lp.py" not in record["code"]
    assert _status(work, env) == {}  # each edit undone: the records are as before
