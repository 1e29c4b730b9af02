"""The method registry: the only list of method names (CLI, validation and dvc.yaml read it).

A method is one module of this folder with a class decorated `@register` whose `name = "..."`
is a literal. The registry reads the names from the modules' source without importing them, and
imports a module when its method is first asked for (`get_method`, `METHODS[name]`): a stage
that runs one method runs that method's code only, so its DVC entries can depend on that code
alone (the check stage's records, `data/trials/<trial>.json`). Iterating over `METHODS` imports
every method. A method registered from a module elsewhere (a plugin, imported by the user) is
found once its module has run.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from pipeline.methods.base import Method

_REGISTERED: dict[str, type[Method]] = {}
SHARED = ("base", "common")  # the methods' shared infrastructure, not methods


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under its params.yaml key `cls.name`."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no `name`")
    if cls.name in _REGISTERED and _REGISTERED[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    declared = _declared().get(cls.name)
    if declared is not None and declared != cls.__module__:
        raise ValueError(f"method name {cls.name!r} registered by {cls.__module__}, but {declared} declares it")
    _REGISTERED[cls.name] = cls
    return cls


@functools.cache
def _declared() -> dict[str, str]:
    """{method name: module} of this folder's modules, read from their source (no import)."""
    out: dict[str, str] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in SHARED or info.name.startswith("_"):
            continue
        module = f"{__name__}.{info.name}"
        path = Path(__path__[0]) / f"{info.name}.py"
        for name in _declared_in(path):
            if name in out:
                raise ValueError(f"method name {name!r} registered twice ({out[name]}, {module})")
            out[name] = module
    return out


def _declared_in(path: Path) -> list[str]:
    """The `name` literals of the `@register` classes of a module's source."""
    names = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        if not any(getattr(d, "id", getattr(d, "attr", None)) == "register" for d in node.decorator_list):
            continue
        for stmt in node.body:
            if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "name" for t in stmt.targets)
                    and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
                names.append(stmt.value.value)
                break
        else:
            raise ValueError(f"{path}: @register class {node.name} has no literal `name = \"...\"` "
                             "(the registry reads it from the source)")
    return names


class _Methods(MutableMapping):
    """name -> method class; a method's module is imported when it is first asked for.
    (Mutable for tests that register a method and restore the registry after.)"""

    def __getitem__(self, name: str) -> type[Method]:
        if name not in _REGISTERED and name in _declared():
            importlib.import_module(_declared()[name])
        return _REGISTERED[name]

    def __contains__(self, name: object) -> bool:
        return name in _REGISTERED or name in _declared()

    def __iter__(self) -> Iterator[str]:
        for module in sorted(set(_declared().values())):
            importlib.import_module(module)
        return iter(dict(_REGISTERED))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, name: str, cls: type[Method]) -> None:
        _REGISTERED[name] = cls

    def __delitem__(self, name: str) -> None:
        del _REGISTERED[name]


METHODS: MutableMapping[str, type[Method]] = _Methods()


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def module_of(name: str) -> str:
    """The module that defines method `name`."""
    return _declared().get(name) or get_method(name).__module__


def code_record(name: str) -> dict:
    """What method `name`'s code is: its module and the SHA-256 of every file of the module's
    import closure (`pipeline.core.sources`: the shared infrastructure it imports included),
    and its backbone. The check stage writes it for each compared method and trial; a DVC entry
    that runs one method depends on its record instead of on every method's code."""
    from pipeline.core import sources

    cls = get_method(name)
    files = sources.import_closure(Path(sys.modules[cls.__module__].__file__))
    return {"method": name, "module": cls.__module__, "backbone": cls.backbone, "code": sources.digests(files)}


def trial_record(trial: str, method: str, overrides: dict) -> dict:
    """A trial's record (`data/trials/<trial>.json`, what its finetune entries depend on): its
    method's `code_record`, every hyper-parameter (the overrides over the Hparams defaults) and,
    for a method that reads a captions file (`Method.needs_captions`), the file's SHA-256."""
    from pipeline.core.validation import to_dict

    hp = parse_hparams(method, overrides, f"finetune.trials.{trial}")
    record = {"trial": trial, "hparams": to_dict(hp), **code_record(method)}
    if get_method(method).needs_captions and hp.captions:
        # the captions file's content: editing it re-runs the trial's finetune entries
        from pipeline.core.hashing import file_sha256

        record["captions_sha256"] = file_sha256(Path(hp.captions))
    return record


def parse_hparams(name: str, raw: dict | None, key: str | None = None):
    """Hyper-parameter overrides (a trial of `finetune.trials`, less its `method`) as the
    method's frozen `Hparams`, or ParamsError naming `key`. The class's field defaults are the
    one source of every default."""
    from pipeline.core.validation import parse

    return parse(get_method(name).Hparams, raw or {}, key or f"{name} hparams")
