"""A finished seed kept across a crash (pipeline.stages.finetune: result_key, _keep, _restore):
restored only under the same key, and the key moves with everything that determines the seed's
outputs. The crash itself, through real DVC: tests/test_e2e_seeds.py."""

import json
from pathlib import Path

import pytest

import pipeline
from pipeline import artifacts as paths
from pipeline.config import Params, load_params
from pipeline.stages import finetune
from pipeline.stages.finetune import FINISHED, KEPT_FILES, _keep, _restore, result_key


@pytest.fixture
def entry(tmp_path, monkeypatch):
    """A project folder holding the files a finetune entry reads, and a copy of the code."""
    monkeypatch.chdir(tmp_path)
    for path in (paths.CHECKED, paths.PREPARED_MANIFEST, paths.IMAGES / "index.json", paths.EMBED_FEATURES,
                 paths.sample_file("16", 0), paths.sample_file("16", 1)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{path} v1")
    code = tmp_path / "code/pipeline"
    (code / "methods").mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "methods/flyp.py").write_text("x = 1\n")
    monkeypatch.setattr(pipeline, "__file__", str(code / "__init__.py"))
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    level = params.sample.level("16")
    return tmp_path, params, level, code


CONFIG = {"trial": "flyp-a", "method": "flyp", "hparams": {"lr": 1e-5}, "threads": 1, "steps": 12}


def test_the_result_key_moves_with_every_input(entry):
    work, params, level, code = entry
    key = result_key(params, CONFIG, level, 0)
    assert result_key(params, CONFIG, level, 0) == key  # deterministic
    assert result_key(params, CONFIG, level, 1) != key  # another seed: its own sample
    assert result_key(params, {**CONFIG, "hparams": {"lr": 2e-5}}, level, 0) != key
    assert result_key(params, {**CONFIG, "threads": 2}, level, 0) != key
    other = Params(**{**params.__dict__, "reference": type(params.reference)(max_samples=100)})
    assert result_key(other, CONFIG, level, 0) != key  # a param the entry reads outside the config
    for path, edit in ((paths.sample_file("16", 0), "new sample"), (paths.EMBED_FEATURES, "v2"),
                       (paths.PREPARED_MANIFEST, "v2"), (code / "methods/flyp.py", "x = 2\n")):
        before = path.read_text()
        path.write_text(edit)
        assert result_key(params, CONFIG, level, 0) != key, path
        path.write_text(before)
    assert result_key(params, CONFIG, level, 0) == key  # everything back: the same key


def _outputs(out: Path, tag: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        (out / name).write_text(json.dumps({"file": name, "tag": tag}))
    return {name: (out / name).read_bytes() for name in KEPT_FILES}


def test_a_kept_seed_is_restored_only_under_its_key_and_intact(entry):
    work = entry[0]
    out, kept = work / "runs/seed0", work / "checkpoints/seed0" / FINISHED
    files = _outputs(out, "trained")
    _keep(out, kept, "key-a")
    assert json.loads((kept / "manifest.json").read_text())["result_key"] == "key-a"
    fresh = work / "runs2/seed0"
    fresh.mkdir(parents=True)
    assert _restore(kept, "key-a", fresh) == {"file": "train_summary.json", "tag": "trained"}
    assert {name: (fresh / name).read_bytes() for name in KEPT_FILES} == files

    # other inputs: never restored, and the stale copy is dropped
    assert _restore(kept, "key-b", fresh) is None and not kept.exists()

    # a damaged copy (a file changed after it was kept) trains again
    _keep(out, kept, "key-a")
    (kept / KEPT_FILES[0]).write_text("damaged")
    assert _restore(kept, "key-a", fresh) is None and not kept.exists()

    # a copy cut short before its manifest was written is not one
    _keep(out, kept, "key-a")
    (kept / "manifest.json").unlink()
    assert _restore(kept, "key-a", fresh) is None


def test_the_finished_marker_is_restored_last():
    assert finetune.KEPT_FILES[-1] == paths.SUMMARY
