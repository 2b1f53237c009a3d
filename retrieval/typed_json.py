"""Dataclasses read back from JSON files that vlmstack wrote, each field checked for type.

A manifest may have been edited by hand, truncated or damaged: a field of the wrong type
is a one-line VlmError naming the file and the field, not a TypeError three calls later.
"""

import dataclasses
import json
import math
from typing import TypeVar

from vlm.errors import VlmError

T = TypeVar("T")
_TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", dict: "a JSON object", bool: "true or false"}


def from_json(cls: type[T], data: object, *, where: str, fix: str) -> T:
    """An instance of the dataclass `cls` from parsed JSON.

    Fields must be annotated with one of str, int, float, dict, bool (as written, not as
    strings); an int field refuses true/false and 1.5, a float field refuses NaN.

    Raises:
        VlmError: `data` is not an object, has an unknown field, lacks a field without a
            default, or holds a value of the wrong type. The message is `where`, the
            problem, then `fix`.
    """
    if not isinstance(data, dict):
        raise VlmError(f"{where}: not a JSON object; {fix}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise VlmError(f"{where}: unknown field {name!r}; {fix}")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise VlmError(f"{where}: no {name!r} field; {fix}")
        if name in data and not _is_a(data[name], f.type):
            shown = json.dumps(data[name])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise VlmError(f"{where}: {name} must be {_TYPE_NAMES[f.type]}, not {shown}; {fix}")
    return cls(**data)


def _is_a(value: object, expected: type) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, never to a manifest
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, expected)
