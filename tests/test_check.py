"""The `check` stage (and `python -m pipeline repro`, which runs it before DVC): every mistake in
params.yaml and in the files it names ends in one line naming the key or file and what is
allowed, before any stage that owns outputs runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import pipeline  # noqa: F401  (offline environment setup)
from pipeline import models

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp: Path, edit) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _files(tmp: Path) -> dict[str, Path]:
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    truncated = tmp / "truncated.safetensors"
    models.save_state_dict(models.create("tiny-clip").model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    other = tmp / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, other)
    captions = tmp / "captions.csv"
    captions.write_text("filepath,title\nnope.png,a photo\n")
    return {"garbage": garbage, "truncated": truncated, "other": other, "captions": captions}


def _set(section: str, key: str, value):
    return lambda p: p[section].__setitem__(key, value)


CASES = {
    "levels a string": (_set("sample", "levels", "4"), r"sample\.levels: '4' is not a list"),
    "typo'd section key": (lambda p: p["sample"].__setitem__("shot", p["sample"].pop("levels")),
                           r"sample\.shot: unknown key\. Allowed keys in sample: levels, seeds"),
    "misplaced top-level seeds": (lambda p: p.__setitem__("seeds", [0, 1]),
                                  r"seeds: unknown key \(did you mean sample\.seeds\?\)"),
    "unknown method": (_set("finetune", "methods", ["lp", "flpy"]), r"finetune\.methods: 'flpy' is not allowed; allowed: "),
    "typo in a trial's hparams": (lambda p: p["finetune"]["trials"].__setitem__("ft-x", {"method": "ft", "lrr": 1e-4}),
                                  r"finetune\.trials\.ft-x\.lrr: unknown key"),
    "a trial of a method not compared": (
        lambda p: p["finetune"]["trials"].__setitem__("bitfit-x", {"method": "bitfit", "lr": 1e-4}),
        r"finetune\.trials\.bitfit-x\.method: 'bitfit' is not allowed; the method must be in finetune\.methods"),
    "a list of the wrong type": (_set("sample", "seeds", [0, "one"]), r"sample\.seeds\[1\]: 'one' is not an integer"),
    "missing weights file": (_set("model", "pretrained", "weights/nope.safetensors"),
                             r"model\.pretrained: weights/nope\.safetensors: weights file not found"),
    "garbage weights file": (lambda p: None, r"model\.pretrained: .*garbage\.safetensors is not a readable weights file"),
    "truncated weights file": (lambda p: None, r"model\.pretrained: .*truncated\.safetensors is not a readable weights file"),
    "weights of another architecture": (lambda p: None, r"model\.pretrained: .*other\.pt does not fit architecture 'tiny-clip'"),
    "unknown tag": (_set("model", "pretrained", "openaii"), r"model\.pretrained: 'openaii' is neither a file nor an open_clip tag"),
    "missing reference CSV": (_set("reference", "csv", "nowhere/captions.csv"),
                              r"reference\.csv: nowhere/captions\.csv: file not found"),
    "reference images missing": (lambda p: None, r"reference\.csv: .*captions\.csv: 1 of its first 1 image files are missing"),
    "dataset not under root": (_set("dataset", "name", "camelyon17"),
                               r"dataset\.root: camelyon17 is not under data/wilds .*RELEASE.*missing\)\. Download it"),
    "unknown image format": (_set("images", "format", "webp"), r"images\.format: 'webp' is not allowed; allowed: raw, jpeg, none"),
    "cuda without CUDA": (lambda p: p["finetune"]["train"].__setitem__("device", "cuda"),
                          r"finetune\.train\.device: 'cuda' is not available on this machine \(torch .* sees 0 CUDA "
                          r"device\(s\)\); allowed here: auto, cpu"),
    "not a device": (_set("evaluate", "device", "gpu"), r"evaluate\.device: 'gpu' is not a device; allowed: auto"),
    "more DDP processes than cores": (
        lambda p: p["finetune"]["train"].update(device="cpu", nproc_per_node=4096),
        r"finetune\.train\.nproc_per_node: 4096 is not allowed; DDP on cpu runs one process per core and \d+ are "
        r"available here: use 1 to \d+"),
    "more workers than cores": (_set("embed", "num_workers", 4096),
                                r"embed\.num_workers: 4096 is not allowed; \d+ CPU cores are available here"),
    "a trial of an unregistered method": (
        lambda p: p["finetune"]["trials"].__setitem__("x", {"method": "flypp"}),
        r"finetune\.trials\.x\.method: 'flypp' is not a registered method \(did you mean flyp\?\); registered: "),
    "an open_clip tag for an arch without tags": (
        _set("model", "pretrained", "openai"),
        r"model\.pretrained: 'openai' is neither a file nor an open_clip tag: open_clip has no pretrained weights "
        r"for 'tiny-clip'\. Allowed: 'builtin' \(pre-trained here\) or a path"),
    # SOT + 17 context tokens + a shape name + "." + EOT exceed tiny-clip's 20 positions
    "a prompt method whose prompts do not fit the text tower": (
        lambda p: (p["finetune"].__setitem__("methods", ["coop"]), p["finetune"].__setitem__("search", {}),
                   p["finetune"].__setitem__("trials", {"coop-a": {"method": "coop", "n_ctx": 17}})),
        r"finetune\.trials\.coop-a \(coop, tiny-clip, synthetic\): the prompt '(X ){17}\w+\.' "
        r"does not fit the text tower's 20-token context \(the tokenizer cuts the class name\); use a smaller n_ctx"),
}
if torch.cuda.is_available():  # the device cases are about a machine without one
    del CASES["cuda without CUDA"]
FILE_CASES = {"garbage weights file": ("model", "pretrained", "garbage"),
              "truncated weights file": ("model", "pretrained", "truncated"),
              "weights of another architecture": ("model", "pretrained", "other"),
              "reference images missing": ("reference", "csv", "captions")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_clear_line_for_each_mistake(tmp_path, monkeypatch, capsys, case):
    from pipeline.cli import main

    edit, message = CASES[case]
    if case in FILE_CASES:
        section, key, name = FILE_CASES[case]
        edit = _set(section, key, str(_files(tmp_path)[name]))
    path = _write(tmp_path, edit)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["check", "--params", str(path)])
    assert done.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "data").exists()  # nothing written


def test_the_repro_command_checks_before_dvc_reads_anything(tmp_path, monkeypatch, capsys):
    """`python -m pipeline repro` stops on a wrong shape that DVC itself would report as
    "'Value' object is not iterable" while expanding the finetune matrix."""
    import subprocess

    from pipeline.cli import main

    _write(tmp_path, _set("sample", "levels", "4"))
    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: called.append(a) or 0)
    with pytest.raises(SystemExit) as done:
        main(["repro"])
    assert done.value.code == 1 and not called
    assert "sample.levels: '4' is not a list" in capsys.readouterr().err
    _write(tmp_path, lambda p: None)
    with pytest.raises(SystemExit) as done:
        main(["repro", "-s", "report"])
    assert done.value.code == 0 and called[0][0][-4:] == ["dvc", "repro", "-s", "report"]
    # the trials DVC's matrix reads were written first (the default's: the committed trials.yaml)
    assert (tmp_path / "trials.yaml").read_text() == (ROOT / "trials.yaml").read_text()


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path, monkeypatch, capsys):
    """PyYAML keeps the second of two equal keys; DVC refuses the file. `check` names both."""
    from pipeline.cli import main

    text = (ROOT / "params.yaml").read_text()
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  seeds:"))
    lines.insert(at + 1, lines[at])
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["check"])
    assert done.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: sample.seeds: duplicate key in params.yaml (lines {at + 1} and {at + 2}); keep one "
                   "(DVC refuses a file with duplicate keys)"), err


def test_the_check_command_writes_nothing_and_the_stage_writes_its_outputs(tmp_path, monkeypatch, capsys):
    """`python -m pipeline check` only validates; `--write` (the DVC stage's command) writes
    the marker, the image cache's key and the links to external files."""
    from pipeline.cli import main

    weights = tmp_path / "outside" / "w.safetensors"
    weights.parent.mkdir()
    models.save_state_dict(models.create("tiny-clip").model.state_dict(), weights)
    _write(tmp_path, _set("model", "pretrained", str(weights)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trials.yaml").write_text((ROOT / "trials.yaml").read_text())  # the default's search
    main_ok = lambda *args: main(["check", *args])  # noqa: E731
    with pytest.raises(SystemExit) as done:
        main_ok()
    assert done.value.code == 0 and not (tmp_path / "data").exists()
    with pytest.raises(SystemExit) as done:
        main_ok("--write")
    assert done.value.code == 0
    link = tmp_path / "data/external/model/weights.safetensors"
    assert link.is_symlink() and link.resolve() == weights.resolve()
    assert (tmp_path / "data/check.json").is_file() and (tmp_path / "data/image_key.json").is_file()
    import json

    record = json.loads((tmp_path / "data/external/model/digest.json").read_text())
    assert record["sources"] == {"weights.safetensors": str(weights)}
