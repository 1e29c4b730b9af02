"""End to end through a tracking server: the real stages under `dvc repro` on a tiny project,
logging to the `mlflow server` the cluster controller starts (pipeline.cluster.mlflow_server),
then the project's sqlite store read directly once the server stopped, as a later local stage
or `pipeline ui` reads it."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from pipeline.cluster.mlflow_server import tracking_server
from tests.e2e_project import ROOT, copy_pipeline, init_and_repro, merge, sh

pytestmark = pytest.mark.slow

TINY = {
    "prepare": {"synthetic": {"n_train": 300, "n_id_val": 60, "n_id_test": 60, "n_val": 60,
                              "n_test": 60, "n_heldout": 100, "n_corpus": 1000}},
    "pretrained": {"builtin": {"steps": 30, "batch_size": 32, "warmup": 5}},
    "reference": {"max_samples": 100},
    "embed": {"iimm_samples": 100},
    "sample": {"levels": [4], "seeds": [0]},
    "finetune": {"methods": ["lp"], "trials": {"lp-a": {"method": "lp"}},
                 "train": {"epochs": 1.0, "min_steps": 4, "max_steps": 4, "batch_size": 16,
                           "checkpoint_every": 2}},
    "evaluate": {"wise_alphas": [0.0, 1.0], "rsa_samples": 50},
}



def test_the_stages_log_to_the_server_and_the_store_reads_the_same_without_it(tmp_path, monkeypatch):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    work = tmp_path / "project"
    work.mkdir()
    env = copy_pipeline(work)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    local_uri = env["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_uri)
    with tracking_server(work) as server:
        assert server.uri.startswith("http://127.0.0.1:")
        init_and_repro(work, {**env, **server.env})
        served = MlflowClient(server.uri)
        exp = served.get_experiment_by_name("synthetic")
        keys = {r.data.tags["run_key"]: r.info.status for r in served.search_runs([exp.experiment_id])}
        assert keys["lp-a/4/seed0"] == "FINISHED" and "report" in keys, keys
    # the store without the server: what the stages logged, artifacts at paths a local client reads
    client = MlflowClient(local_uri)
    exp = client.get_experiment_by_name("synthetic")
    runs = {r.data.tags["run_key"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"lp/4", "lp-a/4/seed0", "zeroshot/k0/seed0", "report"}, sorted(runs)
    trained = runs["lp-a/4/seed0"]
    assert trained.info.status == "FINISHED"
    assert trained.data.tags["selected"] == trained.data.tags["evaluated"] == "true"
    assert trained.info.artifact_uri.removeprefix("file://").startswith(f"{work}/mlruns/")
    local_metrics = json.loads((work / "runs/evaluate/lp/4/seed0/metrics.json").read_text())
    assert trained.data.metrics["test/acc_avg"] == pytest.approx(local_metrics["test/acc_avg"])
    path = client.download_artifacts(trained.info.run_id, "metrics.json", str(tmp_path / "dl"))
    assert json.loads(open(path).read())["test/acc_avg"] == pytest.approx(local_metrics["test/acc_avg"])
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert not client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    # and DVC has nothing left to do
    status = sh([sys.executable, "-m", "dvc", "status", "--json"], work, {**env, "MLFLOW_TRACKING_URI": local_uri})
    assert json.loads(status.stdout or "{}") == {}, status.stdout
    assert os.environ["MLFLOW_TRACKING_URI"] == local_uri
