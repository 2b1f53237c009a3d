"""Hugging Face LLaVA checkpoints shaped like llava-interleave (SigLIP tower + Qwen2 LM, select
strategy "full", the processor's own chat template and square resize) and with the other
options real checkpoints use (lists of feature layers, other projector activations, no projector
bias) load into our LlavaModel and agree with transformers: logits, the processor's ids and
pixels, and greedy answers on 100 batched, left-padded prompts with one or two images."""

import json

import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from tests.test_hf_llava import _scale_up, images, text_config, tiny_tokenizer
from vlm.errors import VlmError
from vlm.generation import GenerationConfig, left_pad
from vlm.load import load_vlm

# A chat template in llava-interleave's form (ChatML turns; a message's images before its text).
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SIDE, PATCH = 30, 8  # as SigLIP-so400m's 384 / 14: a side that is not a multiple of the patch
WIDTHS = {"hidden_size": 64, "num_attention_heads": 2}


def save_tiny_llava(
    directory, *, tower="siglip", layer=-1, strategy="full", act="gelu", bias=True, pad=False
) -> LlavaForConditionalGeneration:
    """A random LlavaForConditionalGeneration (answers made prompt-sensitive, vision biases and
    norms random) saved by transformers with a processor: SigLIP + Qwen2 like llava-interleave,
    or a CLIP tower."""
    tokenizer = tiny_tokenizer()
    if tower == "siglip":
        vision = SiglipVisionConfig(
            **WIDTHS, intermediate_size=120, num_hidden_layers=3, image_size=SIDE, patch_size=PATCH
        )
        image_processor = SiglipImageProcessor(size={"height": SIDE, "width": SIDE})
    else:
        vision = CLIPVisionConfig(
            **WIDTHS, intermediate_size=128, num_hidden_layers=3, image_size=SIDE, patch_size=PATCH
        )
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}, do_pad=pad
        )
    text = text_config(
        "qwen2",
        **WIDTHS,
        intermediate_size=128,
        num_hidden_layers=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer) + 8,
        max_position_embeddings=512,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=act,
        multimodal_projector_bias=bias,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    _scale_up(model)
    with torch.no_grad():
        for param in model.model.vision_tower.parameters():
            if param.ndim == 1:  # layer norms and biases away from their 1 / 0 initialisation
                param.add_(torch.randn_like(param) * 0.2)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, len(tokenizer) + 1]
    model.save_pretrained(directory)
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=TEMPLATE,
        patch_size=PATCH,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(tower == "clip"),
    ).save_pretrained(directory)
    return model


def pictures():
    """Four non-square pictures (the SigLIP processor squashes them, CLIP's crops)."""
    return [image.resize((48, 40)) for image in images()]


