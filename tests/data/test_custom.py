"""The `custom` dataset kind: a CSV or a folder tree of real image files becomes a WILDS dataset
(splits by domain, wilds' metrics), and every mistake in the source is refused by the `check`
stage, naming the file, row or key."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import pipeline  # noqa: F401  (offline environment setup)
from pipeline.config import ParamsError
from pipeline.core.validation import parse
from pipeline.data.custom import CustomConfig, CustomDataError, build_table
from pipeline.data.datasets import load_dataset, load_prompts, official_eval
from wilds.datasets.wilds_dataset import WILDSDataset

CLASSES = ("cat", "dog", "fox")
ID_DOMAINS = ("clinic_a", "clinic_b")
OOD_DOMAINS = ("clinic_c",)


def make_images(root: Path, per_cell: int = 6) -> list[tuple[str, str, str]]:
    """Real PNG files, `per_cell` per (domain, class); returns (relative path, label, domain)."""
    rng = np.random.default_rng(0)
    rows = []
    for domain in ID_DOMAINS + OOD_DOMAINS:
        for label in CLASSES:
            folder = root / domain / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_cell):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
                rows.append((f"{domain}/{label}/{i}.png", label, domain))
    return rows


def write_csv(path: Path, rows, header=("path", "label", "domain"), extra=None) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header + ((extra[0],) if extra else ()))
        for i, r in enumerate(rows):
            w.writerow(r + ((extra[1](i, r),) if extra else ()))
    return path


def config(**kw) -> CustomConfig:
    base = {"id_domains": list(ID_DOMAINS), "ood_domains": list(OOD_DOMAINS)}
    return parse(CustomConfig, {**base, **kw}, "prepare.custom")


@pytest.fixture
def images(tmp_path):
    rows = make_images(tmp_path / "images")
    return tmp_path, rows


def test_a_csv_becomes_a_wilds_dataset_split_by_domain(images):
    from pipeline.data.custom import CustomDataset, generate_dataset

    tmp, rows = images
    table = write_csv(tmp / "images" / "data.csv", rows)
    cfg = config(csv=str(table), templates=["a photo of a {c}.", "a blurry photo of a {c}."])
    generate_dataset(tmp / "wilds", cfg)
    ds = load_dataset("custom", tmp / "wilds")
    assert isinstance(ds, CustomDataset) and isinstance(ds, WILDSDataset)
    assert ds.n_classes == 3 and len(ds) == len(rows)
    domains = ds.metadata_array[:, 0]
    split = torch.as_tensor(ds.split_array)
    id_rows = torch.isin(domains, torch.tensor([0, 1]))
    for name in ("train", "id_val", "id_test"):
        assert id_rows[split == ds.split_dict[name]].all() and (split == ds.split_dict[name]).any()
    for name in ("val", "test"):
        assert (~id_rows[split == ds.split_dict[name]]).all() and (split == ds.split_dict[name]).any()
    train_y = ds.y_array[split == ds.split_dict["train"]]
    assert set(train_y.tolist()) == {0, 1, 2}  # stratified: every class trains
    assert ds.get_input(0).size == (20, 20)
    prompts = load_prompts("custom", dataset=ds)
    assert prompts.classnames == CLASSES and prompts.templates[1] == "a blurry photo of a {c}."
    test = split == ds.split_dict["test"]
    pred = ds.y_array.clone()
    pred[test.nonzero()[0]] = (pred[test.nonzero()[0]] + 1) % 3  # one wrong in the OOD test split
    m = official_eval(ds, pred[test], ds.y_array[test], ds.metadata_array[test])
    assert m["acc_avg"] == pytest.approx(1 - 1 / int(test.sum()))
    assert {"F1-macro_all", "acc_worst_domain", "acc_domain:clinic_c"} <= m.keys()
    assert "acc_domain:clinic_a" not in m or m.get("count_domain:clinic_a", 0) == 0
    # the same seed gives the same splits; another seed others
    again = build_table(cfg)[0]["split"].tolist()
    assert again == build_table(cfg)[0]["split"].tolist()
    assert again != build_table(config(csv=str(table), seed=1))[0]["split"].tolist()


def test_a_folder_tree_and_a_split_column(images):
    tmp, rows = images
    df, names = build_table(config(folder=str(tmp / "images")))
    assert names == list(CLASSES) and len(df) == len(rows)
    assert set(df.loc[df["domain"] == "clinic_c", "split"]) == {"val", "test"}
    # a split column is used as given
    splits = ("train", "train", "id_val", "id_test", "train", "train")
    table = write_csv(tmp / "with_split.csv", [(f"images/{p}", lab, d) for p, lab, d in rows],
                      extra=("fold", lambda i, r: ("val", "test")[i % 2] if r[2] == "clinic_c" else splits[i % 6]))
    df, _ = build_table(config(csv=str(table), split_column="fold"))
    assert df["split"].tolist() == [("val", "test")[i % 2] if r[2] == "clinic_c" else splits[i % 6]
                                    for i, r in enumerate(rows)]


def test_class_names_from_a_file_with_integer_labels(images):
    tmp, rows = images
    table = write_csv(tmp / "int.csv", [(f"images/{p}", str(CLASSES.index(lab)), d) for p, lab, d in rows])
    (tmp / "names.txt").write_text("tabby cat\nbeagle\nred fox\n")
    df, names = build_table(config(csv=str(table), classnames=str(tmp / "names.txt")))
    assert names == ["tabby cat", "beagle", "red fox"]
    assert df["y"].tolist() == [CLASSES.index(lab) for _, lab, _ in rows]


def _params(tmp: Path, custom: dict) -> Path:
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    raw["dataset"]["name"] = "custom"
    raw["prepare"] = {"custom": custom}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _bad_cases(tmp: Path, rows) -> dict[str, tuple[dict, str]]:
    ok = [(f"images/{p}", lab, d) for p, lab, d in rows]
    (tmp / "images" / "broken.png").write_bytes(b"not a png")  # garbage
    only_test = [(p, "bird" if i == 0 else lab, d) for i, (p, lab, d) in enumerate(ok)]
    domains = {"id_domains": list(ID_DOMAINS), "ood_domains": list(OOD_DOMAINS)}
    return {
        "missing column": ({"csv": str(write_csv(tmp / "a.csv", ok, header=("file", "label", "domain"))), **domains},
                           r"a\.csv: no column 'path' \(prepare.custom.path_column\); its columns: file, label, domain"),
        "unreadable image": ({"csv": str(write_csv(tmp / "b.csv", ok + [("images/broken.png", "dog", "clinic_b")])),
                              **domains},
                             rf"b\.csv \(line {len(ok) + 2}\): image .*broken\.png is not readable"),
        "missing image": ({"csv": str(write_csv(tmp / "c.csv", ok + [("images/nope.png", "cat", "clinic_a")])), **domains},
                          r"c\.csv \(line \d+\): image .*nope\.png does not exist"),
        "class without training image": (
            {"csv": str(write_csv(tmp / "d.csv", only_test, extra=("split", lambda i, r: "id_test" if i == 0 else (
                ("val", "test")[i % 2] if r[2] == "clinic_c" else ("train", "id_val", "id_test")[i % 3])))),
             "split_column": "split", **domains},
            r"d\.csv: class 'bird' has no training image"),
        "domain in both": ({"csv": str(tmp / "b.csv"), "id_domains": ["clinic_a", "clinic_b"],
                            "ood_domains": ["clinic_b", "clinic_c"]},
                           r"prepare.custom.ood_domains: 'clinic_b' is also in id_domains"),
        "unknown domain": ({"csv": str(tmp / "b.csv"), "id_domains": ["clinic_a"], "ood_domains": ["clinic_c"]},
                           r"b\.csv \(line \d+\): domain 'clinic_b' is neither in prepare.custom.id_domains"),
        "no source": (dict(domains), r"prepare.custom.csv: give either `csv`"),
        "missing file": ({"csv": str(tmp / "nowhere.csv"), **domains}, r"prepare.custom.csv: .*nowhere\.csv: no such file"),
        "bad template": ({"csv": str(tmp / "b.csv"), "templates": ["a photo"], **domains},
                         r"prepare.custom.templates: template 0 \('a photo'\) lacks the placeholder"),
    }


@pytest.mark.parametrize("case", ["missing column", "unreadable image", "missing image", "class without training image",
                                  "domain in both", "unknown domain", "no source", "missing file", "bad template"])
def test_the_check_stage_names_what_is_wrong(images, case):
    from pipeline.stages.check import check_params

    tmp, rows = images
    custom, message = _bad_cases(tmp, rows)[case]
    with pytest.raises((ParamsError, CustomDataError), match=message):
        check_params(_params(tmp, custom))


def test_the_check_stage_accepts_a_good_custom_dataset(images):
    from pipeline.stages.check import check_params

    tmp, rows = images
    table = write_csv(tmp / "images" / "data.csv", rows)
    params = check_params(_params(tmp, {"csv": str(table), "id_domains": list(ID_DOMAINS),
                                        "ood_domains": list(OOD_DOMAINS)}))
    assert params.dataset.name == "custom"
    # its source and every image reach DVC through data/external/dataset (links it follows)
    from pipeline.stages.check import external_links

    links = external_links(params)["dataset"]
    assert links["source/custom.csv"] == table
    images = [target for name, target in links.items() if name.startswith("custom/images/")]
    assert len(images) == len(rows) and all(p.is_absolute() and p.is_file() for p in images)
