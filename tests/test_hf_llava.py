"""Our LLaVA models as Hugging Face LLaVA checkpoints and back: transformers' LlavaForConditionalGeneration,
loading the export, computes our logits and our greedy answers; a HF LLaVA checkpoint loads into our
LlavaModel with transformers' logits (tiny random models, nothing downloaded)."""

import copy
import json

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlm.errors import VlmError
from vlm.generation import left_pad
from vlm.hf_llava import export_hf_llava
from vlm.load import load_vlm

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


def draw_shape(color: str, shape: str, offset: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), (250, 245, 240))
    box = (12 + offset, 12 + offset, 44 + offset, 44 + offset)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return image


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
    settings = json.loads((out / "tokenizer_config.json").read_text())
    assert settings["padding_side"] == "left"
    assert settings["tokenizer_class"] != "TokenizersBackend"  # a transformers 5 name that 4.x cannot read
    assert "extra_special_tokens" not in settings  # 4.x reads additional_special_tokens
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


def test_export_then_load_gives_bit_identical_tensors(exported):
    from vlm.load import is_vqa_directory

    ours, _, _, out = exported
    assert is_vqa_directory(out)
    back = load_vlm(str(out))
    mine, loaded = ours.state_dict(), back.state_dict()
    assert set(mine) == set(loaded)
    dropped = {"vision.visual.proj"}  # CLIP's pooled projection: no place in the HF format, unused
    assert [k for k in mine if k not in dropped and not torch.equal(mine[k], loaded[k])] == []
    assert (back.config.projector, back.config.vision.layer) == (ours.config.projector, ours.config.vision.layer)
    assert back.answer_batch(images(), QUESTIONS, max_new_tokens=4) == ours.answer_batch(
        images(), QUESTIONS, max_new_tokens=4
    )


def tiny_tokenizer():
    """A BPE tokenizer like a shipped LLaVA's: <image> but no <|endofchunk|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["USER: what color is the shape?\nASSISTANT: red"] * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=["<image>"],
    )


def text_config(family: str, **sizes):
    """A tiny LM config of one of the families the LLaVA checkpoints use: Llama (llava-1.5),
    Qwen2 (llava-interleave: q/k/v biases, tied embeddings), Mistral (bakLLaVA)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if family == "qwen2":
        return Qwen2Config(**sizes, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**sizes, sliding_window=None)
    return LlamaConfig(**sizes)


