"""The few-shot baselines of issue 29 (clip_lora, lp_pp, clap, maple, vpt_deep, adaptformer, coop,
cocoop, tip_adapter, tip_adapter_f) end to end through `dvc repro` on the built-in data with tiny
params: each trains (tip_adapter builds its cache), is selected and evaluated, and its metrics
and MLflow run exist; the cache models' post-hoc settings are chosen on the protocol's
validation split and evaluated at."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tests.e2e_project import ROOT, copy_pipeline, init_and_repro, merge
from tests.test_e2e import TINY as E2E_TINY

pytestmark = pytest.mark.slow

NEW = ("clip_lora", "lp_pp", "clap", "maple", "vpt_deep", "adaptformer", "coop", "cocoop", "tip_adapter",
       "tip_adapter_f")
WEIGHT_SPACE = {"clip_lora", "adaptformer"}  # the evaluate stage sweeps their α
TRAINING_FREE = ("tip_adapter",)



# the e2e data sizes; one level: ten methods' entries are the test's cost (the levels' own logic is test_levels')
TINY = merge(E2E_TINY, {
    "sample": {"levels": [4], "seeds": [0]},
    "finetune": {"methods": list(NEW),
                 "trials": {"clip_lora-a": {"method": "clip_lora"}, "lp_pp-a": {"method": "lp_pp"},
                            "clap-a": {"method": "clap", "views": 3}, "maple-a": {"method": "maple"},
                            "vpt_deep-a": {"method": "vpt_deep"}, "adaptformer-a": {"method": "adaptformer"},
                            # CoOp's paper context (16 tokens) just fits tiny-clip's 20 positions
                            "coop-a": {"method": "coop"}, "cocoop-a": {"method": "cocoop"},
                            "tip_adapter-a": {"method": "tip_adapter", "views": 2, "beta_steps": 8, "alpha_steps": 4},
                            "tip_adapter_f-a": {"method": "tip_adapter_f", "views": 2, "epochs": 3, "beta_steps": 8,
                                                "alpha_steps": 4}},
                 "train": {"epochs": 1.0, "min_steps": 6, "max_steps": 6, "batch_size": 16,
                           "checkpoint_every": 3}},
    "evaluate": {"wise_alphas": [0.0, 1.0], "rsa_samples": 150, "soups": []},
})


def test_fewshot_baselines_through_dvc_repro(tmp_path):
    env = copy_pipeline(tmp_path)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_and_repro(tmp_path, env)
    for method in NEW:
        for level in ("4",):
            m = json.loads((tmp_path / "runs/evaluate" / method / level / "seed0" / "metrics.json").read_text())
            acc = m["id_test/acc_avg"]
            assert math.isfinite(acc) and 0 <= acc <= 1, (method, level, acc)
            assert (m["train/trainable_params"] > 0) == (method not in TRAINING_FREE)
            # the WiSE-FT sweep for the weight-space ones only (AdaptFormer's α scales its branch)
            assert ("wise/0/id_test/acc_avg" in m) == (method in WEIGHT_SPACE), (method, sorted(m)[:10])
    # the cache models: α, β (and Tip-Adapter-F's epoch) chosen by finetune on the protocol's
    # split (auto = id_val here), carried by selection, evaluated at
    for method in ("tip_adapter", "tip_adapter_f"):
        for level in ("4",):
            scores = json.loads((tmp_path / "runs/finetune" / f"{method}-a" / level / "seed0" / "scores.json").read_text())
            chosen = {k.split("/")[-1]: v for k, v in scores.items() if k.startswith("posthoc/id_val/")}
            assert set(chosen) == ({"alpha", "beta", "epoch"} if method == "tip_adapter_f" else {"alpha", "beta"})
            assert not any(k.startswith("posthoc/") and "test" in k for k in scores), sorted(scores)
            sel = json.loads((tmp_path / "runs/evaluate" / method / level / "seed0" / "selection.json").read_text())
            assert sel["posthoc"] == chosen and sel["split"] == "id_val", (sel["posthoc"], chosen)
            m = json.loads((tmp_path / "runs/evaluate" / method / level / "seed0" / "metrics.json").read_text())
            assert m["id_val/acc_avg"] == pytest.approx(scores["id_val/acc_avg"], abs=1e-6)  # at the same setting
