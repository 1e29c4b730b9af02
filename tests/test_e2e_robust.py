"""End to end for issue 28's baselines: `dvc repro` on the built-in data with the real stages
and a real MLflow store, each new method at one level and seed (the smallest run that shows the
method wired through finetune, selection and evaluate, reference cache included)."""

import json
import math

import pytest
import yaml

from pipeline.methods import METHODS
from tests.e2e_project import ROOT, copy_pipeline, init_and_repro
from tests.test_e2e import TINY, merge

pytestmark = pytest.mark.slow

NEW = ["flyp_replay", "snd", "lipsum_ft", "clipood", "arf", "carot", "ftp", "model_stock"]
ROBUST = {
    "sample": {"levels": [4], "seeds": [0]},
    "finetune": {"methods": NEW, "trials": {f"{m}-a": {"method": m} for m in NEW},
                 "train": {"epochs": 1.0, "min_steps": 6, "max_steps": 6, "batch_size": 16, "checkpoint_every": 3}},
}


def test_each_new_method_runs_through_dvc_repro(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    env = copy_pipeline(work)
    params = merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), ROBUST)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_and_repro(work, env)
    for method in NEW:
        run = work / "runs/finetune" / f"{method}-a" / "4" / "seed0"
        assert (run / "weights.safetensors").exists(), method
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["steps"] == 6 and summary.get("runs", 1) == METHODS[method].n_runs, method
        got = json.loads((work / "runs/evaluate" / method / "4" / "seed0" / "metrics.json").read_text())
        assert {"id_test/acc_avg", "test/acc_avg", "rsa/image", "rsa/text", "selected/alpha"} <= got.keys(), method
        assert all(math.isfinite(got[k]) for k in ("id_test/acc_avg", "test/acc_avg", "rsa/image")), method
    assert (work / "reports/summary.md").exists()
