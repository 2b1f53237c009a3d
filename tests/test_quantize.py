"""Inference precision: dynamic int8 and bfloat16 for the VLMs and CLIP, and the fallbacks."""

import logging

import pytest
import torch

from tests.helpers import draw_shape, vlm_batch
from vlm import quantize
from vlm.clip import load_clip
from vlm.errors import VlmError
from vlm.load import compute_dtype, load_vlm
from vlm.quantize import Precision, clip_precision

PICTURES = [draw_shape(color, shape) for color in ("red", "blue") for shape in ("circle", "rectangle")]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def test_int8_llava_computes_like_float32_on_int8_linear_layers(tiny_llava_dir):
    reference, int8 = load_vlm(tiny_llava_dir), load_vlm(tiny_llava_dir, quantize="int8")
    batch = vlm_batch(reference, [("user", "<image>\nwhat color is the shape?"), ("assistant", "red")], PICTURES[:1])

    assert isinstance(int8.lm.model.layers[0].mlp.up_proj, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(int8.projector[0], torch.ao.nn.quantized.dynamic.Linear)
    with torch.no_grad():
        want, got = reference(**batch).logits, int8(**batch).logits
    assert cosines(got, want).min() > 0.99
    assert isinstance(int8.answer(PICTURES[0], "what color is the shape?"), str)


@pytest.mark.parametrize("precision", [Precision(quantize="int8"), Precision(dtype="bfloat16")])
def test_clip_embeddings_in_lower_precision_point_where_float32_ones_do(tiny_clip_dir, precision):
    reference, low = load_clip(tiny_clip_dir), load_clip(tiny_clip_dir, precision=precision)
    assert cosines(low.encode_images(PICTURES), reference.encode_images(PICTURES)).min() > 0.99
    texts = ["a red circle", "a blue rectangle"]
    assert cosines(low.encode_texts(texts), reference.encode_texts(texts)).min() > 0.99
    assert low.encode_images(PICTURES).dtype == torch.float32


def test_clip_precision_reaches_code_that_loads_a_clip_by_name(tiny_clip_dir):
    with clip_precision(Precision(dtype="bfloat16")):
        inside = load_clip(tiny_clip_dir)
    assert inside.dtype == compute_dtype("bfloat16")
    assert load_clip(tiny_clip_dir).dtype == torch.float32


def test_missing_int8_kernels_fall_back_to_float32_naming_the_kernel(tiny_clip_dir, monkeypatch, caplog):
    monkeypatch.setattr(quantize, "INT8_ENGINES", ("no-such-engine",))
    with caplog.at_level(logging.WARNING):
        clip = load_clip(tiny_clip_dir, precision=Precision(quantize="int8"))
    assert "quantized::linear_dynamic" in caplog.text
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in clip.modules())


def test_int8_with_bfloat16_is_refused_in_one_line(tiny_llava_dir):
    if compute_dtype("bfloat16") != torch.bfloat16:
        pytest.skip("no native bfloat16 here: bfloat16 falls back to float32, which int8 accepts")
    with pytest.raises(VlmError, match="drop --dtype bfloat16"):
        load_vlm(tiny_llava_dir, dtype="bfloat16", quantize="int8")


def test_cli_index_build_embeds_with_int8_clip_and_ray_is_refused(tiny_clip_dir, shapes_dataset, tmp_path, capsys):
    from vlm.cli import main

    folder = str(shapes_dataset.parent / "images")
    args = ["index", "build", folder, "--model", tiny_clip_dir, "--workers", "0"]
    assert main([*args, "--out", str(tmp_path / "index"), "--quantize", "int8"]) == 0
    assert main(["search", str(tmp_path / "index"), "a red circle", "--json", "-k", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) >= 3
    assert main([*args, "--out", str(tmp_path / "ray"), "--dtype", "bfloat16", "--engine", "ray"]) == 2
    assert "--engine local only" in capsys.readouterr().err
