"""Zero-shot retention tasks from anywhere: an image folder and another WILDS dataset (real
formats, real wilds classes), the seeded `max_samples` cap, the `auto` rule, and the checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import pipeline  # noqa: F401  (offline environment setup)
from pipeline.config import ParamsError, RetentionParams, load_params
from pipeline.core.validation import parse
from pipeline.data.datasets import get_spec, load_dataset, official_eval
from pipeline.data.folder import ImageFolderDataset
from pipeline.data.retention import (RetentionChanged, auto_tasks, load_task, prepare_task, prepare_tasks,
                                     resolve_tasks)
from pipeline.data.synthetic import SyntheticConfig, generate_dataset
from wilds.datasets.wilds_dataset import WILDSDataset

from .wilds_fixtures import make_fmow, make_waterbirds

CLASSES = {"beagle": 7, "great_dane": 5, "tabby_cat": 9}  # folder -> images


def _folder(root: Path, classes=CLASSES) -> Path:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (root / "notes.txt").write_text("not a class folder, not an image")
    return root


def _params(tasks, max_samples=1000) -> RetentionParams:
    return parse(RetentionParams, {"tasks": tasks, "max_samples": max_samples}, "retention")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    generate_dataset(root, SyntheticConfig(n_train=16, n_id_val=8, n_id_test=12, n_val=8, n_test=8, n_heldout=20,
                                           n_corpus=1))
    return root, load_dataset("synthetic", root)


def test_an_image_folder_is_a_wilds_dataset(tmp_path):
    ds = ImageFolderDataset(_folder(tmp_path / "pets"))
    assert isinstance(ds, WILDSDataset)
    assert ds.classes == tuple(sorted(CLASSES)) and ds.n_classes == 3 and len(ds) == sum(CLASSES.values())
    assert torch.bincount(ds.y_array).tolist() == [CLASSES[c] for c in sorted(CLASSES)]
    assert ds.get_input(0).mode == "RGB" and ds.get_input(0).size == (12, 12)
    assert set(ds.split_array.tolist()) == {ds.split_dict["test"]}
    assert official_eval(ds, ds.y_array, ds.y_array, ds.metadata_array)["acc_avg"] == 1.0
    with pytest.raises(FileNotFoundError, match="no class folder 'poodle'"):
        ImageFolderDataset(tmp_path / "pets", classes=["beagle", "poodle"])
    (tmp_path / "pets" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no image files"):
        ImageFolderDataset(tmp_path / "pets")


def test_a_folder_task_with_class_names_and_templates(tmp_path):
    folder = _folder(tmp_path / "pets")
    names = tmp_path / "names.txt"
    names.write_text("beagle\ngreat dane\ntabby cat\n")
    params = _params([{"folder": str(folder), "classnames": str(names),
                       "templates": ["a photo of a {c}, a type of pet."], "max_samples": 10}])
    (task,) = resolve_tasks(params, "synthetic", tmp_path)
    assert task.name == "pets" and task.kind == "folder"
    record = prepare_task(task, seed=0, max_samples=params.max_samples, main=None, data_root=tmp_path,
                          generated_root=tmp_path)
    assert record["classnames"] == ["beagle", "great dane", "tabby cat"]
    assert record["templates"] == ["a photo of a {c}, a type of pet."]
    assert record["n_samples"] == 10 and record["n_available"] == 21 and record["max_samples"] == 10
    assert len(set(record["rows"])) == 10 and record["rows"] == sorted(record["rows"])
    loaded = load_task(json.loads(json.dumps(record)), None, "synthetic")
    assert loaded.labels.tolist() == loaded.dataset.y_array[loaded.rows].tolist()
    assert loaded.prompts.texts()[1] == ["a photo of a great dane, a type of pet."]
    assert record["majority"] == pytest.approx(torch.bincount(loaded.labels).max().item() / 10)


def test_the_cap_is_seeded_and_respected(tmp_path):
    folder = _folder(tmp_path / "pets")
    (task,) = resolve_tasks(_params([{"folder": str(folder)}]), "synthetic", tmp_path)

    def rows(seed, cap):
        return prepare_task(task, seed=seed, max_samples=cap, main=None, data_root=tmp_path,
                            generated_root=tmp_path)["rows"]

    assert rows(0, 8) == rows(0, 8)  # same seed, same images for every model
    assert rows(0, 8) != rows(1, 8)
    assert len(rows(3, 8)) == 8 and len(rows(3, 100)) == 21  # never more than there are
    record = prepare_task(task, seed=0, max_samples=1000, main=None, data_root=tmp_path, generated_root=tmp_path)
    assert record["classnames"] == ["beagle", "great dane", "tabby cat"]  # default: folder names, '_' as space
    assert record["templates"] == ["a photo of a {c}."]


def test_a_changed_folder_is_caught_when_read(tmp_path):
    folder = _folder(tmp_path / "pets")
    (task,) = resolve_tasks(_params([{"folder": str(folder)}]), "synthetic", tmp_path)
    record = prepare_task(task, seed=0, max_samples=5, main=None, data_root=tmp_path, generated_root=tmp_path)
    load_task(record, None, "synthetic")
    Image.new("RGB", (12, 12)).save(folder / "beagle" / "new.png")
    with pytest.raises(RetentionChanged, match=r"retention task pets: the files under .* changed.*dvc repro -f prepare"):
        load_task(record, None, "synthetic")


def test_another_wilds_dataset_as_a_task(tmp_path, synthetic):
    root = make_waterbirds(tmp_path / "wilds")
    params = _params(["waterbirds", {"dataset": "waterbirds", "split": "val", "name": "birds-val"}], max_samples=5)
    tasks = resolve_tasks(params, "synthetic", root)
    assert [(t.name, t.dataset, t.split, t.label) for t in tasks] == [
        ("waterbirds", "waterbirds", None, "y"), ("birds-val", "waterbirds", "val", "y")]
    records = [prepare_task(t, seed=0, max_samples=5, main=("synthetic", synthetic[1]), data_root=root,
                            generated_root=synthetic[0]) for t in tasks]
    assert records[0]["split"] == "test" and records[1]["split"] == "val"  # default: its OOD test split
    wb = load_dataset("waterbirds", root)
    for r in records:
        assert r["n_samples"] == 5 and r["n_classes"] == 2 and r["classnames"] == ["landbird", "waterbird"]
        assert set(r["rows"]) <= set(np.flatnonzero(wb.split_array == wb.split_dict[r["split"]]).tolist())
        loaded = load_task(r, synthetic[1], "synthetic")
        assert type(loaded.dataset).__name__ == "WaterbirdsDataset"
        assert loaded.labels.tolist() == wb.y_array[loaded.rows].tolist()


def test_a_metadata_field_of_the_dataset_itself_and_the_built_in_folder(synthetic):
    root, ds = synthetic
    records = prepare_tasks(_params("auto"), dataset="synthetic", seed=0, main_dataset=ds,
                            data_root=Path("/nonexistent"), generated_root=root)
    held, colour = records
    assert held["name"] == "synthetic/heldout-shapes" and held["kind"] == "folder"
    assert held["classes"] == ["diamond", "arrow", "semicircle", "hourglass"] == held["classnames"]
    assert held["n_samples"] == 20 and held["majority"] == pytest.approx(0.25)  # equally many per shape
    assert held["templates"][0] == "a photo of a {c}."
    assert colour["split"] == "id_test" and colour["label"] == "colour" and colour["n_samples"] == 12
    loaded = load_task(colour, ds, "synthetic")
    assert loaded.dataset is ds  # the dataset being fine-tuned is not loaded twice
    assert loaded.labels.tolist() == ds.metadata_array[loaded.rows, ds.metadata_fields.index("colour")].tolist()
    held_loaded = load_task(held, ds, "synthetic")
    assert held_loaded.labels.tolist() == [held["classes"].index(Path(p).parent.name)
                                           for p in (held_loaded.dataset._input_array[i] for i in held["rows"])]


def test_auto_finds_the_other_wilds_datasets_under_the_root(tmp_path):
    root = make_fmow(make_waterbirds(tmp_path / "wilds"))
    assert [t.name for t in auto_tasks("synthetic", root)] == [
        "synthetic/heldout-shapes", "synthetic/colour", "fmow", "waterbirds"]
    assert [t.name for t in auto_tasks("waterbirds", root)] == ["fmow"]  # never itself
    assert auto_tasks("iwildcam", tmp_path / "empty") == []
    # auto plus an explicit task, duplicates kept once
    params = _params(["auto", "fmow", "synthetic/colour"])
    assert [t.name for t in resolve_tasks(params, "waterbirds", root)] == ["fmow", "synthetic/colour"]


def _write_params(tmp_path, retention) -> Path:
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    raw["retention"] = retention
    raw["dataset"]["root"] = str(tmp_path / "wilds")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("retention, message", [
    ({"tasks": "everything"}, "retention.tasks: 'everything' is not allowed; use 'auto' or a list"),
    ({"tasks": [{"folder": "x", "dataset": "fmow"}]}, r"retention.tasks\[0\]: \{'dataset': 'fmow', 'folder': 'x'\} is not allowed; give either `dataset`"),
    ({"tasks": [{"folder": "x", "templates": ["a photo"]}]}, r"retention.tasks\[0\].templates\[0\]: 'a photo'.*\{c\}"),
    ({"tasks": [{"folder": "x", "label": "y"}]}, r"retention.tasks\[0\].label: 'y'.*a folder task has no split or label"),
    ({"tasks": [{"dataset": "fmow", "foo": 1}]}, r"retention.tasks\[0\].*foo"),
    ({"max_samples": 0}, "retention.max_samples: 0 is not allowed"),
])
def test_bad_retention_shapes_name_the_key(tmp_path, retention, message):
    with pytest.raises(ParamsError, match=message):
        load_params(_write_params(tmp_path, retention))


@pytest.mark.parametrize("tasks, message", [
    (["imagenet"], "retention.tasks\\[0\\]: 'imagenet' names no dataset"),
    (["synthetic/shade"], "has no task 'shade'"),
    ([{"folder": "{tmp}/nowhere"}], "nowhere: no such folder"),
    ([{"folder": "{tmp}/pets", "classnames": ["a", "b"]}], "classnames.*one name per class folder, in sorted order \\(3: beagle"),
    (["fmow"], "retention task fmow: fmow is not under dataset.root"),
    ([{"dataset": "synthetic", "split": "validation"}], "split: 'validation'.*synthetic's splits: train, id_val"),
])
def test_the_check_stage_refuses_bad_tasks_before_any_work(tmp_path, tasks, message):
    from pipeline.stages.check import check_params

    _folder(tmp_path / "pets")
    tasks = [{k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in t.items()}
             if isinstance(t, dict) else t for t in tasks]
    with pytest.raises((ParamsError, ValueError, FileNotFoundError), match=message):
        check_params(_write_params(tmp_path, {"tasks": tasks}))


def test_the_check_stage_accepts_good_tasks(tmp_path):
    from pipeline.stages.check import check_params

    folder = _folder(tmp_path / "pets")
    make_waterbirds(tmp_path / "wilds")
    params = check_params(_write_params(tmp_path, {"tasks": ["auto", "waterbirds", {"folder": str(folder)}]}))
    assert [t.name for t in resolve_tasks(params.retention, "synthetic", tmp_path / "wilds")] == [
        "synthetic/heldout-shapes", "synthetic/colour", "waterbirds", "pets"]
    assert get_spec("waterbirds").marker(tmp_path / "wilds").is_file()
    # the folder task's folder and the other dataset's release files reach DVC (data/external)
    from pipeline.stages.check import external_links

    links = external_links(params)["retention"]
    assert links["pets"] == folder.absolute()
    assert links["waterbirds/RELEASE_v1.0.txt"] == get_spec("waterbirds").marker(tmp_path / "wilds").absolute()
