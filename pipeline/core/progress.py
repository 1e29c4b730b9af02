"""Progress bars that stay quiet when stderr is not a terminal (DVC logs, CI)."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(it: Iterable[T], desc: str = "", total: int | None = None, **kw) -> Iterable[T]:
    return tqdm(it, desc=desc, total=total, disable=not sys.stderr.isatty(), leave=False,
                dynamic_ncols=True, **kw)
