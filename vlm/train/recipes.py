"""Training recipes: a dataclass per model kind, filled from a named JSON file in
vlm/recipes/ or from a user's JSON file. Unknown keys are errors, not silently ignored.

A recipe carries "schema_version" (vlm/schema.py). Version 1 recipes, written before it,
had the easy-VQA data mix and the model's architecture as loose keys ("yes_no_per_image":
12, "projector": ...); they are read by nesting those keys under "mix" (vlm/data/mix.py)
and "model" (LlavaArchitecture, FlamingoArchitecture), where version 2 has them.
"""

import dataclasses
import json
import typing
from pathlib import Path
from typing import TypeVar

from vlm.data.mix import EasyVqaMix
from vlm.errors import VlmError
from vlm.schema import from_dict

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
MIX_KEYS = {f.name for f in dataclasses.fields(EasyVqaMix)}
T = TypeVar("T")


def recipe_names(kind: str) -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob(f"{kind}-*.json"))


def load_recipe(cls: type[T], spec: str, kind: str) -> tuple[T, dict]:
    """(recipe, its JSON as a dict) for a recipe name (vlm/recipes/NAME.json) or a file.

    Raises:
        VlmError: unknown name, unreadable file, an unknown schema version, or keys the
            recipe does not have.
    """
    path = RECIPES_DIR / f"{spec}.json"
    if not path.is_file():
        path = Path(spec)
    if not path.is_file():
        raise VlmError(
            f"unknown {kind} recipe {spec!r}; named recipes: {', '.join(recipe_names(kind)) or 'none'}; or a JSON file"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VlmError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and "schema_version" not in data:
        data = upgrade_v1(cls, data)
    return from_dict(cls, data, str(path)), data


def upgrade_v1(cls: type, data: dict) -> dict:
    """A version 1 recipe in version 2's layout: its loose mix keys (at the top or in a
    stage) under "mix", and the model's architecture fields under "model"."""
    data = _nest(data, MIX_KEYS, "mix", into_stages=True)
    hints = typing.get_type_hints(cls)
    model_type = hints.get("model")
    if dataclasses.is_dataclass(model_type):
        own = {f.name for f in dataclasses.fields(cls)}
        data = _nest(data, {f.name for f in dataclasses.fields(model_type)} - own, "model", into_stages=False)
    return data


def _nest(data: dict, keys: set[str], under: str, *, into_stages: bool) -> dict:
    """`data` with its `keys` moved into the dict `under` (and so in its "stageN" dicts)."""
    rest = {
        k: _nest(v, keys, under, into_stages=True)
        if into_stages and isinstance(v, dict) and k.startswith("stage")
        else v
        for k, v in data.items()
        if k not in keys
    }
    moved = {k: v for k, v in data.items() if k in keys}
    return {**rest, under: {**rest.get(under, {}), **moved}} if moved else rest