def save_tiny_hf_llava(directory, *, hidden_act: str, feature_layer: int, strategy: str, family: str = "llama"):
    """A random LlavaForConditionalGeneration shaped like llava-1.5 (CLIP + Llama) or with another LM
    family, saved by transformers."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig

    tokenizer = tiny_tokenizer()
    widths = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
    vision = CLIPVisionConfig(
        **widths,
        num_hidden_layers=3,
        image_size=32,
        patch_size=8,
        hidden_act=hidden_act,
        projection_dim=32,
    )
    text = text_config(
        family,
        **widths,
        num_hidden_layers=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer) + 8,  # padded, as the real checkpoints' are
        max_position_embeddings=256,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, len(tokenizer) + 1]  # as Qwen's: two stops
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return model, tokenizer


@pytest.mark.parametrize("hidden_act, feature_layer, strategy", [("quick_gelu", -2, "default"), ("gelu", 2, "full")])
def test_hf_llava_built_with_transformers_loads_with_its_logits(tmp_path, hidden_act, feature_layer, strategy):
    theirs, tokenizer = save_tiny_hf_llava(
        tmp_path, hidden_act=hidden_act, feature_layer=feature_layer, strategy=strategy
    )
    ours = load_vlm(str(tmp_path))
    assert set(ours.stop_ids()) >= {tokenizer.eos_token_id, *theirs.generation_config.eos_token_id}
    image_tokens = 16 + (strategy == "full")  # (32 / 8)^2 patches, + CLS when kept
    assert ours.image_token_count == image_tokens
    text = tokenizer("USER: what color is the shape?\nASSISTANT:")["input_ids"]
    ids = torch.tensor([[ours.image_token_id] * image_tokens + text] * 2)  # (2, T)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row left padded
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours(input_ids=ids, attention_mask=mask, pixels=pixels).logits
        reference = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (mine - reference)[mask.bool()].abs().max() <= 1e-4


def test_other_hf_model_types_are_refused_in_one_line(tiny_lm_and_tokenizer, tmp_path):
    lm, tokenizer = tiny_lm_and_tokenizer
    lm.save_pretrained(tmp_path / "llama")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    for directory, model_type in ((tmp_path / "llama", "llama"), (tmp_path / "qwen", "qwen2_vl")):
        with pytest.raises(VlmError, match=f"a Hugging Face {model_type} checkpoint.*supported model types: llava"):
            load_vlm(str(directory))


def test_missing_or_unexpected_checkpoint_weights_fail(exported, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, _, out = exported
    state = load_file(str(out / "model.safetensors"))
    for name, changed in (
        ("extra", {**state, "multi_modal_projector.linear_3.weight": torch.zeros(2)}),
        ("missing", {k: v for k, v in state.items() if "encoder.layers.1.mlp.fc2.bias" not in k}),
    ):
        copy_dir = tmp_path / name
        shutil.copytree(out, copy_dir)
        save_file(changed, str(copy_dir / "model.safetensors"))
        with pytest.raises(VlmError, match="unexpected|missing") as error:
            load_vlm(str(copy_dir))
        assert "\n" not in str(error.value)


def _scale_up(theirs) -> None:
    """The LM's weight matrices x8 (and Qwen2's zero-initialised q/k/v biases made random), so
    that answers depend on the prompt and the image."""
    with torch.no_grad():
        for name, param in theirs.model.language_model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.mul_(8.0)
            elif name.endswith("proj.bias"):
                param.normal_(0.0, 0.5)


def _left_padded_questions(ours, tokenizer):
    """(pictures, (B, T) ids left padded, (B, T) mask, (B, 3, S, S) pixels) for QUESTIONS."""
    pictures = [image.resize((32, 32)) for image in images()]
    sequences = [ours.encode([("user", f"<image>\n{q}")], generation_prompt=True)[0] for q in QUESTIONS]
    ids, mask = left_pad(sequences, tokenizer.pad_token_id)
    return pictures, ids, mask, torch.stack([ours.transform(picture) for picture in pictures])


def _generated(theirs, ours, tokenizer, ids, mask, pixels) -> list[str]:
    """transformers' greedy answers (6 new tokens, our stop tokens) to a left-padded batch."""
    with torch.no_grad():
        tokens = theirs.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=list(ours.stop_ids()),
            pad_token_id=tokenizer.pad_token_id,
        )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens[:, ids.shape[1] :]]


def test_hf_llava_loaded_answers_as_transformers_generates_on_a_left_padded_batch(tmp_path):
    theirs, tokenizer = save_tiny_hf_llava(tmp_path, hidden_act="quick_gelu", feature_layer=-2, strategy="default")
    _scale_up(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_vlm(str(tmp_path))
    pictures, ids, mask, pixels = _left_padded_questions(ours, tokenizer)
    reference = _generated(theirs, ours, tokenizer, ids, mask, pixels)
    mine = ours.answer_batch(pictures, QUESTIONS, max_new_tokens=6)
    assert mine == reference
    assert len(set(mine)) > 1


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_hf_llava_with_another_lm_family_loads_with_its_logits_and_greedy_answers(tmp_path, family):
    """llava-interleave's LM family (Qwen2; a CLIP tower here, as SigLIP is not supported) and
    bakLLaVA's (Mistral), each with a CLIP quick_gelu tower: the loaded model computes
    transformers' logits and answers as transformers' generate on a left-padded batch."""
    theirs, tokenizer = save_tiny_hf_llava(
        tmp_path, hidden_act="quick_gelu", feature_layer=-2, strategy="default", family=family
    )
    assert theirs.config.text_config.model_type == family
    _scale_up(theirs)
    biases = [n for n, _ in theirs.model.language_model.named_parameters() if n.endswith("proj.bias")]
    assert bool(biases) == (family == "qwen2")
    theirs.save_pretrained(tmp_path)
    ours = load_vlm(str(tmp_path))
    pictures, ids, mask, pixels = _left_padded_questions(ours, tokenizer)
    assert (mask == 0).any()
    with torch.no_grad():
        mine = ours(input_ids=ids, attention_mask=mask, pixels=pixels).logits
        reference = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    diff = (mine - reference)[mask.bool()].abs().max().item()
    print(f"{family}: max abs logit diff vs transformers: {diff:.2e}")
    assert diff <= 1e-4
    expected = _generated(theirs, ours, tokenizer, ids, mask, pixels)
    answers = ours.answer_batch(pictures, QUESTIONS, max_new_tokens=6)
    print(f"{family}: answers {answers}")
    assert answers == expected
    assert len(set(answers)) > 1


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tmp_path):
    theirs, _ = save_tiny_hf_llava(tmp_path, hidden_act="quick_gelu", feature_layer=-2, strategy="default")
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    assert load_vlm(str(tmp_path)).image_token_count == 16
    shards[-1].unlink()
    with pytest.raises(VlmError, match=f"missing shard {shards[-1].name}"):
        load_vlm(str(tmp_path))


