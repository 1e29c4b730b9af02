"""Your own images as a WILDS dataset, configured in params.yaml (`dataset.name: custom`,
options in `prepare.custom`): a CSV with one row per image, or a folder tree
`<folder>/<domain>/<class>/<image>`.

`build_table` reads and checks the source (the `check` stage runs it before any work, and names
the row or file that is wrong); `generate_dataset` writes the WILDS folder the rest of the
pipeline reads (`custom_v1.0/`: `metadata.csv` with the absolute image paths, labels, domains and
splits, `attributes.json`, `prompts.json`, the RELEASE marker), and `CustomDataset` is the
`WILDSDataset` over it: a domain grouper, and `eval` with accuracy, macro-F1 and worst-domain
accuracy from wilds' own metric code, like the built-in synthetic dataset.

Splits: a `split_column` holds train / id_val / id_test / val / test per row; without one, each
class of the ID domains is cut into train / id_val / id_test by `id_fractions`, and the OOD
domains' images into val / test by `ood_fractions`, in a permutation seeded by `seed`. The ID
domains train and validate in distribution; the OOD domains are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np

from pipeline.core.validation import Bool, Float, Int, Settings, Str

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CustomConfig", "CustomDataError", "build_table", "SPLITS", "VERSION", "FOLDER"]

VERSION = "1.0"
FOLDER = f"custom_v{VERSION}"
SPLITS = ("train", "id_val", "id_test", "val", "test")
ID_SPLITS = ("train", "id_val", "id_test")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


class CustomDataError(ValueError):
    """The custom dataset's source is wrong; the message names the file, row or key."""


@dataclass(frozen=True)
class CustomConfig(Settings):
    """`prepare.custom` of params.yaml: where the images are and how they split."""

    csv: Str | None = None  # one row per image; paths relative to the CSV's folder (or absolute)
    folder: Str | None = None  # or <folder>/<domain>/<class>/<image>
    path_column: Str = "path"
    label_column: Str = "label"  # a class name (or number) per image
    domain_column: Str = "domain"  # hospital, camera, region, year, ...
    split_column: Str | None = None  # optional: train / id_val / id_test / val / test per image
    classnames: tuple[Str, ...] | Str | None = None  # label order and prompt names (a list or a file)
    id_domains: tuple[Str, ...] = ()  # in distribution: train, id_val, id_test
    ood_domains: tuple[Str, ...] = ()  # out of distribution: val, test (never trained on)
    id_fractions: tuple[Float, Float, Float] = (0.6, 0.2, 0.2)  # train, id_val, id_test (no split column)
    ood_fractions: tuple[Float, Float] = (0.5, 0.5)  # val, test (no split column)
    templates: tuple[Str, ...] = DEFAULT_TEMPLATES  # prompt templates with {c}
    seed: Int = 0
    check_images: Bool = True  # open every image header when checking (names the unreadable file)

    def __post_init__(self):
        if (self.csv is None) == (self.folder is None):
            raise ValueError("csv: give either `csv` (a table, one row per image) or `folder` "
                             "(<folder>/<domain>/<class>/<image>)")
        if not self.id_domains:
            raise ValueError("id_domains: list the in-distribution domains (at least one: it trains)")
        if not self.ood_domains:
            raise ValueError("ood_domains: list the out-of-distribution domains (at least one: OOD val and test)")
        both = sorted(set(self.id_domains) & set(self.ood_domains))
        if both:
            raise ValueError(f"ood_domains: {both[0]!r} is also in id_domains; a domain is either ID or OOD")
        for name, fr, n in (("id_fractions", self.id_fractions, 3), ("ood_fractions", self.ood_fractions, 2)):
            if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
                raise ValueError(f"{name}: {list(fr)!r} is not allowed; give {n} non-negative shares that sum to 1")
        if self.id_fractions[0] <= 0:
            raise ValueError("id_fractions: the train share must be positive")
        for i, t in enumerate(self.templates):
            if "{c}" not in t:
                raise ValueError(f"templates: template {i} ({t!r}) lacks the placeholder {{c}}")
        if not self.templates:
            raise ValueError("templates: give at least one template with {c}")


def _fail(where: str, sentence: str) -> CustomDataError:
    return CustomDataError(f"{where}: {sentence}")


