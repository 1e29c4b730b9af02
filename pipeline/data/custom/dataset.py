"""Writing the custom dataset's WILDS folder, and the `WILDSDataset` that reads it."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import pipeline  # noqa: F401  (installs the `outdated` stub before wilds is imported)
from wilds.common.grouper import CombinatorialGrouper
from wilds.datasets.wilds_dataset import WILDSDataset

from pipeline.data.domain_eval import DomainDataset

from pipeline.data.custom.config import FOLDER, VERSION, CustomConfig, build_table
from pipeline.data.scatter import install_scatter_fallback

install_scatter_fallback()  # wilds' group-wise eval imports torch_scatter


def generate_dataset(root: Path, cfg: CustomConfig) -> Path:
    """Write `root/custom_v1.0/` (see the module docstring) in a temp folder swapped in whole."""
    df, names = build_table(cfg)
    root = Path(root)
    final = root / FOLDER
    tmp = root / f".{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    domains = list(cfg.id_domains) + list(cfg.ood_domains)
    out = pd.DataFrame({"path": [str(Path(p).resolve()) for p in df["path"]], "y": df["y"],
                        "label": df["label"], "domain": df["domain"].map({d: i for i, d in enumerate(domains)}),
                        "split": df["split"]})
    out.to_csv(tmp / "metadata.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    # what the dataset is, not how it was read: the same images, labels, domains and splits from a
    # CSV or from a folder tree make the same files, so switching between them re-runs nothing
    how = ("csv", "folder", "path_column", "label_column", "domain_column", "split_column", "check_images")
    (tmp / "attributes.json").write_text(json.dumps({
        "classnames": names, "domains": domains, "id_domains": list(cfg.id_domains),
        "ood_domains": list(cfg.ood_domains),
        "config": {k: v for k, v in asdict(cfg).items() if k not in how}}, indent=1) + "\n")
    (tmp / "prompts.json").write_text(json.dumps({"classnames": names, "templates": list(cfg.templates)},
                                                 indent=1) + "\n")
    (tmp / f"RELEASE_v{VERSION}.txt").write_text("A custom dataset written by pipeline.data.custom.\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final


class CustomDataset(DomainDataset, WILDSDataset):
    """The dataset `generate_dataset` wrote: a WILDS dataset like the built-in synthetic one.

    Splits: train, id_val, id_test (ID domains); val, test (OOD domains). Metadata: domain, y.
    Metric: acc_avg; also F1-macro_all and acc_worst_domain (wilds' Accuracy and F1).
    """

    _dataset_name = "custom"
    _versions_dict = {VERSION: {"download_url": None, "compressed_size": None}}

    def __init__(self, version=None, root_dir="data", download=False, split_scheme="official"):
        self._version = version
        self._split_scheme = split_scheme
        self.check_version()
        data_dir = Path(root_dir) / FOLDER
        if not (data_dir / f"RELEASE_v{VERSION}.txt").is_file():
            raise FileNotFoundError(f"The custom dataset was not found in {data_dir}; the prepare stage writes it "
                                    "from prepare.custom (`dvc repro prepare`).")
        self._data_dir = data_dir
        self.prompt_file = data_dir / "prompts.json"
        df = pd.read_csv(data_dir / "metadata.csv", keep_default_na=False)
        self.attributes = json.loads((data_dir / "attributes.json").read_text())
        self._split_dict = {"train": 0, "val": 1, "test": 2, "id_val": 3, "id_test": 4}
        self._split_names = {"train": "Train", "val": "Validation (OOD)", "test": "Test (OOD)",
                             "id_val": "Validation (ID)", "id_test": "Test (ID)"}
        self._split_array = df["split"].map(self._split_dict).to_numpy()
        self._input_array = df["path"].to_numpy()
        self._y_array = torch.as_tensor(df["y"].to_numpy(), dtype=torch.long)
        self._y_size = 1
        self._n_classes = len(self.attributes["classnames"])
        self._metadata_fields = ["domain", "y"]
        self._metadata_array = torch.as_tensor(np.stack([df["domain"].to_numpy(), df["y"].to_numpy()], axis=1),
                                               dtype=torch.long)
        self._metadata_map = {"domain": list(self.attributes["domains"]), "y": list(self.attributes["classnames"])}
        self._eval_grouper = CombinatorialGrouper(dataset=self, groupby_fields=["domain"])
        super().__init__(root_dir, download, split_scheme)

    def get_input(self, idx):
        with Image.open(self._input_array[idx]) as img:
            return img.convert("RGB")
