"""Config dataclasses from JSON: the schema version, nested dataclasses, types, unknown keys.

Every config.json a model directory holds and every recipe carries `"schema_version"`.
Version 1 is the layout written before the field existed (files without it); version 2
adds the field and nothing else, so both load the same way. A newer or unknown version
is refused in one line, never guessed at. Recipes number their own layouts on top of
this (version 3: pipelines of phases; vlm/train/recipes.py).

    config = from_dict(LlavaConfig, json.loads(text), "runs/llava/config.json")
"""

import dataclasses
import types
import typing
from typing import Any, TypeVar

from vlm.errors import VlmError

SCHEMA_VERSION = 2  # what this vlmstack writes
READABLE_VERSIONS = (1, 2)  # 1: files written before schema_version existed
T = TypeVar("T")


def schema_field():
    """The `schema_version` field of a saved config: written, never set by hand."""
    return dataclasses.field(default=SCHEMA_VERSION, init=False)


def check_version(data: dict, where: str) -> None:
    """Raises VlmError unless `data` is of a schema version this vlmstack reads."""
    version = data.get("schema_version", 1)
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise VlmError(
            f"{where}: schema_version {version!r} is not one this vlmstack reads ({', '.join(map(str, READABLE_VERSIONS))}); upgrade vlmstack"
        )


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """A (nested) dataclass from a dict: the schema version checked, nested dataclasses
    built, simple types checked (lists become tuples where a tuple is declared), keys the
    dataclass does not have refused. Fields with init=False (kind, schema_version) are read
    back by being left out.

    Raises:
        VlmError: not a dict, an unknown key, a missing field, a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise VlmError(f"{where}: expected a JSON object, got {type(data).__name__}")
    check_version(data, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise VlmError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {
        name: _value(hints[name], value, f"{where} [{name}]") for name, value in data.items() if fields[name].init
    }
    missing = [f.name for f in fields.values() if f.init and f.name not in values and _required(f)]
    if missing:
        raise VlmError(f"{where}: missing {', '.join(missing)}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:  # the dataclass's own checks (__post_init__)
        raise VlmError(f"{where}: {e}") from None


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _value(annotation, value, where: str):
    """`value` checked against (and converted to) `annotation`."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return from_dict(option, value, where)
    for option in options:
        if _fits(option, value):
            return tuple(value) if typing.get_origin(option) is tuple or option is tuple else value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise VlmError(f"{where}: expected {names}, got {value!r:.60}")


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _fits(annotation, value) -> bool:
    base = typing.get_origin(annotation) or annotation
    if base is Any:
        return True
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is tuple:
        return isinstance(value, (list, tuple))
    if dataclasses.is_dataclass(base):
        return isinstance(value, base)
    return isinstance(base, type) and isinstance(value, base)
