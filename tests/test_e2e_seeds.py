"""End to end, through real DVC, on a tiny project with two seeds per entry: the results do not
depend on the machine's thread count (params' `threads` sets it)."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e_project import ROOT, copy_pipeline, init_and_repro, sh

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


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = v if k == "trials" or not isinstance(v, dict) else _merge(out.get(k) or {}, v)
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("seeds")
    env = copy_pipeline(work)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SMALL)
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


def _runs(env) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("synthetic")
    return {r.data.tags["run_key"]: r for r in client.search_runs([exp.experiment_id])}