def _read_csv(cfg: CustomConfig) -> "pd.DataFrame":
    import pandas as pd

    path = Path(cfg.csv)
    if not path.is_file():
        raise _fail("prepare.custom.csv", f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:  # noqa: BLE001 — pandas raises many kinds; the message names the file
        raise _fail(str(path), f"not a readable CSV ({err})") from None
    columns = [cfg.path_column, cfg.label_column, cfg.domain_column] + ([cfg.split_column] if cfg.split_column else [])
    for key, col in zip(("path_column", "label_column", "domain_column", "split_column"), columns):
        if col not in df.columns:
            raise _fail(str(path), f"no column {col!r} (prepare.custom.{key}); its columns: {', '.join(df.columns)}")
    base = path.parent
    out = pd.DataFrame({
        "path": [str(p if Path(p).is_absolute() else (base / p)) for p in df[cfg.path_column]],
        "label": df[cfg.label_column].str.strip(),
        "domain": df[cfg.domain_column].str.strip(),
        "split": df[cfg.split_column].str.strip() if cfg.split_column else "",
        "row": np.arange(len(df)) + 2,  # the line in the file (the header is line 1)
    })
    for col, key in (("path", "path_column"), ("label", "label_column"), ("domain", "domain_column")):
        empty = out.index[out[col].astype(str).str.strip() == ""]
        if len(empty):
            raise _fail(f"{path} line {out['row'][empty[0]]}", f"empty {getattr(cfg, key)!r}")
    return out


def _read_folder(cfg: CustomConfig) -> "pd.DataFrame":
    import pandas as pd
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(cfg.folder)
    if not root.is_dir():
        raise _fail("prepare.custom.folder", f"{root}: no such folder (<folder>/<domain>/<class>/<image>)")
    rows = []
    for domain in sorted(d for d in root.iterdir() if d.is_dir()):
        for cls in sorted(c for c in domain.iterdir() if c.is_dir()):
            for f in sorted(cls.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS:
                    rows.append((str(f), cls.name, domain.name, "", str(f)))
    if not rows:
        raise _fail(str(root), "no images under <folder>/<domain>/<class>/ "
                               f"(extensions: {', '.join(IMG_EXTENSIONS)})")
    return pd.DataFrame(rows, columns=["path", "label", "domain", "split", "row"])


def _classnames(cfg: CustomConfig, labels: list[str]) -> tuple[list[str], list[str]]:
    """(label values in class order, display names): `classnames` gives both when it lists the
    label values; default: the labels sorted (numerically when every label is a number)."""
    found = sorted(set(labels), key=lambda v: (float(v), v) if _is_number(v) else (float("inf"), v))
    if cfg.classnames is None:
        return found, [v.replace("_", " ") for v in found]
    if isinstance(cfg.classnames, str):
        path = Path(cfg.classnames)
        if not path.is_file():
            raise _fail("prepare.custom.classnames", f"{path}: no such file (one class name per line)")
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        where = str(path)
    else:
        names, where = list(cfg.classnames), "prepare.custom.classnames"
    if set(names) >= set(found):  # the names are the label values themselves (any order)
        return names, [n.replace("_", " ") for n in names]
    if all(_is_number(v) for v in found) and max(int(float(v)) for v in found) < len(names):
        return [str(i) for i in range(len(names))], names  # integer labels index the names
    missing = sorted(set(found) - set(names))
    raise _fail(where, f"{len(names)} class names, but the data has labels {missing[:3]} that are neither a "
                       f"listed name nor an index below {len(names)}")


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _assign_splits(df: "pd.DataFrame", cfg: CustomConfig) -> "pd.Series":
    import pandas as pd

    rng = np.random.default_rng(cfg.seed)
    split = pd.Series([""] * len(df), index=df.index, dtype=object)

    def cut(index, fractions, names):
        order = np.asarray(index)[rng.permutation(len(index))]
        bounds = np.round(np.cumsum(fractions) * len(order)).astype(int)
        start = 0
        for name, end in zip(names, bounds):
            split[order[start:end]] = name
            start = end
        split[order[start:]] = names[-1]

    id_rows = df[df["domain"].isin(cfg.id_domains)]
    for _, g in id_rows.groupby("y", sort=True):  # stratified: every class trains where it can
        cut(g.index, cfg.id_fractions, ID_SPLITS)
    cut(df.index[df["domain"].isin(cfg.ood_domains)], cfg.ood_fractions, ("val", "test"))
    return split


def build_table(cfg: CustomConfig) -> tuple["pd.DataFrame", list[str]]:
    """The checked table (path, label, y, domain, split, row) and the class display names, or
    CustomDataError naming the file, row or key that is wrong."""
    df = _read_csv(cfg) if cfg.csv is not None else _read_folder(cfg)
    src = cfg.csv or cfg.folder
    known = set(cfg.id_domains) | set(cfg.ood_domains)
    unknown = sorted(set(df["domain"]) - known)
    if unknown:
        first = df[df["domain"] == unknown[0]].iloc[0]
        raise _fail(f"{src} ({_where(first, cfg)})", f"domain {unknown[0]!r} is neither in prepare.custom.id_domains "
                                                      f"nor in ood_domains ({', '.join(sorted(known))})")
    absent = [d for d in cfg.id_domains + cfg.ood_domains if d not in set(df["domain"])]
    if absent:
        raise _fail("prepare.custom", f"domain {absent[0]!r} has no image in {src}")
    values, names = _classnames(cfg, df["label"].tolist())
    index = {v: i for i, v in enumerate(values)}
    bad = df.index[~df["label"].isin(index)]
    if len(bad):
        raise _fail(f"{src} ({_where(df.loc[bad[0]], cfg)})", f"label {df['label'][bad[0]]!r} is not a class "
                                                            f"({', '.join(values[:8])}{', ...' if len(values) > 8 else ''})")
    df["y"] = df["label"].map(index).astype(int)
    if cfg.split_column:
        wrong = df.index[~df["split"].isin(SPLITS)]
        if len(wrong):
            raise _fail(f"{src} ({_where(df.loc[wrong[0]], cfg)})",
                        f"split {df['split'][wrong[0]]!r} is not one of {', '.join(SPLITS)}")
        ood_in_id = df.index[df["domain"].isin(cfg.ood_domains) & df["split"].isin(ID_SPLITS)]
        if len(ood_in_id):
            r = df.loc[ood_in_id[0]]
            raise _fail(f"{src} ({_where(r, cfg)})", f"an OOD domain ({r['domain']!r}) in split {r['split']!r}; "
                                                     "OOD domains go to val or test only")
        id_in_ood = df.index[df["domain"].isin(cfg.id_domains) & ~df["split"].isin(ID_SPLITS)]
        if len(id_in_ood):
            r = df.loc[id_in_ood[0]]
            raise _fail(f"{src} ({_where(r, cfg)})", f"an ID domain ({r['domain']!r}) in split {r['split']!r}; "
                                                     "ID domains go to train, id_val or id_test")
    else:
        df["split"] = _assign_splits(df, cfg)
    trained = set(df.loc[df["split"] == "train", "y"])
    missing = [names[i] for i in range(len(values)) if i not in trained]
    if missing:
        raise _fail(str(src), f"class {missing[0]!r} has no training image (train split of the ID domains "
                              f"{', '.join(cfg.id_domains)}); add images or drop the class")
    for s in SPLITS:
        if not (df["split"] == s).any():
            raise _fail(str(src), f"split {s!r} is empty; give it images (or larger fractions)")
    if cfg.check_images:
        from PIL import Image

        for _, r in df.iterrows():
            try:
                with Image.open(r["path"]) as im:
                    im.verify()
            except FileNotFoundError:
                raise _fail(f"{src} ({_where(r, cfg)})", f"image {r['path']} does not exist") from None
            except Exception as err:  # noqa: BLE001 — PIL raises many kinds for a broken file
                raise _fail(f"{src} ({_where(r, cfg)})", f"image {r['path']} is not readable ({err})") from None
    from pipeline.data.datasets import PLACEHOLDER

    seen: dict[str, str] = {}
    for n in names:
        k = " ".join(n.lower().split())
        if k in seen:
            raise _fail("prepare.custom.classnames", f"{seen[k]!r} and {n!r} give identical prompts; rename one")
        seen[k] = n
    assert all(PLACEHOLDER in t for t in cfg.templates)
    return df, names


def _where(row, cfg: CustomConfig) -> str:
    return f"line {row['row']}" if cfg.csv is not None else str(row["row"])


