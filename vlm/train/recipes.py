"""Recipes: a recipe is a whole pipeline, ordered phases, each one the previous phase's
settings with its own overrides applied. Read from a named JSON file in vlm/recipes/ or a
user's JSON file; unknown keys are errors, never silently ignored.

    {
      "schema_version": 3,
      "vision": "clip-easyvqa", "lm": "phase:lm", "model": {...},  <- set once: what builds the model
      "data": "easyvqa:train", "train": {"batch_size": 32, ...},    <- shared defaults of every phase
      "phases": [
        {"name": "lm", "lm_recipe": "lm-easyvqa"},                  <- trains the LM named "phase:lm"
        {"name": "stage1", "stage": 1, "train": {"epochs": 3}},
        {"name": "stage2", "stage": 2, "mix": {"yes_no_per_image": 12}},
        {"name": "anneal", "train": {"lr": 0.0002}}                 <- stage2's settings, lr changed
      ]
    }

A phase's settings are the previous phase's (the first's: the top level's) with its keys
merged in: dicts ("train", "mix", "augment") key by key, other values replaced. Each
phase's settings are one recipe of the pipeline's kind (the dataclass in
vlm/train/<kind>.py); a key it does not have is refused, naming the phase. The fields that
build the model (the recipe class's `model_fields`) are set at the top level only: later
phases continue the model, so a phase changing them would mean nothing.

A phase with "lm_recipe" (LLaVA and Flamingo pipelines) trains that LM recipe, which must
be one phase, and nothing else: the whole chain from nothing is one recipe. The VLM phases
use it when the pipeline's "lm" is "phase:NAME".

Older recipes still load. Version 2 (no "phases") is one phase named after its kind; a
version 2 LLaVA recipe's "stage1" and "stage2" become phases "stage1" and "stage2", each
written out in full (version 2 stages did not inherit from each other). Version 1 recipes
(no "schema_version") had the easy-VQA data mix and the architecture as loose keys; they
are nested under "mix" and "model" first (`upgrade_v1`).
"""

import dataclasses
import hashlib
import importlib
import json
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlm.data.mix import EasyVqaMix
from vlm.errors import VlmError
from vlm.schema import from_dict

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_VERSION = 3  # what the recipes in vlm/recipes/ are written in
READABLE_RECIPE_VERSIONS = (1, 2, 3)
RECIPE_CLASSES = {"clip": "ClipRecipe", "lm": "LmRecipe", "llava": "LlavaRecipe", "flamingo": "FlamingoRecipe"}
KINDS = tuple(RECIPE_CLASSES)
VLM_KINDS = ("llava", "flamingo")  # kinds whose pipelines may train their LM in a phase
PHASE_REFERENCE = "phase:"  # "lm": "phase:NAME" is the LM phase NAME trained
PHASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a directory name: OUT/phases/NAME
MIX_KEYS = {f.name for f in dataclasses.fields(EasyVqaMix)}
# What a version 2 LLaVA recipe had (its LlavaRecipe and StageRecipe): other keys are refused.
# Plus "init", which replaced the --init flag those recipes ran with (other kinds' version 2
# recipes take it as a field of their recipe class).
V2_LLAVA_KEYS = frozenset(
    {"schema_version", "vision", "vision_layer", "lm", "model", "val_fraction", "stage1", "stage2", "init"}
)
V2_STAGE_KEYS = frozenset({"data", "mix", "train"})


@dataclass(frozen=True)
class Phase:
    name: str
    kind: str  # what it trains: the pipeline's kind, or "lm" for an lm_recipe phase
    recipe: Any  # its resolved settings: a recipe dataclass of that kind (LlavaRecipe, ...)
    recipe_json: dict  # the recipe file it comes from, as written
    lm_recipe: str | None = None  # an lm_recipe phase: the LM recipe it trains

    def resolved(self) -> dict:
        extra = {"lm_recipe": self.lm_recipe} if self.lm_recipe else {}
        return {"name": self.name, "kind": self.kind, **extra, **asdict(self.recipe)}


@dataclass(frozen=True)
class Pipeline:
    kind: str
    source: str  # the recipe name or file it was read from
    recipe_json: dict  # as written
    phases: tuple[Phase, ...]
    overrides: dict = field(default_factory=dict)  # merged into every phase (load_pipeline's)

    def resolved(self) -> dict:
        """Every phase's settings in full: what a run records and its resume compares."""
        return {
            "schema_version": RECIPE_VERSION,
            "kind": self.kind,
            "phases": [json.loads(json.dumps(p.resolved())) for p in self.phases],  # tuples as lists
        }

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()

    def lm_recipes(self) -> dict:
        """The LM recipes of its lm_recipe phases as written, by the name the recipe uses."""
        return {p.lm_recipe: p.recipe_json for p in self.phases if p.lm_recipe}

    def phase(self, name: str) -> Phase:
        for phase in self.phases:
            if phase.name == name:
                return phase
        raise VlmError(f"{self.source} has no phase {name!r}; its phases: {', '.join(p.name for p in self.phases)}")