def test_eval_vqa_and_caption_take_a_hf_llava_directory(exported, tmp_path, capsys):
    from vlm.cli import main

    _, _, _, out = exported
    folder = tmp_path / "images"
    folder.mkdir()
    images()[0].save(folder / "a.png")
    (tmp_path / "vqa.jsonl").write_text('{"image": "images/a.png", "question": "what color?", "answer": "red"}\n')
    assert main(["eval", "vqa", "--model", str(out), "--data", str(tmp_path / "vqa.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 1
    assert main(["caption", str(folder), "--model", str(out), "--out", str(tmp_path / "captions.jsonl")]) == 0
    assert len((tmp_path / "captions.jsonl").read_text().splitlines()) == 1


def test_a_checkpoint_needing_more_memory_than_is_free_is_refused_before_loading(tmp_path, monkeypatch):
    from vlm import hub
    from vlm.hf_import import loading_bytes

    theirs, _ = save_tiny_hf_llava(tmp_path, hidden_act="quick_gelu", feature_layer=-2, strategy="default")
    state = theirs.state_dict()
    parameters = sum(t.numel() for t in state.values())
    renamed = sum(t.numel() for k, t in state.items() if "vision_tower" in k or "multi_modal_projector" in k)
    largest = max(t.numel() for t in state.values())
    for dtype in (torch.float32, torch.bfloat16):  # the model in the compute dtype + what is held as stored (fp32)
        assert loading_bytes(tmp_path, dtype) == parameters * dtype.itemsize + (renamed + largest) * 4
    need = loading_bytes(tmp_path, torch.float32)
    monkeypatch.setattr(hub, "available_memory", lambda: need - 1)
    monkeypatch.setattr("vlm.hf_import.tensors", lambda directory: pytest.fail("the weights were read"))
    with pytest.raises(VlmError, match=r"loading needs about .* GiB of memory .* GiB is free"):
        load_vlm(str(tmp_path))
    monkeypatch.undo()
    assert load_vlm(str(tmp_path)).image_token_count == 16


def test_exported_answers_equal_ours_on_200_easyvqa_test_questions(exported):
    """Evaluation use of the test split: transformers' generate on the export answers 200
    easyvqa:test questions (left-padded batches of 25) exactly as vlmstack does."""
    from vlm.data.sources import vqa_records
    from vlm.images import load_image

    ours, theirs, processor, _ = exported
    records = vqa_records("easyvqa:test")[:200]
    mine, reference = [], []
    for start in range(0, len(records), 25):
        batch = records[start : start + 25]
        pictures = [load_image(r.image) for r in batch]
        questions = [r.question for r in batch]
        inputs = processor(images=pictures, text=hf_prompts(processor, questions), padding=True, return_tensors="pt")
        with torch.no_grad():
            tokens = theirs.generate(**inputs, max_new_tokens=4, do_sample=False)
        reference += [
            t.strip()
            for t in processor.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
        mine += ours.answer_batch(pictures, questions, max_new_tokens=4)
    assert mine == reference
    assert len(set(mine)) > 10
