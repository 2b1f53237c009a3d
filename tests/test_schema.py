"""Saved configs and recipes carry a schema_version: today's and earlier files read the
same, an unknown version is refused in one line."""

import json
import shutil
from pathlib import Path

import pytest

from vlm.data import easyvqa
from vlm.errors import VlmError
from vlm.hub import WEIGHTS_DIR
from vlm.load import load_vlm
from vlm.train.flamingo import FlamingoRecipe
from vlm.train.llava import LlavaRecipe
from vlm.train.recipes import RECIPES_DIR, load_recipe


def _flatten_v1(data: dict) -> dict:
    """A version 2 recipe written the way version 1 did: mix and model keys loose."""
    flat = {
        k: _flatten_v1(v) if k.startswith("stage") else v
        for k, v in data.items()
        if k not in ("schema_version", "mix", "model")
    }
    return {**flat, **data.get("mix", {}), **data.get("model", {})}


@pytest.mark.parametrize(
    "cls, name", [(LlavaRecipe, "llava-easyvqa-anneal"), (FlamingoRecipe, "flamingo-easyvqa-augment")]
)
def test_a_version_1_recipe_reads_as_its_version_2_file(cls, name, tmp_path):
    today = json.loads((RECIPES_DIR / f"{name}.json").read_text())
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_flatten_v1(today)))
    assert "mix" not in json.loads(old.read_text()) and "model" not in json.loads(old.read_text())
    assert load_recipe(cls, str(old), "x")[0] == load_recipe(cls, name, "x")[0]


def test_an_unknown_recipe_schema_version_is_refused_naming_it(tmp_path):
    path = tmp_path / "future.json"
    path.write_text(json.dumps({**json.loads((RECIPES_DIR / "llava-easyvqa.json").read_text()), "schema_version": 7}))
    with pytest.raises(VlmError, match=r"schema_version 7 is not one this vlmstack reads") as error:
        load_recipe(LlavaRecipe, str(path), "llava")
    assert "\n" not in str(error.value)


@pytest.fixture
def saved_today(tmp_path):
    """A copy of the shipped LLaVA model with today's config (schema_version 2)."""
    directory = tmp_path / "llava"
    shutil.copytree(WEIGHTS_DIR / "llava-easyvqa", directory)
    model = load_vlm(str(directory))
    model.save(directory)
    return directory


def test_a_model_saved_in_todays_format_loads_and_answers_as_the_shipped_one(saved_today):
    assert json.loads((saved_today / "config.json").read_text())["schema_version"] == 2
    shipped, today = load_vlm("llava-easyvqa"), load_vlm(str(saved_today))
    images = [image.path for image in easyvqa.images("test")[:8]]
    questions = ["what color is the shape?", "what shape is this?"] * 4
    assert today.answer_batch(images, questions) == shipped.answer_batch(images, questions)


def test_an_unknown_model_schema_version_is_refused_naming_it(saved_today):
    config = json.loads((saved_today / "config.json").read_text())
    (saved_today / "config.json").write_text(json.dumps({**config, "schema_version": 99}))
    with pytest.raises(VlmError, match=r"config.json: schema_version 99 is not one this vlmstack reads"):
        load_vlm(str(saved_today))


def test_a_clip_saved_today_carries_the_schema_version_and_a_future_one_is_refused(tiny_clip_dir, tmp_path):
    from vlm.clip import load_clip

    config = json.loads((Path(tiny_clip_dir) / "config.json").read_text())
    assert config["schema_version"] == 2
    future = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, future)
    (future / "config.json").write_text(json.dumps({**config, "schema_version": 3}))
    with pytest.raises(VlmError, match="schema_version 3 is not one this vlmstack reads"):
        load_clip(str(future))
