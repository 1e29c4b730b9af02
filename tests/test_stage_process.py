"""A stage runs as a short process of its own: its garbage collection is set for that (full
collections rare while its imports build up, no walk over everything at exit); values never
depend on it (tests/test_e2e.py checks the pipeline's results)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.e2e_project import ROOT

# counts the full (generation 2) collections that run during the imports in `code`
COUNT_FULL = """
import gc
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "stop" and info["generation"] == 2 else None)
{code}
print(len(full), *gc.get_threshold())
"""


def run(code: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return [int(x) for x in out.stdout.splitlines()[-1].split()]


def test_a_stage_process_collects_in_full_rarely_while_it_imports():
    from pipeline.core.env import FULL_GC_EVERY

    # the same imports as the finetune stage's, under CPython's default thresholds (the test can
    # fail: they make several full collections) and as the stage sets them
    heavy = "import torch, open_clip, timm, pandas, sklearn.metrics, mlflow"
    default = run(COUNT_FULL.format(code=heavy))
    staged = run(COUNT_FULL.format(code=f"import pipeline.stages\n{heavy}"))
    fresh = run("import gc; print(*gc.get_threshold())")
    assert default[1:] == fresh and default[0] >= 4, default
    assert staged[1:] == [fresh[0], fresh[1], FULL_GC_EVERY]  # young and middle generations as before
    assert staged[0] <= 2, staged


def test_a_stage_command_freezes_the_heap_before_the_process_ends():
    """run_command (every stage's main) ends the process; before it does, the objects move to
    the permanent generation, so the interpreter's shutdown does not walk them all again."""
    code = ("import gc\nfrom pipeline.stages.sample import main\n"
            "before = gc.get_freeze_count()\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
            "print(before, gc.get_freeze_count(), code)\n")
    before, after, code = run(code)
    assert before == 0 and after > 0 and code == 0