def prompts(count: int) -> tuple[list[list[tuple[str, str]]], list[list]]:
    """`count` one-turn conversations, every third with two images, and their images."""
    questions = ["what color is it?", "which shape?", "are they the same?", "describe", "red or blue?"]
    shown = pictures()
    conversations, image_lists = [], []
    for i in range(count):
        question = questions[i % len(questions)]
        if i % 3 == 2:
            conversations.append([("user", f"<image>\n<image>\n{question}")])
            image_lists.append([shown[i % 4], shown[(i + 1) % 4]])
        else:
            conversations.append([("user", f"<image>\n{question}")])
            image_lists.append([shown[(i + i // 4) % 4]])
    return conversations, image_lists


def reference_answers(theirs, ours, conversations, image_lists, new_tokens: int) -> list[str]:
    """transformers' greedy answers (generate, our stop tokens) on a left-padded batch of our ids."""
    ids, mask = left_pad(
        [ours.encode(c, generation_prompt=True)[0] for c in conversations], ours.tokenizer.pad_token_id
    )
    pixels = torch.stack([ours.transform(image) for group in image_lists for image in group])
    with torch.no_grad():
        tokens = theirs.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=list(ours.stop_ids()),
            pad_token_id=ours.tokenizer.pad_token_id,
        )
    return [ours.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens[:, ids.shape[1] :]]


def logit_diff(theirs, ours, conversations, image_lists) -> float:
    ids, mask = left_pad(
        [ours.encode(c, generation_prompt=True)[0] for c in conversations], ours.tokenizer.pad_token_id
    )
    pixels = torch.stack([ours.transform(image) for group in image_lists for image in group])
    with torch.no_grad():
        mine = ours(input_ids=ids, attention_mask=mask, pixels=pixels).logits
        reference = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (mask == 0).any()
    return (mine - reference)[mask.bool()].abs().max().item()


@pytest.fixture(scope="module")
def interleave(tmp_path_factory):
    directory = tmp_path_factory.mktemp("interleave")
    theirs = save_tiny_llava(directory)
    return theirs, load_vlm(str(directory)), directory


def test_siglip_qwen2_checkpoint_loads_with_the_processors_ids_pixels_and_transformers_logits(interleave):
    theirs, ours, directory = interleave
    assert ours.config.vision.siglip is not None and ours.image_token_count == (SIDE // PATCH) ** 2 == 9
    assert ours.config.chat_template == TEMPLATE
    processor = LlavaProcessor.from_pretrained(str(directory), backend="pil")
    conversations, image_lists = prompts(3)  # one image, one image, two images
    for conversation, shown in zip(conversations, image_lists):
        question = conversation[0][1].split("\n")[-1]
        parts = [{"type": "image"}] * len(shown) + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        expected = processor(text=text, images=shown, return_tensors="pt")
        assert ours.encode(conversation, generation_prompt=True)[0] == expected["input_ids"][0].tolist()
        pixels = torch.stack([ours.transform(image) for image in shown])
        assert (pixels - expected["pixel_values"]).abs().max() <= 1e-6
    diff = logit_diff(theirs, ours, *prompts(6))
    print(f"SigLIP + Qwen2: max abs logit diff vs transformers: {diff:.2e}")
    assert diff <= 1e-4


def test_siglip_qwen2_answers_as_transformers_generates_on_100_prompts(interleave):
    theirs, ours, _ = interleave
    conversations, image_lists = prompts(100)
    expected, mine = [], []
    for start in range(0, 100, 25):  # batches of 25, left padded (one- and two-image prompts differ in length)
        batch = slice(start, start + 25)
        expected += reference_answers(theirs, ours, conversations[batch], image_lists[batch], new_tokens=6)
        mine += ours.generate_texts(conversations[batch], image_lists[batch], GenerationConfig(max_new_tokens=6))
    assert mine == expected
    assert len(set(mine)) > 5


def test_the_checkpoints_tokenizer_is_used_as_shipped(interleave):
    _, ours, directory = interleave
    vocabulary = json.loads((directory / "tokenizer.json").read_text())
    assert len(ours.tokenizer) == len(vocabulary["model"]["vocab"]) + len(
        [t for t in vocabulary["added_tokens"] if t["content"] not in vocabulary["model"]["vocab"]]
    )
    assert "<|endofchunk|>" not in ours.tokenizer.get_vocab() and ours.chunk_end_id is None


@pytest.mark.parametrize(
    "options",
    [
        {"tower": "clip", "layer": [-3, -1], "strategy": "default", "act": "silu", "bias": False},
        {"tower": "clip", "layer": [1, -2], "strategy": "full", "act": "gelu_pytorch_tanh", "pad": True},
        {"tower": "siglip", "layer": [-2, 2], "strategy": "full", "act": "gelu"},
    ],
    ids=["clip-layer-list-silu-no-bias", "clip-full-tanh-pad", "siglip-layer-list"],
)
def test_feature_layer_lists_projector_options_and_padding_match_transformers(tmp_path, options):
    theirs = save_tiny_llava(tmp_path, **options)
    ours = load_vlm(str(tmp_path))
    assert ours.vision.width == 64 * len(options["layer"])
    assert ours.config.vision.pad_to_square == options.get("pad", False)
    conversations, image_lists = prompts(12)
    diff = logit_diff(theirs, ours, conversations, image_lists)
    print(f"{options}: max abs logit diff vs transformers: {diff:.2e}")
    assert diff <= 1e-4
    answers = ours.generate_texts(conversations, image_lists, GenerationConfig(max_new_tokens=5))
    assert answers == reference_answers(theirs, ours, conversations, image_lists, new_tokens=5)


def test_bfloat16_loads_the_weights_in_bfloat16_and_answers_close_to_float32(interleave):
    theirs, ours, directory = interleave
    half = load_vlm(str(directory), dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    conversations, image_lists = prompts(8)
    ids, mask = left_pad([ours.encode(c, generation_prompt=True)[0] for c in conversations], 0)
    pixels = torch.stack([ours.transform(image) for group in image_lists for image in group])
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask, pixels=pixels).logits[:, -1]
        low = half(input_ids=ids, attention_mask=mask, pixels=pixels).logits[:, -1].float()
    assert torch.nn.functional.cosine_similarity(full, low, dim=-1).min() > 0.99
    assert len(half.generate_texts(conversations, image_lists, GenerationConfig(max_new_tokens=4))) == 8


@pytest.mark.parametrize(
    "options, processor_change, message",
    [
        ({"strategy": "default"}, {}, "SigLIP with select strategy 'default'"),
        ({"act": "tanh"}, {}, "projector activation 'tanh' is not supported"),
        ({}, {"resample": 2}, "image preprocessing not supported: resample 2"),
        ({}, {"size": {"height": 24, "width": 24}}, "image preprocessing not supported: resize"),
    ],
)
def test_what_cannot_be_reproduced_is_refused_in_one_line(tmp_path, options, processor_change, message):
    save_tiny_llava(tmp_path, **options)
    settings_file = tmp_path / "processor_config.json"
    settings = json.loads(settings_file.read_text())
    settings["image_processor"].update(processor_change)
    settings_file.write_text(json.dumps(settings))
    with pytest.raises(VlmError, match=message) as error:
        load_vlm(str(tmp_path))
    assert "\n" not in str(error.value)


def test_dtype_option_of_the_cli_and_its_float32_fallback(interleave, tmp_path, capsys, monkeypatch, caplog):
    from vlm.cli import main
    from vlm.load import compute_dtype

    _, _, directory = interleave
    pictures()[0].save(tmp_path / "a.png")
    (tmp_path / "vqa.jsonl").write_text('{"image": "a.png", "question": "what color?", "answer": "red"}\n')
    command = ["eval", "vqa", "--model", str(directory), "--data", str(tmp_path / "vqa.jsonl"), "--dtype", "bfloat16"]
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 1
    monkeypatch.setattr("vlm.train.trainer.native_bf16", lambda: False)
    assert compute_dtype("bfloat16") == torch.float32
    assert "no native bfloat16" in caplog.text
    with pytest.raises(VlmError, match="unknown dtype 'float16'"):
        compute_dtype("float16")


def test_a_damaged_weights_file_is_one_line(tmp_path):
    save_tiny_llava(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    for name, damaged in (("cut short", data[: len(data) // 2]), ("random bytes", b"\x13\x37" * 500)):
        weights.write_bytes(damaged)
        with pytest.raises(VlmError, match="not a readable safetensors file") as error:
            load_vlm(str(tmp_path))
        assert "\n" not in str(error.value), name
