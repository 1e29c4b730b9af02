"""Tiny WILDS datasets in the exact on-disk layout that the wilds 2.0.0 classes read.

Each `make_<name>(root)` writes `root/<name>_v<version>/` (metadata, RELEASE marker and tiny
images) and returns `root`, ready for `wilds.get_dataset(name, root_dir=root)` or
`pipeline.data.datasets.load_dataset(name, root)`. Every split the dataset defines is
non-empty and covers several classes and groups. Where wilds derives the class count from the
labels present (iWildCam, RxRx1) the fixture has the real count by default, so the shipped
prompt files validate against it; pass a smaller `n_classes` for a smaller fixture.
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "make_iwildcam",
    "make_fmow",
    "make_camelyon17",
    "make_rxrx1",
    "make_waterbirds",
    "FIXTURES",
]

IMAGE_SIZE = 16


def _image(path: Path, rng: np.random.Generator, size: int = IMAGE_SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_csv(path: Path, header: list[str], rows: list[list], index: bool = False) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        # pandas' to_csv(index=True) writes an unnamed first column.
        writer.writerow(([""] if index else []) + header)
        for i, row in enumerate(rows):
            writer.writerow(([i] if index else []) + list(row))


def _data_dir(root: Path, name: str, version: str) -> Path:
    folder = Path(root) / f"{name}_v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"RELEASE_v{version}.txt").write_text(f"{name} v{version} test fixture\n")
    return folder


def make_iwildcam(root: Path, n_classes: int = 182) -> Path:
    """iwildcam_v2.0: metadata.csv with string splits; JPEGs under train/.

    Train locations 0-3 (shared with id_val / id_test), OOD locations 4-5 (val) and 6-7 (test).
    """
    root = Path(root)
    folder = _data_dir(root, "iwildcam", "2.0")
    rng = np.random.default_rng(0)
    samples: list[tuple[str, int, int]] = []  # (split, y, location)
    for y in range(n_classes):  # every label once, so wilds' n_classes = max(y) + 1 holds
        samples.append(("train", y, y % 4))
    for k in range(12):
        samples.append(("train", k % 6, k % 4))
    for split, locations in (("id_val", (0, 1, 2, 3)), ("id_test", (0, 1, 2, 3)), ("val", (4, 5)), ("test", (6, 7))):
        for k in range(8):
            samples.append((split, (3 * k + 1) % min(n_classes, 10), locations[k % len(locations)]))

    header = [
        "split",
        "location_remapped",
        "location",
        "sequence_remapped",
        "sequence",
        "y",
        "datetime",
        "filename",
        "image_id",
    ]
    rows = []
    start = dt.datetime(2013, 6, 9, 16, 1, 38)
    for i, (split, y, location) in enumerate(samples):
        image_id = f"{i:08x}-21bc-11ea-a13a-{i:012x}"
        filename = f"{image_id}.jpg"
        stamp = start + dt.timedelta(days=i, seconds=37 * i)
        rows.append(
            [
                split,
                location,
                100 + 7 * location,
                i // 2,
                f"seq{i // 2:05d}",
                y,
                stamp.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                filename,
                image_id,
            ]
        )
        _image(folder / "train" / filename, rng)
    _write_csv(folder / "metadata.csv", header, rows)
    return root


# ISO 3166 alpha-3 codes to the regions wilds groups FMoW by; "XKX" is deliberately absent
# from the mapping so that one sample falls in wilds' "Other" region, as in the real data.
_FMOW_COUNTRIES = {
    "USA": ("United States of America", "US", "Americas"),
    "BRA": ("Brazil", "BR", "Americas"),
    "FRA": ("France", "FR", "Europe"),
    "DEU": ("Germany", "DE", "Europe"),
    "CHN": ("China", "CN", "Asia"),
    "IND": ("India", "IN", "Asia"),
    "NGA": ("Nigeria", "NG", "Africa"),
    "KEN": ("Kenya", "KE", "Africa"),
    "AUS": ("Australia", "AU", "Oceania"),
}


def make_fmow(root: Path) -> Path:
    """fmow_v1.1: rgb_metadata.csv + country_code_mapping.csv; images/rgb_img_{row}.png.

    Official split (time_after_2016): train / id_val / id_test before 2013, val 2013-2015,
    test 2016-2017, plus 'seq' rows that wilds drops and one late 'train' row it leaves out.
    """
    from wilds.datasets.fmow_dataset import categories

    root = Path(root)
    folder = _data_dir(root, "fmow", "1.1")
    rng = np.random.default_rng(1)
    codes = list(_FMOW_COUNTRIES)
    plan = [  # (split column, years, count)
        ("train", range(2002, 2013), 30),
        ("val", range(2002, 2013), 8),  # -> id_val
        ("test", range(2002, 2013), 8),  # -> id_test
        ("val", range(2013, 2016), 10),  # -> val (OOD)
        ("test", range(2016, 2018), 10),  # -> test (OOD)
        ("seq", range(2010, 2018), 3),  # sequestered, dropped by wilds
        ("train", range(2014, 2015), 1),  # in no split: train-labelled but after 2013
    ]
    header = [
        "split",
        "img_filename",
        "img_path",
        "spatial_reso",
        "country_code",
        "cloud_cover",
        "timestamp",
        "category",
        "lon",
        "lat",
    ]
    rows = []
    for split, years, count in plan:
        for k in range(count):
            row = len(rows)
            year = years[k % len(years)]
            stamp = dt.datetime(year, 1 + k % 12, 1 + (3 * k) % 28, 10, 8, 47)
            # One sample of the OOD test split is in a country without a region.
            code = "XKX" if (split == "test" and year >= 2016 and k == 0) else codes[(row * 5 + k) % len(codes)]
            category = categories[(row * 7) % 12]
            rows.append(
                [
                    split,
                    f"{category}_{row}_0_rgb.jpg",
                    f"{split}/{category}/{category}_{row}",
                    0.5 + 0.01 * k,
                    code,
                    k % 3,
                    stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    category,
                    round(-70.0 + row, 4),
                    round(10.0 + 0.5 * row, 4),
                ]
            )
            _image(folder / "images" / f"rgb_img_{row}.png", rng)
    _write_csv(folder / "rgb_metadata.csv", header, rows)
    _write_csv(
        folder / "country_code_mapping.csv",
        ["name", "alpha-2", "alpha-3", "country-code", "region", "sub-region"],
        [[name, a2, a3, 100 + i, region, ""] for i, (a3, (name, a2, region)) in enumerate(_FMOW_COUNTRIES.items())],
    )
    return root


def make_camelyon17(root: Path) -> Path:
    """camelyon17_v1.0: metadata.csv with an index column and zero-padded patient strings.

    Centers 0, 3, 4 are split 0 (train) / 1 (id_val); wilds moves center 1 to val and
    center 2 to test. Two slides (patient, node) per center, both classes in every split.
    """
    root = Path(root)
    folder = _data_dir(root, "camelyon17", "1.0")
    rng = np.random.default_rng(2)
    header = ["patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"]
    rows = []
    slide = 0
    for center in range(5):
        for j in range(2):
            patient = f"{20 * center + 4 * j + 1:03d}"  # e.g. "001", "005", "021", ...
            node = (center + j) % 5
            for k in range(6):
                x, y = 3200 + 96 * k, 14400 + 32 * k
                split = 1 if (center in (0, 3, 4) and k >= 4) else 0
                tumor = k % 2
                rows.append([patient, node, x, y, tumor, slide, center, split])
                name = f"patient_{patient}_node_{node}"
                _image(folder / "patches" / name / f"patch_{name}_x_{x}_y_{y}.png", rng)
            slide += 1
    _write_csv(folder / "metadata.csv", header, rows, index=True)
    return root


def make_rxrx1(root: Path, n_classes: int = 1139) -> Path:
    """rxrx1_v1.0: metadata.csv; images/{experiment}/Plate{plate}/{well}_s{site}.png.

    dataset 'train' site 1 -> train, 'train' site 2 -> id_test, 'val' -> val, 'test' -> test.
    """
    root = Path(root)
    folder = _data_dir(root, "rxrx1", "1.0")
    rng = np.random.default_rng(3)
    header = [
        "site_id",
        "well_id",
        "cell_type",
        "dataset",
        "experiment",
        "plate",
        "well",
        "site",
        "well_type",
        "sirna",
        "sirna_id",
    ]
    experiments = {
        "train": ["HEPG2-01", "HUVEC-01", "RPE-01", "U2OS-01"],
        "val": ["HEPG2-08", "HUVEC-17"],
        "test": ["HEPG2-09", "RPE-08", "U2OS-04"],
    }
    samples: list[tuple[str, str, int, int]] = []  # (dataset, experiment, site, sirna_id)
    for sirna_id in range(n_classes):  # every label once: wilds' n_classes = max + 1
        samples.append(("train", experiments["train"][sirna_id % 4], 1, sirna_id))
    for k in range(8):
        samples.append(("train", experiments["train"][k % 4], 2, k % 5))
    for dataset in ("val", "test"):
        for k in range(8):
            samples.append((dataset, experiments[dataset][k % len(experiments[dataset])], 1 + k % 2, (2 * k) % 7))
    rows = []
    for i, (dataset, experiment, site, sirna_id) in enumerate(samples):
        plate = 1 + (i // 308) % 4
        well = f"{'BCDEFGHIJKLMNO'[(i // 22) % 14]}{2 + i % 22:02d}"
        rows.append(
            [
                f"{experiment}_{plate}_{well}_{site}",
                f"{experiment}_{plate}_{well}",
                experiment.split("-")[0],
                dataset,
                experiment,
                plate,
                well,
                site,
                "treatment",
                f"s{10000 + sirna_id}",
                sirna_id,
            ]
        )
        _image(folder / "images" / experiment / f"Plate{plate}" / f"{well}_s{site}.png", rng)
    _write_csv(folder / "metadata.csv", header, rows)
    return root


def make_waterbirds(root: Path) -> Path:
    """waterbirds_v1.0: metadata.csv with integer splits (0 train, 1 val, 2 test).

    Every (y, place) group appears in every split; train is spuriously correlated.
    """
    root = Path(root)
    folder = _data_dir(root, "waterbirds", "1.0")
    rng = np.random.default_rng(4)
    birds = {
        0: "026.Bronzed_Cowbird/Bronzed_Cowbird_00{:02d}_796215.jpg",
        1: "001.Black_footed_Albatross/Black_Footed_Albatross_00{:02d}_796111.jpg",
    }
    places = {0: "b/bamboo_forest/00000{:03d}.jpg", 1: "o/ocean/00000{:03d}.jpg"}
    header = ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    rows = []
    # (split, y, place, count): train mostly matches bird and background.
    plan = [(0, 0, 0, 8), (0, 0, 1, 2), (0, 1, 0, 2), (0, 1, 1, 8)]
    plan += [(s, y, p, 3) for s in (1, 2) for y in (0, 1) for p in (0, 1)]
    for split, y, place, count in plan:
        for _ in range(count):
            i = len(rows)
            filename = birds[y].format(i)
            rows.append([i + 1, filename, y, split, place, places[place].format(i)])
            _image(folder / filename, rng)
    _write_csv(folder / "metadata.csv", header, rows)
    return root


FIXTURES = {
    "iwildcam": make_iwildcam,
    "fmow": make_fmow,
    "camelyon17": make_camelyon17,
    "rxrx1": make_rxrx1,
    "waterbirds": make_waterbirds,
}
