"""Saved configs and recipes carry a schema_version: today's and earlier files read the
same, an unknown version is refused in one line."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from vlm.data import easyvqa
from vlm.errors import VlmError
from vlm.hub import WEIGHTS_DIR
from vlm.load import load_vlm
from vlm.train.recipes import RECIPES_DIR, load_pipeline


def _flatten_v1(data: dict) -> dict:
    """A version 2 recipe written the way version 1 did: mix and model keys loose."""
    flat = {
        k: _flatten_v1(v) if k.startswith("stage") else v
        for k, v in data.items()
        if k not in ("schema_version", "mix", "model")
    }
    return {**flat, **data.get("mix", {}), **data.get("model", {})}


V2_LLAVA = {
    "schema_version": 2,
    "vision": "clip-easyvqa",
    "model": {"projector": "mlp2x_gelu", "max_length": 384},
    "stage1": {"train": {"epochs": 3, "workers": 0}},
    "stage2": {"mix": {"yes_no_per_image": 12, "recall_attributes": ["color"]}, "train": {"epochs": 1, "lr": 0.0002}},
}
V2_FLAMINGO = {
    "schema_version": 2,
    "model": {"cross_attn_every": 1, "max_length": 256},
    "mix": {"yes_no_per_image": 24, "pair_questions": 16000},
    "augment": {"hflip": 0.5},
    "train": {"epochs": 1, "seed": 3},
}


@pytest.mark.parametrize("kind, v2", [("llava", V2_LLAVA), ("flamingo", V2_FLAMINGO)])
def test_a_version_1_recipe_reads_as_its_version_2_file(kind, v2, tmp_path):
    old, today = tmp_path / "old.json", tmp_path / "v2.json"
    old.write_text(json.dumps(_flatten_v1(v2)))
    today.write_text(json.dumps(v2))
    assert "mix" not in json.loads(old.read_text()) and "model" not in json.loads(old.read_text())
    assert load_pipeline(str(old), kind).resolved() == load_pipeline(str(today), kind).resolved()


def test_version_2_llava_stages_are_two_phases_that_do_not_inherit(tmp_path):
    (tmp_path / "v2.json").write_text(json.dumps(V2_LLAVA))
    stage1, stage2 = load_pipeline(str(tmp_path / "v2.json"), "llava").phases
    assert (stage1.name, stage1.recipe.stage, stage2.name, stage2.recipe.stage) == ("stage1", 1, "stage2", 2)
    assert stage1.recipe.train.workers == 0 and stage2.recipe.train.workers == 1  # stage 2's own default
    assert stage2.recipe.mix.yes_no_per_image == 12 and stage1.recipe.mix.yes_no_per_image == 0
    assert stage2.recipe.model.projector == "mlp2x_gelu" and stage2.recipe.train.lr == 0.0002


@pytest.mark.parametrize("name", ["clip-easyvqa", "lm-easyvqa", "llava-easyvqa", "flamingo-easyvqa"])
def test_the_recipe_in_each_shipped_models_card_still_loads(name, tmp_path):
    """The cards keep the recipe as it was written, in versions 1 and 2."""
    card = json.loads((WEIGHTS_DIR / name / "model_card.json").read_text())
    (tmp_path / "card-recipe.json").write_text(json.dumps(card["recipe"]))
    kind = card["kind"]
    pipeline = load_pipeline(str(tmp_path / "card-recipe.json"), kind)
    assert len(pipeline.phases) == (2 if kind == "llava" else 1)
    written = card["recipe"].get("stage2", card["recipe"])["train"]  # the (last) run's settings
    assert {k: asdict(pipeline.phases[-1].recipe)["train"][k] for k in written} == written


def test_an_unknown_recipe_schema_version_is_refused_naming_it(tmp_path):
    path = tmp_path / "future.json"
    path.write_text(json.dumps({**json.loads((RECIPES_DIR / "llava-easyvqa.json").read_text()), "schema_version": 7}))
    with pytest.raises(VlmError, match=r"schema_version 7 is not one this vlmstack reads") as error:
        load_pipeline(str(path), "llava")
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
