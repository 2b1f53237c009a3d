"""LoRA fine-tuning: adapters saved alone and loaded on their base, the base untouched,
merge, data formats, an int8 base."""

import json
from dataclasses import replace

import pytest
import torch

from tests.helpers import draw_shape, logged_losses, one_error_line, open_gates, prompt_sensitive, vlm_batch
from vlm import hub
from vlm.adapters import ADAPTER_FILE, TOKEN_ROWS, adapter_layers, merge_adapter, set_adapter_enabled
from vlm.errors import VlmError
from vlm.finetune import FinetuneOptions, default_train_config, finetune
from vlm.load import load_vlm

TURNS = [("user", "<image>\nDescribe the image."), ("assistant", "shape: circle; colour: red")]


def quick(**fields) -> FinetuneOptions:
    """Options for a run of a few seconds: 2 epochs of 8-example batches, no validation split."""
    train = replace(default_train_config(), epochs=2, batch_size=8, warmup_steps=2, workers=0, log_every=1, bf16=False)
    return FinetuneOptions(val_fraction=0.0, train=train, **fields)


@pytest.fixture
def styled_captions(shapes_dataset):
    """The shapes captions rewritten as "shape: circle; colour: red"."""
    rows = [json.loads(line) for line in shapes_dataset.read_text().splitlines()]
    for row in rows:
        _, color, shape = row["caption"].split()
        row["caption"] = f"shape: {shape}; colour: {color}"
    path = shapes_dataset.with_name("styled.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scores(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def llava_base(tiny_llava, tmp_path) -> str:
    prompt_sensitive(tiny_llava).save(tmp_path / "base")
    return str(tmp_path / "base")


def test_adapter_is_small_and_the_base_answers_as_before_with_it_off(llava_base, styled_captions, tmp_path):
    base = load_vlm(llava_base)
    image = draw_shape("red", "circle")
    batch = vlm_batch(base, TURNS, [image])
    before_files = hub.file_fingerprint(f"{llava_base}/model.safetensors")
    card = finetune(llava_base, str(styled_captions), tmp_path / "adapter", options=quick(rank=4))

    losses = logged_losses(tmp_path / "adapter")
    assert losses[-1] < losses[0]
    assert hub.file_fingerprint(f"{llava_base}/model.safetensors") == before_files
    assert card["adapter_share"] < 0.1 and card["kind"] == "adapter"
    assert (tmp_path / "adapter" / ADAPTER_FILE).stat().st_size < 200_000
    assert not (tmp_path / "adapter" / hub.WEIGHTS_FILE).exists()

    adapted = load_vlm(str(tmp_path / "adapter"))
    assert not torch.equal(scores(adapted, batch), scores(base, batch))
    set_adapter_enabled(adapted, False)
    assert torch.equal(scores(adapted, batch), scores(base, batch))
    assert adapted.answer(image, "what color is the shape?") == base.answer(image, "what color is the shape?")


def test_merged_model_equals_base_plus_adapter_and_needs_no_peft(llava_base, styled_captions, tmp_path):
    finetune(llava_base, str(styled_captions), tmp_path / "adapter", options=quick(rank=4, train_projector=True))
    adapted = load_vlm(str(tmp_path / "adapter"))
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = load_vlm(str(tmp_path / "merged"))

    assert hub.model_kind(tmp_path / "merged") == "llava" and not adapter_layers(merged)
    batch = vlm_batch(merged, TURNS, [draw_shape("blue", "rectangle")])
    torch.testing.assert_close(scores(merged, batch), scores(adapted, batch), atol=1e-4, rtol=1e-4)


def answer_token_ids(model, captions: list[str]) -> list[int]:
    ids = {model.tokenizer.eos_token_id}
    for caption in captions:
        ids.update(model.tokenizer(f" {caption}", add_special_tokens=False)["input_ids"])
    return sorted(ids)


def untied(model):
    """`model` with its LM's output head a copy of the input embeddings, no longer tied."""
    model.lm.config.tie_word_embeddings = False
    model.config.lm["tie_word_embeddings"] = False  # what save() writes
    model.lm.lm_head.weight = torch.nn.Parameter(model.lm.lm_head.weight.detach().clone())
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_the_answers_token_rows_are_trained_saved_alone_and_merged(tiny_llava, styled_captions, tmp_path, tied):
    base = prompt_sensitive(tiny_llava if tied else untied(tiny_llava))
    base.save(tmp_path / "base")
    finetune(str(tmp_path / "base"), str(styled_captions), tmp_path / "adapter", options=quick(rank=2))

    captions = [json.loads(line)["caption"] for line in styled_captions.read_text().splitlines()]
    tokens = answer_token_ids(base, captions)
    settings = json.loads((tmp_path / "adapter" / hub.CONFIG_FILE).read_text())["settings"]
    assert settings["tokens"] == tokens
    rows, _ = hub.read_weights(tmp_path / "adapter" / ADAPTER_FILE)
    row_shapes = [tuple(t.shape) for name, t in rows.items() if TOKEN_ROWS in name]
    assert row_shapes == [(len(tokens), base.lm.config.hidden_size)] * (1 if tied else 2)

    adapted = load_vlm(str(tmp_path / "adapter"))
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = load_vlm(str(tmp_path / "merged"))
    others = [i for i in range(base.lm.config.vocab_size) if i not in tokens]
    for get in ("get_input_embeddings", "get_output_embeddings"):
        before, after = getattr(base.lm, get)().weight, getattr(merged.lm, get)().weight
        assert torch.equal(after[others], before[others]) and not torch.equal(after[tokens], before[tokens])
    assert (merged.lm.lm_head.weight is merged.lm.get_input_embeddings().weight) == tied
    batch = vlm_batch(merged, TURNS, [draw_shape("red", "circle")])
    torch.testing.assert_close(scores(merged, batch), scores(adapted, batch), atol=1e-4, rtol=1e-4)


def test_an_adapter_on_a_changed_base_is_refused_in_one_line(llava_base, styled_captions, tmp_path):
    finetune(llava_base, str(styled_captions), tmp_path / "adapter", options=quick(rank=2))
    changed = load_vlm(llava_base)
    with torch.no_grad():
        changed.projector[0].weight.add_(0.01)
    changed.save(llava_base)

    with pytest.raises(VlmError, match="use the model it was fine-tuned from") as error:
        load_vlm(str(tmp_path / "adapter"))
    assert "\n" not in str(error.value)


def test_flamingo_trains_lora_and_its_resampler_from_a_folder_of_txt_captions(tiny_flamingo, tmp_path):
    open_gates(tiny_flamingo)
    tiny_flamingo.save(tmp_path / "base")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "rectangle")] * 4):
        draw_shape(color, shape, offset=i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"shape: {shape}; colour: {color}\n")
    draw_shape("green", "circle").save(folder / "uncaptioned.png")

    options = quick(rank=2, train_projector=True)
    finetune(str(tmp_path / "base"), str(folder), tmp_path / "adapter", options=options)

    config = json.loads((tmp_path / "adapter" / hub.CONFIG_FILE).read_text())
    assert config["base_kind"] == "flamingo" and "resampler" in config["settings"]["full"]
    assert not any(".xattn." in t for t in config["settings"]["targets"])
    adapted, base = load_vlm(str(tmp_path / "adapter")), load_vlm(str(tmp_path / "base"))
    assert not torch.equal(adapted.resampler.latents, base.resampler.latents)
    assert isinstance(adapted.answer(draw_shape("red", "circle"), "Describe the image."), str)


