"""The method registry: the only list of method names (CLI, validation and dvc.yaml read it)."""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under its params.yaml key `cls.name`."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "common") and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()


def parse_hparams(name: str, raw: dict | None, key: str | None = None):
    """Hyper-parameter overrides (a trial of `finetune.trials`, less its `method`) as the
    method's frozen `Hparams`, or ParamsError naming `key`. The class's field defaults are the
    one source of every default."""
    from pipeline.core.validation import parse

    return parse(get_method(name).Hparams, raw or {}, key or f"{name} hparams")