def recipe_class(kind: str) -> type:
    """The recipe dataclass of a kind (vlm/train/<kind>.py), e.g. LlavaRecipe."""
    if kind not in KINDS:
        raise VlmError(f"unknown recipe kind {kind!r}; choose from {', '.join(KINDS)}")
    return getattr(importlib.import_module(f"vlm.train.{kind}"), RECIPE_CLASSES[kind])


def recipe_names(kind: str) -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob(f"{kind}-*.json"))


def load_pipeline(spec: str, kind: str, *, overrides: dict | None = None) -> Pipeline:
    """The pipeline of a recipe name (vlm/recipes/NAME.json) or file, every phase resolved.

    Args:
        overrides: merged last into every phase's settings (its lm_recipe phases too),
            each key only where the phase's recipe has it: {"train": {"max_steps": 1}}
            makes a trial run of any pipeline.

    Raises:
        VlmError: unknown name, unreadable file, an unknown schema version, a key the
            recipe (or a phase: named) does not have, a bad phase list.
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
    return build_pipeline(data, kind, source=spec, where=str(path), overrides=overrides)


def build_pipeline(
    data: Any, kind: str, *, source: str, where: str, overrides: dict | None = None, lm_recipes: dict | None = None
) -> Pipeline:
    """The pipeline of a recipe as written (a parsed JSON document), every phase resolved.

    Args:
        source: the recipe's name or file, as the pipeline reports it.
        where: what error messages name (a file).
        overrides: as load_pipeline's.
        lm_recipes: the LM recipes of lm_recipe phases as written, by name, read instead of
            their files (a run's record: the recipe it began with, resolved again today).

    Raises:
        VlmError: as load_pipeline.
    """
    overrides, lm_recipes = overrides or {}, lm_recipes or {}
    return _resolve(upgrade(data, kind, where), data, kind, source, where, overrides, lm_recipes)


def upgrade(data: Any, kind: str, where: str) -> dict:
    """A recipe of any readable version in version 3's layout."""
    if not isinstance(data, dict):
        raise VlmError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", 1)
    if version not in READABLE_RECIPE_VERSIONS or isinstance(version, bool):
        raise VlmError(
            f"{where}: schema_version {version!r} is not one this vlmstack reads ({', '.join(map(str, READABLE_RECIPE_VERSIONS))}); upgrade vlmstack"
        )
    if version == 1:
        data = upgrade_v1(recipe_class(kind), data)
    if version < 3:
        data = _upgrade_v2(data, kind, where)
    return data


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


def _upgrade_v2(data: dict, kind: str, where: str) -> dict:
    """Version 2 (one run, or LLaVA's two stages) as version 3's phases. Keys version 2 did
    not have are refused here: version 3's layout would take some ("train", "phases")."""
    if kind != "llava":
        if "phases" in data:
            raise VlmError(f'{where}: "phases" needs "schema_version": 3 (this recipe says 2)')
        shared = {k: v for k, v in data.items() if k != "schema_version"}
        return {**shared, "schema_version": 3, "phases": [{"name": kind}]}
    _refuse_unknown(data, V2_LLAVA_KEYS, where, "a version 2 LLaVA recipe")
    shared = {k: v for k, v in data.items() if k not in ("schema_version", "stage1", "stage2")}
    defaults = asdict(recipe_class("llava")())
    phases = []
    for stage in (1, 2):
        own = data.get(f"stage{stage}", {})
        if not isinstance(own, dict):
            raise VlmError(f"{where} [stage{stage}]: expected a JSON object, got {type(own).__name__}")
        _refuse_unknown(own, V2_STAGE_KEYS, f"{where} [stage{stage}]", "a version 2 LLaVA stage")
        full = {key: defaults[key] for key in V2_STAGE_KEYS}
        phases.append({"name": f"stage{stage}", "stage": stage, **deep_merge(full, own)})
    return {**shared, "schema_version": 3, "phases": phases}


def _refuse_unknown(data: dict, known: frozenset, where: str, what: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise VlmError(f"{where}: unknown keys {unknown}; {what} has only {', '.join(sorted(known))}")


def deep_merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied: dicts merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve(
    data: dict, as_written: dict, kind: str, spec: str, where: str, overrides: dict, lm_recipes: dict
) -> Pipeline:
    cls = recipe_class(kind)
    raw_phases = data.get("phases")
    if not isinstance(raw_phases, list) or not raw_phases:
        raise VlmError(f'{where}: "phases" must be a non-empty list of phases ({{"name": ...}} objects)')
    settings = {k: v for k, v in data.items() if k not in ("schema_version", "phases")}
    from_dict(cls, settings, where)  # the top level on its own, so its errors name it
    names = [_phase_name(raw, where) for raw in raw_phases]
    if len(set(names)) != len(names):
        raise VlmError(f"{where}: phase names repeat ({', '.join(names)}); each phase needs its own")
    phases = []
    for name, raw in zip(names, raw_phases):
        here = f"{where} phase {name!r}"
        changes = {k: v for k, v in raw.items() if k != "name"}
        if "lm_recipe" in changes:
            phases.append(_lm_phase(name, changes, kind, here, overrides, lm_recipes))
            continue
        fixed = sorted(set(changes) & cls.model_fields)
        if fixed:
            raise VlmError(f"{here}: {fixed[0]!r} builds the model, so it is set once at the top level, not in a phase")
        settings = deep_merge(settings, changes)
        recipe = from_dict(cls, deep_merge(settings, _applicable(overrides, cls)), here)
        phases.append(Phase(name=name, kind=kind, recipe=recipe, recipe_json=as_written))
    _check_lm_phases(phases, where)
    return Pipeline(kind=kind, source=spec, recipe_json=as_written, phases=tuple(phases), overrides=overrides)


def _phase_name(raw: Any, where: str) -> str:
    if not isinstance(raw, dict):
        raise VlmError(f"{where}: a phase must be a JSON object with a name, got {raw!r:.60}")
    name = raw.get("name")
    if not isinstance(name, str) or not PHASE_NAME.fullmatch(name):
        raise VlmError(
            f"{where}: phase name {name!r} must be letters, digits, '_', '.' or '-' (it names OUT/phases/NAME)"
        )
    return name


def _applicable(overrides: dict, cls: type) -> dict:
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in overrides.items() if k in fields}


def _lm_phase(name: str, changes: dict, kind: str, here: str, overrides: dict, lm_recipes: dict) -> Phase:
    if kind not in VLM_KINDS:
        raise VlmError(f"{here}: lm_recipe phases belong in llava and flamingo recipes, not {kind}")
    if set(changes) != {"lm_recipe"}:
        raise VlmError(
            f"{here}: unknown keys {sorted(set(changes) - {'lm_recipe'})}; an lm_recipe phase has only name and lm_recipe"
        )
    spec = changes["lm_recipe"]
    if not isinstance(spec, str):
        raise VlmError(f"{here}: lm_recipe must be an LM recipe's name or file, got {spec!r:.60}")
    if spec in lm_recipes:
        lm = build_pipeline(lm_recipes[spec], "lm", source=spec, where=f"{here} lm_recipe", overrides=overrides)
    else:
        lm = load_pipeline(spec, "lm", overrides=overrides)
    if len(lm.phases) != 1:
        raise VlmError(f"{here}: lm_recipe {changes['lm_recipe']!r} has {len(lm.phases)} phases; it must have one")
    return Phase(
        name=name, kind="lm", recipe=lm.phases[0].recipe, recipe_json=lm.recipe_json, lm_recipe=changes["lm_recipe"]
    )


def _check_lm_phases(phases: list[Phase], where: str) -> None:
    """Every "phase:NAME" LM is an lm_recipe phase before the VLM phases, and the VLM is
    built, not continued from "init" (which has its LM); every such phase is used; the
    pipeline trains something of its own kind."""
    vlm = [p for p in phases if p.lm_recipe is None]
    if not vlm:
        raise VlmError(f"{where}: every phase trains an LM; a pipeline needs a phase of its own kind")
    lm = vlm[0].recipe.lm if vlm[0].kind in VLM_KINDS else None
    lm_phases = [p.name for p in phases[: phases.index(vlm[0])] if p.lm_recipe]
    if lm is not None and lm.startswith(PHASE_REFERENCE) and lm[len(PHASE_REFERENCE) :] not in lm_phases:
        raise VlmError(
            f'{where}: "lm": {lm!r} names no lm_recipe phase before the first {vlm[0].kind} phase ({vlm[0].name!r})'
        )
    if lm is not None and lm.startswith(PHASE_REFERENCE) and vlm[0].recipe.init:
        raise VlmError(
            f'{where}: "init": {vlm[0].recipe.init!r} continues a model that has its LM, so "lm": {lm!r} would train for nothing; drop one'
        )
    unused = [p.name for p in phases if p.lm_recipe and lm != PHASE_REFERENCE + p.name]
    if unused:
        raise VlmError(f'{where}: phase {unused[0]!r} trains an LM no phase uses; set "lm": "phase:{unused[0]}"')
