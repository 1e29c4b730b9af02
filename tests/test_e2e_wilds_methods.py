"""Issues 28 and 29's eighteen methods end to end through `dvc repro` on a real-format WILDS
fixture with a real open_clip architecture (random weights).

On the built-in data the recipes run them (benchmarks/robust.sh, benchmarks/fewshot.sh: every
level and seed, through `dvc repro`); this test replaces the two built-in e2e tests that ran the
same 36 stages on the tiny CLIP (their checks are here), and runs them where a user runs them:
Camelyon17 in its WILDS v1.0 layout (tests/data/wilds_fixtures.py), read by the real `wilds`
class and scored by its official `eval` (acc_avg, acc_wg), with an ID validation split (the
protocol's `auto` selection: id_val) and two OOD splits (val, test); and open_clip's
ViT-S-32-alt (224 px, its own ViT towers: the cheapest config that MaPLe, VPT-deep and
AdaptFormer accept) with random weights saved to a file as `model.pretrained`. ARF reads a
captions file, as on any real dataset.

One `dvc repro`, one trial of each method at one level and seed, a few steps: the smallest run
that shows each method wired through check, finetune, selection, evaluate and the report on a
real dataset and architecture. Retention is `auto`: with no other WILDS dataset under the root
there is no task (the report says how to add one). Finetune scores every validation split
(id_val, the OOD val, the few-shot one); evaluate scores the test split and the protocol's
id_val, never selecting on a test split.

Cost: ~12 min alone on a 2-core CPU shared with other work (load 2-3.5). It is the 36 model
stages (18 finetune, 18 evaluate), each a process paying ~10 s before and after its work (torch,
open_clip, torchvision, wilds and MLflow imports, MLflow's sqlite store, DVC's bookkeeping); the
model work itself (two steps, a few dozen 224-px images through ViT-S-32) is 1-3 s a stage (snd,
the heaviest, 13 s).
"""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import yaml

from pipeline.methods import METHODS
from tests.data.wilds_fixtures import make_camelyon17
from tests.e2e_project import ROOT, copy_pipeline, init_and_repro, merge

pytestmark = pytest.mark.slow

ARCH = "ViT-S-32-alt"  # open_clip's smallest ViT config: ViT towers for MaPLe, VPT-deep, AdaptFormer
ROBUST = ("flyp_replay", "snd", "lipsum_ft", "clipood", "arf", "carot", "ftp", "model_stock")
FEWSHOT = ("clip_lora", "lp_pp", "clap", "maple", "vpt_deep", "adaptformer", "coop", "cocoop", "tip_adapter",
           "tip_adapter_f")
NEW = ROBUST + FEWSHOT
TRAINING_FREE = ("tip_adapter",)
LEVEL = "4"
STEPS = 2
# cheap settings of the few-shot e2e (views, grids, epochs); ARF's captions file is added per test
CHEAP = {"clap": {"views": 3}, "tip_adapter": {"views": 2, "beta_steps": 8, "alpha_steps": 4},
         "tip_adapter_f": {"views": 2, "epochs": 3, "beta_steps": 8, "alpha_steps": 4}}


def _captions(wilds_root, path) -> None:
    """A captions file (filepath,title) naming every image as Camelyon17's metadata lists it."""
    from pipeline.data.captions import image_key
    from pipeline.data.datasets import load_dataset

    dataset = load_dataset("camelyon17", wilds_root)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for row in range(len(dataset)):
            tissue = "tumor" if int(dataset.y_array[row]) else "healthy"
            writer.writerow([image_key(dataset, row), f"an H&E stained patch of {tissue} lymph node tissue"])


def _params(wilds_root, weights, captions) -> dict:
    trials = {f"{m}-a": {"method": m, **CHEAP.get(m, {})} for m in NEW}
    trials["arf-a"]["captions"] = str(captions)
    return {
        "dataset": {"name": "camelyon17", "root": str(wilds_root), "download": False},
        "model": {"arch": ARCH, "pretrained": str(weights)},
        "prepare": {"synthetic": {"n_corpus": 40}},  # the built-in reference corpus: DiVE's set, RSA's probes
        "reference": {"max_samples": 40},
        "embed": {"iimm_samples": 16},
        "sample": {"levels": [int(LEVEL)], "seeds": [0]},
        "finetune": {"methods": list(NEW), "trials": trials,
                     "train": {"epochs": 1.0, "min_steps": STEPS, "max_steps": STEPS, "batch_size": 8,
                               "checkpoint_every": STEPS}},
        "evaluate": {"wise_alphas": [1.0], "rsa_samples": 16, "soups": []},
    }


