"""benchmarks/device_check.sh in its CI-sized form on the CPU (tiny-clip, a step or two), and
benchmarks/check_ddp.py with gloo: the GPU check is ready to run, and what it writes is
well-formed. The CI form exercises every section's script and the figures' checks; only the
sizes, the device and the DDP section (skipped: no 2 GPUs here) differ on a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"precision", "steps", "eval", "ddp"}


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_device_check_ci_form_writes_well_formed_figures(tmp_path):
    out = tmp_path / "figures"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), str(out), "--ci"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("env.txt", "summary.json", "summary.md", *(f"{s}.json" for s in SECTIONS),
                 *(f"{s}.md" for s in SECTIONS - {"ddp"})):
        assert (out / name).is_file(), name

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "ci" and set(summary["sections"]) == SECTIONS
    for name, s in summary["sections"].items():
        assert s["status"] == ("skipped" if name == "ddp" else "ok"), (name, s)
    md = (out / "summary.md").read_text()
    for title in ("### Precision at θ_pre", "### Step time and peak memory", "### Evaluation throughput",
                  "### DDP equivalence"):
        assert title in md

    # precision: DiVE's regulariser at θ_pre is rounding in both precisions, and the
    # pre-fix path (reference rows under autocast) is not; losses match under autocast
    prec = json.loads((out / "precision.json").read_text())
    rows = {(r["path"], r["precision"]): r for r in prec["dive"]}
    assert set(rows) == {(p, q) for p in ("method", "ref-in-autocast") for q in ("fp32", "bf16")}
    assert all(math.isfinite(v) for r in prec["dive"] for k, v in r.items() if isinstance(v, float))
    assert rows[("method", "fp32")]["reg"] <= 1e-6 and rows[("method", "bf16")]["reg"] <= 1e-6
    assert rows[("method", "bf16")]["grad_reg"] <= 1e-2 * rows[("method", "bf16")]["grad_flyp"]
    assert rows[("ref-in-autocast", "bf16")]["reg"] > 1e-3
    assert {r["loss"] for r in prec["losses"]} >= {"clip_loss (FLYP)", "mpm_nce_loss", "DiVE AVL + PVL"}
    assert all(r["rel_diff"] <= 1e-3 for r in prec["losses"]), prec["losses"]

    steps = json.loads((out / "steps.json").read_text())
    assert {r["method"] for r in steps["runs"]} == {"flyp", "dive", "radapter"}
    for r in steps["runs"]:
        assert "error" not in r, r
        assert r["step_s"] > 0 and r["peak_bytes"] > 0 and r["bf16"] is True

    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["workers"]) == {"0", "1"}
    assert ev["model_only_images_per_s"] > 0 and all(w["images_per_s"] > 0 for w in ev["workers"].values())

    ddp = json.loads((out / "ddp.json").read_text())
    assert ddp["status"] == "skipped" and "2" in ddp["reason"]


@pytest.mark.slow
def test_check_ddp_script_with_gloo(tmp_path):
    """The DDP section's script end to end on the CPU (2 gloo processes, one case)."""
    path = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "check_ddp.py"), "--device", "cpu",
                           "--cases", "radapter", "--json", str(path)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(path.read_text())
    assert res["status"] == "pass", res
    case = res["cases"]["radapter"]
    assert case["world"] == 2 and case["max_diff_single"] <= 1e-5 and case["moved"] > 2e-4