def test_an_int8_base_trains_and_its_adapter_loads_on_the_float_base(llava_base, styled_captions, tmp_path):
    card = finetune(llava_base, str(styled_captions), tmp_path / "adapter", options=quick(quantize_base="int8"))
    assert card["options"]["quantize_base"] == "int8"
    losses = logged_losses(tmp_path / "adapter")
    assert losses[-1] < losses[0]
    adapted = load_vlm(str(tmp_path / "adapter"))
    assert adapted.lm.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32


def test_a_run_resumes_from_its_checkpoint(llava_base, styled_captions, tmp_path):
    finetune(llava_base, str(styled_captions), tmp_path / "adapter", options=quick(rank=2))
    with pytest.raises(VlmError, match="--resume"):
        finetune(llava_base, str(styled_captions), tmp_path / "adapter", options=quick(rank=2))
    card = finetune(llava_base, str(styled_captions), tmp_path / "adapter", options=quick(rank=2), resume=True)
    assert card["kind"] == "adapter"


def test_the_test_split_is_never_trained_on(llava_base, tmp_path):
    with pytest.raises(VlmError, match="evaluation only"):
        finetune(llava_base, "easyvqa:test", tmp_path / "adapter", options=quick())


def test_cli_finetune_eval_and_merge_and_a_wrong_base_in_one_line(llava_base, styled_captions, tmp_path, capsys):
    from vlm.cli import main

    adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
    args = ["--data", str(styled_captions), "--out", adapter, "--lora-rank", "2", "--epochs", "1", "--batch-size", "8"]
    assert main(["finetune", llava_base, *args, "--lora-targets", "q_proj", "v_proj", "--no-train-tokens"]) == 0
    assert "adapter for" in capsys.readouterr().out
    settings = json.loads((tmp_path / "adapter" / hub.CONFIG_FILE).read_text())["settings"]
    assert settings["targets"] == ["q_proj", "v_proj"] and settings["tokens"] == []

    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text(
        json.dumps({"image": "images/red-circle-0.png", "question": "what shape?", "answer": "circle"}) + "\n"
    )
    assert main(["eval", "vqa", "--model", adapter, "--data", str(vqa), "--quantize", "int8"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 1

    other = load_vlm(llava_base)
    with torch.no_grad():
        other.projector[0].bias.add_(0.01)
    other.save(tmp_path / "other")
    assert main(["merge", adapter, "--out", merged, "--base", str(tmp_path / "other")]) == 2
    assert "use the model it was fine-tuned from" in one_error_line(capsys.readouterr().err)
    assert main(["merge", adapter, "--out", merged]) == 0
    assert hub.model_kind(tmp_path / "merged") == "llava"


def test_a_hugging_face_llava_checkpoint_takes_an_adapter_and_merges(styled_captions, tmp_path):
    from tests.test_hf_llava import save_tiny_hf_llava

    save_tiny_hf_llava(tmp_path / "hf", hidden_act="quick_gelu", feature_layer=-2, strategy="default", family="qwen2")
    base = str(tmp_path / "hf")
    card = finetune(base, str(styled_captions), tmp_path / "adapter", options=quick(rank=2, train_projector=True))
    assert card["base"] == base and card["adapter_share"] < 0.2

    adapted = load_vlm(str(tmp_path / "adapter"))
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = load_vlm(str(tmp_path / "merged"))
    batch = vlm_batch(merged, TURNS, [draw_shape("red", "circle")])
    torch.testing.assert_close(scores(merged, batch), scores(adapted, batch), atol=1e-4, rtol=1e-4)
