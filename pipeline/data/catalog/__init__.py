"""The dataset catalog: every module here registers its datasets (and corpora) on import.

A new dataset is one module in this folder that calls `register_dataset(DatasetSpec(...))`
(plus its prompt file); a dataset defined outside the project calls the same function from
its own module. See CONTRIBUTING.md.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
