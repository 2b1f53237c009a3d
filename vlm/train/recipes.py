"""Training recipes: a dataclass per model kind, filled from a named JSON file in
vlm/recipes/ or from a user's JSON file. Unknown keys are errors, not silently ignored."""

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from vlm.errors import VlmError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
T = TypeVar("T")


def recipe_names(kind: str) -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob(f"{kind}-*.json"))


def load_recipe(cls: type[T], spec: str, kind: str) -> tuple[T, dict]:
    """(recipe, its JSON as a dict) for a recipe name (vlm/recipes/NAME.json) or a file.

    Raises:
        VlmError: unknown name, unreadable file, or keys the recipe does not have.
    """
    path = RECIPES_DIR / f"{spec}.json"
    if not path.is_file():
        path = Path(spec)
    if not path.is_file():
        raise VlmError(f"unknown {kind} recipe {spec!r}; named recipes: {', '.join(recipe_names(kind)) or 'none'}; or a JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VlmError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return from_dict(cls, data, str(path)), data


def from_dict(cls: type[T], data: dict, where: str) -> T:
    """Build a (nested) dataclass from a dict, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise VlmError(f"{where}: unknown recipe keys {sorted(unknown)}; known: {sorted(fields)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        field_type = _dataclass_in(fields[name].type)
        if field_type is not None and isinstance(value, dict):
            value = from_dict(field_type, value, f"{where} [{name}]")
        values[name] = value
    return cls(**values)


def _dataclass_in(annotation) -> type | None:
    """The dataclass in an annotation such as `AugmentConfig` or `AugmentConfig | None`."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None
