"""Our LLaVA models as Hugging Face LLaVA checkpoints: transformers' LlavaForConditionalGeneration,
loading the export, computes our logits and our greedy answers (tiny random models, nothing downloaded)."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.conftest import draw_shape
from vlm.errors import VlmError
from vlm.hf_llava import export_hf_llava

QUESTIONS = ["what color is the shape?", "what shape?", "is there a red circle in the picture?", "color?"]


def prompt_sensitive_llava(tiny_clip, tiny_lm_and_tokenizer, projector: str):
    """A tiny LLaVA whose LM weights are scaled up, so that its random greedy answers depend
    on the whole prompt and image rather than on the last token alone."""
    from vlm.llava import build_llava
    from vlm.vision import VisionTower

    lm, tokenizer = tiny_lm_and_tokenizer
    torch.manual_seed(0)
    model = build_llava(
        vision=VisionTower.from_clip(tiny_clip),
        lm=copy.deepcopy(lm),
        tokenizer=copy.deepcopy(tokenizer),
        projector=projector,
        max_length=128,
    ).eval()
    with torch.no_grad():
        for name, param in model.lm.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.mul_(8.0)
    return model


@pytest.fixture(scope="module", params=["linear", "mlp2x_gelu"])
def exported(request, tiny_clip, tiny_lm_and_tokenizer, tmp_path_factory):
    """(our model, transformers' model loaded from the export, its processor)."""
    ours = prompt_sensitive_llava(tiny_clip, tiny_lm_and_tokenizer, request.param)
    out = export_hf_llava(ours, tmp_path_factory.mktemp("export") / "hf")
    theirs = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    return ours, theirs, AutoProcessor.from_pretrained(str(out)), out


def images():
    return [
        draw_shape(c, s, offset=o)
        for c, s, o in [("red", "circle", 0), ("blue", "rectangle", 3), ("green", "circle", 6), ("red", "rectangle", 1)]
    ]


def hf_prompts(processor, questions):
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    return [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]


def test_export_is_in_the_hub_layout_and_loads_without_missing_keys(exported):
    ours, _, processor, out = exported
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj") for k in keys)
    assert not any(k.startswith("vision_tower.encoder") for k in keys)
    _, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert processor.tokenizer.padding_side == "left"
    assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == "left"
    generation = json.loads((out / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == set(ours.stop_ids())
    assert generation["pad_token_id"] == ours.tokenizer.pad_token_id


def test_processor_gives_our_token_ids_and_pixels(exported):
    ours, _, processor, _ = exported
    batch = processor(images=images()[:1], text=hf_prompts(processor, QUESTIONS[:1]), return_tensors="pt")
    expected = ours.encode([("user", f"<image>\n{QUESTIONS[0]}")], generation_prompt=True)[0]
    assert batch["input_ids"][0].tolist() == expected
    pixels = ours.transform(images()[0])[None]
    assert (batch["pixel_values"] - pixels).abs().max() <= 1e-6


def test_exported_logits_equal_ours(exported):
    ours, theirs, processor, _ = exported
    batch = processor(images=images(), text=hf_prompts(processor, QUESTIONS), padding=True, return_tensors="pt")
    pixels = torch.stack([ours.transform(image) for image in images()])  # (4, 3, S, S)
    with torch.no_grad():
        mine = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixels=pixels).logits
        reference = theirs(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels
        ).logits
    real = batch["attention_mask"].bool()  # (B, T); padded positions are not compared
    assert (mine - reference)[real].abs().max() <= 1e-4


def test_greedy_answers_equal_ours_on_a_left_padded_batch(exported):
    ours, theirs, processor, _ = exported
    batch = processor(images=images(), text=hf_prompts(processor, QUESTIONS), padding=True, return_tensors="pt")
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # the batch really is padded
    with torch.no_grad():
        tokens = theirs.generate(**batch, max_new_tokens=6, do_sample=False)
    reference = processor.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    mine = ours.answer_batch(images(), QUESTIONS, max_new_tokens=6)
    assert mine == [r.strip() for r in reference]
    assert len(set(mine)) > 1  # answers that depend on the prompt, not one constant string


def test_other_projectors_are_refused_in_one_line(tiny_clip, tiny_lm_and_tokenizer, tmp_path):
    model = prompt_sensitive_llava(tiny_clip, tiny_lm_and_tokenizer, "mlp3x_gelu")
    with pytest.raises(VlmError, match="only linear and mlp2x_gelu") as error:
        export_hf_llava(model, tmp_path / "hf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "hf").exists()


def test_cli_export_writes_a_checkpoint_and_refuses_an_existing_directory(tiny_llava_dir, tmp_path, capsys):
    from vlm.cli import main

    out = tmp_path / "hf"
    assert main(["export", tiny_llava_dir, "--format", "hf-llava", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert main(["export", tiny_llava_dir, "--format", "hf-llava", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