def test_each_new_method_runs_on_a_wilds_fixture_with_a_real_arch(tmp_path):
    import open_clip
    import torch

    from pipeline import models

    work = tmp_path / "project"
    work.mkdir()
    env = copy_pipeline(work)
    wilds_root = make_camelyon17(tmp_path / "wilds")
    captions = tmp_path / "camelyon17_captions.csv"
    _captions(wilds_root, captions)
    torch.manual_seed(0)
    weights = tmp_path / f"{ARCH}-random.safetensors"
    models.save_state_dict(open_clip.create_model(ARCH, pretrained=None).state_dict(), weights)

    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), _params(wilds_root, weights, captions))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_and_repro(work, env)

    info = json.loads((work / "data/prepared/dataset.json").read_text())
    assert info["n_classes"] == 2
    for method in NEW:
        run = work / "runs/finetune" / f"{method}-a" / LEVEL / "seed0"
        assert (run / "weights.safetensors").exists(), method
        summary = json.loads((run / "train_summary.json").read_text())
        if method not in TRAINING_FREE:
            assert summary["steps"] == STEPS and summary.get("runs", 1) == METHODS[method].n_runs, (method, summary)
        config = json.loads((run / "config.json").read_text())
        assert config["arch"] == ARCH and config["pretrained"] == str(weights), method
        # finetune scores the validation splits (ID, OOD, few-shot) with the official eval, never a test split
        scores = json.loads((run / "scores.json").read_text())
        for key in ("id_val/acc_avg", "id_val/acc_wg", "val/acc_avg", "fewshot_val/acc_avg"):
            assert key in scores and math.isfinite(scores[key]), (method, key, sorted(scores)[:20])
        assert not any("test" in k for k in scores), (method, sorted(scores))
        # selected on the protocol's split (auto = Camelyon17's id_val), never a test split
        sel = json.loads((work / "runs/evaluate" / method / LEVEL / "seed0" / "selection.json").read_text())
        assert sel["protocol"] == "id_val" and sel["split"] == "id_val" and sel["trial"] == f"{method}-a", sel
        got = json.loads((work / "runs/evaluate" / method / LEVEL / "seed0" / "metrics.json").read_text())
        # the official eval on the OOD test split and the protocol's split: Camelyon17's acc_avg
        # and its worst group (slide); the OOD val is finetune's (scores.json), not evaluate's
        for key in ("id_val/acc_avg", "id_val/acc_wg", "test/acc_avg", "test/acc_wg", "rsa/image"):
            assert key in got and math.isfinite(got[key]), (method, key, sorted(got)[:20])
        assert any(k.startswith("test/acc_slide:") for k in got), method  # wilds' per-group breakdown
        assert 0 <= got["test/acc_wg"] <= got["test/acc_avg"] <= 1, method
        assert got["id_val/acc_avg"] == pytest.approx(sel["score"], abs=1e-6), method  # the score it was selected by
        assert (got["train/trainable_params"] > 0) == (method not in TRAINING_FREE), method
        assert "rsa/text" in got and (method not in ROBUST or "selected/alpha" in got), method
    # the cache models: α, β (and Tip-Adapter-F's epoch) chosen by finetune on the protocol's
    # split (auto = id_val), carried by selection, evaluated at
    for method in ("tip_adapter", "tip_adapter_f"):
        scores = json.loads((work / "runs/finetune" / f"{method}-a" / LEVEL / "seed0" / "scores.json").read_text())
        chosen = {k.split("/")[-1]: v for k, v in scores.items() if k.startswith("posthoc/id_val/")}
        assert set(chosen) == ({"alpha", "beta", "epoch"} if method == "tip_adapter_f" else {"alpha", "beta"})
        sel = json.loads((work / "runs/evaluate" / method / LEVEL / "seed0" / "selection.json").read_text())
        assert sel["posthoc"] == chosen, (sel["posthoc"], chosen)
    md = (work / "reports/summary.md").read_text()
    for method in NEW:
        assert re.search(rf"^\| {method} +\|", md, re.M), method
