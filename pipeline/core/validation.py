"""Typed settings on pydantic: a mapping from params.yaml -> a frozen dataclass, or one sentence
that names the dotted key, the value and what is allowed.

Every settings class of the project (the params.yaml sections, each method's `Hparams`, the
synthetic generator's and the pre-trainer's configs) is a frozen stdlib dataclass whose own
`__post_init__` states its value rules; `parse` validates it with pydantic (unknown keys
forbidden, typed coercion). The scalar aliases below keep YAML honest: `Int` and `Bool` refuse
coercions that hide typos (`true` as a step count, `1.5` as a shot count), `Float` accepts
integers and numeric strings (YAML 1.1, which PyYAML speaks, reads `1e-4` as a string) but not
booleans.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Strict, TypeAdapter, ValidationError

__all__ = ["Int", "Float", "Bool", "Str", "ParamsError", "parse", "check", "to_dict", "Settings"]


class ParamsError(ValueError):
    """A params.yaml value is wrong; the message starts with the dotted key."""


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(_NOT_A_NUMBER)
    return value


_NOT_A_NUMBER = "is not a number"

Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Float = Annotated[float, BeforeValidator(_number)]

FORBID = ConfigDict(extra="forbid")


class Settings:
    """Base of every settings dataclass: pydantic rejects keys the class does not declare."""

    __pydantic_config__ = FORBID


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _type_phrase(kind: str) -> str | None:
    if kind.startswith("int"):
        return "is not an integer"
    if kind.startswith("float"):
        return "is not a number"
    if kind.startswith("bool"):
        return "is not true/false"
    if kind.startswith("string"):
        return "is not a string"
    if kind in ("list_type", "tuple_type", "iterable_type"):
        return "is not a list"
    if kind in ("dict_type", "model_type", "dataclass_type", "model_attributes_type",
                "dataclass_args_type"):
        return "is not a mapping of settings"
    return None


def _dataclass_in(tp) -> type | None:
    """`tp` itself if a dataclass, else the first dataclass among its type arguments (a list
    or union of settings: `tuple[str | RetentionTaskParams, ...]`)."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def _settings_class(cls: type, loc: tuple) -> type | None:
    """The dataclass that owns the last named element of `loc` (for 'allowed keys'); list
    indices step into the list's settings class."""
    for part in loc:
        if isinstance(part, int):
            continue
        if not dataclasses.is_dataclass(cls):
            return None
        cls = _dataclass_in(typing.get_type_hints(cls).get(part))
        if cls is None:
            return None
    return cls


def _is_tag(part) -> bool:
    """A union member tag in a pydantic error location ('str', 'tuple[str, ...]',
    'RetentionTaskParams'), not a key: keys are snake_case."""
    return isinstance(part, str) and ("[" in part or bool(_UNION_TAG.fullmatch(part)) or part[:1].isupper())


def _deepest(errors: list[dict]) -> dict | None:
    """Of a union's errors, the one that got furthest into the value (e.g. an unknown key of a
    mapping member rather than 'is not a string'), with the member tags removed; None when no
    error is deeper than all others."""
    cleaned = [(tuple(p for p in e["loc"] if not _is_tag(p)), e) for e in errors]
    depth = max(len(loc) for loc, _ in cleaned)
    top = [(loc, e) for loc, e in cleaned if len(loc) == depth]
    if len(top) != 1 or sum(len(loc) == depth for loc, _ in cleaned) != 1 or all(len(loc) == depth for loc, _ in cleaned):
        return None
    if not any(_is_tag(p) for p in top[0][1]["loc"]):
        return None
    return {**top[0][1], "loc": top[0][0]}


_UNION_TAG = re.compile(r"(str|int|float|bool|none|tuple\[\w+, \.\.\.\])")


def _join(prefix: str, loc: tuple) -> str:
    key = prefix
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key = f"{key}.{part}" if key else str(part)
    return key


