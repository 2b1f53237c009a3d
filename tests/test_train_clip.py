"""Training CLIP from a recipe (vlm/train/clip.py); the loop it runs is tested in test_trainer.py."""

import json

import pytest

from tests.helpers import logged_losses, tiny_clip_recipe, write_json
from vlm.clip import load_clip
from vlm.errors import VlmError
from vlm.train.pipeline import train_pipeline


def _recipe(tmp_path, data, **train) -> str:
    return write_json(tmp_path / "recipe.json", tiny_clip_recipe(data, **train))


def test_a_few_steps_lower_the_loss_and_leave_a_model_directory(tmp_path, shapes_dataset):
    run = tmp_path / "run"
    train_pipeline("clip", _recipe(tmp_path, shapes_dataset), run)
    losses = logged_losses(run)
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert (run / "curves.png").stat().st_size > 1000
    card = json.loads((run / "model_card.json").read_text())
    assert card["recipe"]["arch"] == "clip-tiny" and card["train_seconds"] > 0
    load_clip(str(run))  # the run directory is a model


def test_corrupt_images_are_skipped_and_counted(tmp_path, shapes_dataset):
    (shapes_dataset.parent / "images" / "red-circle-0.png").write_bytes(b"broken")
    run = tmp_path / "run"
    train_pipeline("clip", _recipe(tmp_path, shapes_dataset, epochs=1), run)
    assert json.loads((run / "model_card.json").read_text())["skipped_images"] == 1


def test_unknown_recipe_key_is_an_error(tmp_path, shapes_dataset):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"arch": "clip-tiny", "data": str(shapes_dataset), "lerning_rate": 1}))
    with pytest.raises(VlmError, match="lerning_rate"):
        train_pipeline("clip", str(path), tmp_path / "run")
