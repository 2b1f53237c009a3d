"""Damaged or hand-edited model directories and checkpoints are refused in one line that
names the file, never with a traceback."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import write_checkpoint
from vlm import hub
from vlm.clip import load_clip
from vlm.errors import VlmError
from vlm.load import load_vlm


def _edited(directory, tmp_path, edit) -> Path:
    """A copy of a model directory with its config.json replaced by edit(config) (a
    string is written as it is)."""
    copy = tmp_path / "edited"
    shutil.copytree(directory, copy)
    config = edit(json.loads((copy / "config.json").read_text()))
    (copy / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return copy


def _refused(load, spec, path: Path, *words: str) -> None:
    """load(spec) raises a one-line VlmError that starts with `path` and holds `words`."""
    with pytest.raises(VlmError) as raised:
        load(str(spec))
    _one_line_naming(raised.value, path, *words)


def _one_line_naming(error: VlmError, path: Path, *words: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    for word in words:
        assert word in message, message


def _with_model_cfg(config, **changes):
    return {**config, "model_cfg": {**config["model_cfg"], **changes}}


CLIP_CONFIGS = {
    "a list": (lambda c: [], "JSON object"),
    "not JSON": (lambda c: "{nope", "not valid JSON"),
    "kind only": (lambda c: {"kind": "clip"}, "model_cfg"),
    "model_cfg without text_cfg": (lambda c: {**c, "model_cfg": {"embed_dim": 8, "vision_cfg": {}}}, "text_cfg"),
    "model_cfg a string": (lambda c: {**c, "model_cfg": "ViT-B-32"}, "model_cfg"),
    "negative embed_dim": (lambda c: _with_model_cfg(c, embed_dim=-5), "embed_dim"),
    "zero embed_dim": (lambda c: _with_model_cfg(c, embed_dim=0), "embed_dim"),
    "text embed_dim": (lambda c: _with_model_cfg(c, embed_dim="128"), "embed_dim"),
    "negative vision width": (
        lambda c: _with_model_cfg(c, vision_cfg={**c["model_cfg"]["vision_cfg"], "width": -8}),
        "not a valid clip config",
    ),
    "image_mean a number": (lambda c: {**c, "image_mean": 3}, "image_mean"),
    "image_std with a zero": (lambda c: {**c, "image_std": [0.2, 0, 0.2]}, "image_std"),
}


@pytest.mark.parametrize("case", list(CLIP_CONFIGS))
def test_a_bad_clip_config_is_one_line_naming_config_json(tiny_clip_dir, tmp_path, case):
    edit, word = CLIP_CONFIGS[case]
    directory = _edited(tiny_clip_dir, tmp_path, edit)
    _refused(load_clip, directory, directory / "config.json", word)


@pytest.mark.parametrize("content", [os.urandom(2000), b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_weights_that_are_not_safetensors_are_one_line_naming_the_file(tiny_clip_dir, tmp_path, content):
    directory = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, directory)
    (directory / "model.safetensors").write_bytes(content)
    _refused(load_clip, directory, directory / "model.safetensors", "not a readable safetensors file")


def test_read_config_returns_the_object_or_refuses(tmp_path):
    (tmp_path / "config.json").write_text('{"kind": "clip"}')
    assert hub.read_config(tmp_path) == {"kind": "clip"}
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(VlmError, match="must hold a JSON object"):
        hub.read_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(VlmError, match="not valid JSON"):
        hub.read_config(tmp_path)


def _vision_clip(config, **changes):
    clip = config["vision"]["clip"]
    return {**config, "vision": {**config["vision"], "clip": {**clip, "model_cfg": {**clip["model_cfg"], **changes}}}}


# "": the message need only be one line naming the model (a wrong type may be reported in
# the words of the code that tripped on it).
LLAVA_CONFIGS = {
    "a list": (lambda c: [], "JSON object"),
    "no lm": (lambda c: {k: v for k, v in c.items() if k != "lm"}, "lm"),
    "unknown field": (lambda c: {**c, "max_lenght": 64}, "max_lenght"),
    "vision a list": (lambda c: {**c, "vision": []}, ""),
    "vision without clip": (lambda c: {**c, "vision": {"layer": -2}}, "clip"),
    "vision layer a string": (lambda c: {**c, "vision": {**c["vision"], "layer": "penultimate"}}, ""),
    "vision layer out of range": (lambda c: {**c, "vision": {**c["vision"], "layer": 40}}, "layer 40"),
    "vision clip embed_dim negative": (lambda c: _vision_clip(c, embed_dim=-1), "embed_dim"),
    "max_length a string": (lambda c: {**c, "max_length": "long"}, "max_length"),
    "max_length negative": (lambda c: {**c, "max_length": -1}, "max_length"),
    "max_length a bool": (lambda c: {**c, "max_length": True}, "max_length"),
    "max_length beyond the lm": (lambda c: {**c, "max_length": 10**6}, "max_length"),
    "unknown projector": (lambda c: {**c, "projector": "bogus"}, "bogus"),
    "projector a number": (lambda c: {**c, "projector": 2}, ""),
    "lm without model_type": (
        lambda c: {**c, "lm": {k: v for k, v in c["lm"].items() if k != "model_type"}},
        "model_type",
    ),
    "lm of an unknown type": (lambda c: {**c, "lm": {**c["lm"], "model_type": "nope"}}, "nope"),
    "lm a string": (lambda c: {**c, "lm": "llama"}, ""),
}


@pytest.mark.parametrize("case", list(LLAVA_CONFIGS))
def test_a_bad_llava_config_is_one_line_naming_the_model(tiny_llava_dir, tmp_path, case):
    edit, word = LLAVA_CONFIGS[case]
    directory = _edited(tiny_llava_dir, tmp_path, edit)
    _refused(load_vlm, directory, directory, word)


def test_random_llava_weights_are_one_line_naming_the_file(tiny_llava_dir):
    weights = Path(tiny_llava_dir) / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    _refused(load_vlm, tiny_llava_dir, weights, "not a readable safetensors file")


def test_an_untouched_model_directory_still_loads(tiny_llava_dir, tiny_clip_dir):
    assert load_vlm(tiny_llava_dir).max_length == 128
    assert load_clip(tiny_clip_dir).embed_dim > 0


class _Pickled:
    """Any class: torch.save pickles it, and weights_only loading refuses it."""


def test_a_checkpoint_holding_pickled_objects_is_refused_in_one_line(tmp_path):
    from vlm.train.checkpoint import load_checkpoint

    write_checkpoint(tmp_path / "run", {"step": 1, "extra": _Pickled()})
    with pytest.raises(VlmError, match="holds pickled objects that weights_only loading refuses") as raised:
        load_checkpoint(tmp_path / "run")
    _one_line_naming(raised.value, tmp_path / "run" / "checkpoint.pt")


@pytest.mark.parametrize("record", ["[]", "{nope", '{"step": 1}'])
def test_a_damaged_checkpoint_record_is_refused_in_one_line(tmp_path, record):
    from vlm.train.checkpoint import load_checkpoint

    write_checkpoint(tmp_path / "run", {"step": 1})
    (tmp_path / "run" / "checkpoint.json").write_text(record)
    with pytest.raises(VlmError) as raised:
        load_checkpoint(tmp_path / "run")
    _one_line_naming(raised.value, tmp_path / "run" / "checkpoint")
