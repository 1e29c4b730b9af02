"""End to end: a search (`finetune.search`) under real DVC. Raising `n` adds DVC entries for the
new draws only (the first draws keep their names and values, so their entries stay up to date
and nothing is re-trained); a params.yaml edited without regenerating trials.yaml is refused by
the `check` stage before any stage runs."""

import sys

import pytest
import yaml

from tests.e2e_project import ROOT, copy_pipeline, init_and_repro, merge, sh, write_trials
from tests.test_e2e import TINY

pytestmark = pytest.mark.slow

SEARCH = merge(TINY, {"sample": {"levels": [4], "seeds": [0]},
                      "finetune": {"methods": ["lp"],
                                   "search": {"lp": {"space": {"lr": {"loguniform": [1.0e-3, 1.0e-1]}}, "n": 1}}},
                      "evaluate": {"wise_alphas": [1.0]}})


def _status_entries(work, env) -> set[str]:
    import json

    out = sh([sys.executable, "-m", "dvc", "status", "--json"], work, env).stdout
    return set(json.loads(out))


def test_raising_n_adds_only_the_new_entries(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    env = copy_pipeline(work)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SEARCH)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_and_repro(work, env)
    first = yaml.safe_load((work / "trials.yaml").read_text())["trials"]
    assert list(first) and all(t.startswith("lp-0-lr") for t in first)
    assert _status_entries(work, env) == set()

    # n: 1 -> 3, trials.yaml regenerated: the first draw is unchanged, two entries are new
    params["finetune"]["search"]["lp"]["n"] = 3
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_trials(work, env)
    now = yaml.safe_load((work / "trials.yaml").read_text())["trials"]
    assert list(now)[:1] == list(first) and now[list(first)[0]] == first[list(first)[0]]
    new = [t for t in now if t not in first]
    assert len(new) == 2 and all(t.startswith(("lp-1-lr", "lp-2-lr")) for t in new)
    stale = _status_entries(work, env)
    assert {s for s in stale if s.startswith("finetune@")} == {f"finetune@{t}-4" for t in new}, stale
    out = sh([sys.executable, "-m", "dvc", "repro"], work, env).stdout
    assert f"Running stage 'finetune@{list(first)[0]}-4'" not in out  # nothing re-trained
    assert all(f"Running stage 'finetune@{t}-4'" in out for t in new)
    record = yaml.safe_load((work / "runs/select/lp/4.json").read_text())
    assert record["trials"] == list(now) and record["searches"]["lp"]["n"] == 3
    assert (work / "reports/search_lp.png").is_file()
    assert _status_entries(work, env) == set()

    # params.yaml edited, trials.yaml not regenerated: `dvc repro` stops at `check`, naming the command
    params["finetune"]["search"]["lp"]["n"] = 4
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = sh([sys.executable, "-m", "dvc", "repro"], work, env, check=False)
    assert proc.returncode != 0
    assert "trials.yaml: out of date with finetune.trials and finetune.search" in proc.stderr + proc.stdout
    assert "python -m pipeline search" in proc.stderr + proc.stdout
    assert "Running stage 'finetune@" not in proc.stdout
    assert not (work / "runs/finetune/lp-3").exists() and not any((work / "runs/finetune").glob("lp-3-*"))