def _did_you_mean(cls: type, prefix: str, loc: tuple, allowed: list[str]) -> str:
    """' (did you mean ...?)' for an unknown key: a close spelling among the allowed keys, or
    the same name one level down (a `seeds` at the top that belongs in `sample`)."""
    import difflib

    name = str(loc[-1])
    owner = _settings_class(cls, loc[:-1])
    for f in dataclasses.fields(owner) if owner else ():
        inner = _settings_class(cls, (*loc[:-1], f.name))
        if inner is not None and name in {g.name for g in dataclasses.fields(inner)}:
            return f" (did you mean {_join(prefix, (*loc[:-1], f.name, name))}?)"
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.75)
    return f" (did you mean {_join(prefix, (*loc[:-1], close[0]))}?)" if close else ""


def _message(cls: type, prefix: str, err: ValidationError) -> str:
    errors = err.errors(include_url=False)
    deep = _deepest(errors) if len(errors) > 1 else None
    if deep is not None:
        errors = [deep]
    first = errors[0]
    loc = tuple(first["loc"])
    # a union reports one error per member, behind a member tag ('str', 'tuple[str, ...]')
    tags = [e["loc"][-1] for e in errors if e["loc"] and tuple(e["loc"][:-1]) == loc[:-1]] if loc else []
    if len(tags) > 1 and all(isinstance(t, str) and _UNION_TAG.fullmatch(t) for t in tags):
        names = " or ".join(re.sub(r"tuple\[(\w+), \.\.\.\]", r"list of \1", t) for t in tags)
        return f"{_join(prefix, loc[:-1])}: {first['input']!r} is not a {names}"
    kind = first["type"]
    key = _join(prefix, loc)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        owner = _settings_class(cls, loc[:-1])
        where = _join(prefix, loc[:-1])
        allowed = sorted(f.name for f in dataclasses.fields(owner) if f.init) if owner else []
        return (f"{key}: unknown key{_did_you_mean(cls, prefix, loc, allowed)}. Allowed keys"
                f"{' in ' + where if where else ''}: {', '.join(allowed)}")
    if kind in ("missing", "missing_argument"):
        if loc and isinstance(loc[-1], int):  # a fixed-length list that is too short
            return f"{_join(prefix, loc[:-1])}: too few values (item {loc[-1]} is missing)"
        return f"{key}: required key is missing"
    if kind == "too_long":
        return f"{key}: too many values ({first['msg'].lower()})"
    if kind == "value_error":
        msg = str(first.get("ctx", {}).get("error", first["msg"]))
        if msg == _NOT_A_NUMBER:
            return f"{key}: {first['input']!r} {msg}"
        # a settings class's own rule ("lr: -1 must be positive" or "sample.seeds: ..."):
        # qualify a bare field name with the section
        head = msg.split(":", 1)[0].strip()
        owner = _settings_class(cls, loc)
        if owner is not None and head in {f.name for f in dataclasses.fields(owner)}:
            return f"{key}.{msg}" if key else msg
        return msg if ("." in head or not key) else f"{key}: {msg}"
    phrase = _type_phrase(kind)
    if phrase:
        return f"{key}: {first['input']!r} {phrase}"
    return f"{key}: {first['msg']}"


def parse(cls: type, data: Any, prefix: str = ""):
    """Build the settings dataclass `cls` from `data` (None = all defaults); ParamsError names
    the dotted key (`prefix` is the key of `data` itself, e.g. 'finetune.trials.dive-lam10')."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{prefix}: expected a mapping of settings, got {data!r}")
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as err:
        raise ParamsError(_message(cls, prefix, err)) from None
    except ParamsError:
        raise
    except ValueError as err:  # a rule raised outside pydantic's wrapping
        raise ParamsError(f"{prefix}: {err}" if prefix else str(err)) from None


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """A value rule: raises ParamsError '<key>: <value> is not allowed; <allowed>'."""
    if not condition:
        raise ParamsError(f"{key}: {value!r} is not allowed; {allowed}")


def to_dict(obj: Any) -> Any:
    """Settings as plain JSON-able data (dataclasses, tuples and paths unfolded)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
