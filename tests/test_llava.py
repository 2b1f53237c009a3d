import copy
import json
import logging
import re

import pytest
import torch

from tests.helpers import draw_shape, losses_fitting_one_batch, prompt_sensitive, vlm_batch
from vlm.chat_template import IGNORE_INDEX
from vlm.errors import VlmError
from vlm.generation import GenerationConfig, generate
from vlm.llava import LlavaModel, build_llava
from vlm.projector import build_projector
from vlm.train.llava import freeze_for_stage
from vlm.train.vlm_stage import answer_hits
from vlm.vision import VisionTower

RED, BLUE = draw_shape("red", "circle"), draw_shape("blue", "rectangle")


def test_image_features_land_exactly_on_the_image_tokens(tiny_llava):
    model = tiny_llava
    ids, _ = model.encode([("user", "<image>\nwhat color?")])
    input_ids = torch.tensor([ids])
    features = torch.randn(1, model.image_token_count, model.lm.config.hidden_size)
    embeds = model.splice(input_ids, features)
    slots = (input_ids[0] == model.image_token_id).nonzero().squeeze(-1)
    assert len(slots) == model.image_token_count == 64
    assert torch.equal(embeds[0, slots], features[0])
    others = input_ids[0] != model.image_token_id
    assert torch.equal(embeds[0, others], model.token_embeddings(input_ids)[0, others])


def test_placeholder_and_image_counts_must_match(tiny_llava):
    ids, _ = tiny_llava.encode([("user", "<image>\n<image>\nsame?")])
    features = torch.randn(1, 64, tiny_llava.lm.config.hidden_size)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        tiny_llava.splice(torch.tensor([ids]), features)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        tiny_llava.answer_batch([RED], ["<image> again?"])  # answer_batch adds one <image> itself
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        tiny_llava.chat([{"role": "user", "content": "<image>\nsame?"}], [RED, BLUE])


def test_labels_cover_only_the_answers(tiny_llava):
    turns = [("user", "<image>\nwhat color?"), ("assistant", "red"), ("user", "shape?"), ("assistant", "circle")]
    ids, labels = tiny_llava.encode(turns)
    tokenizer = tiny_llava.tokenizer
    learnt = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(learnt) == " red</s> circle</s>"
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == tiny_llava.image_token_id)


def test_conversations_start_with_bos_only_for_tokenizers_that_add_it(tiny_lm_and_tokenizer):
    from tokenizers import processors

    from vlm.chat_template import encode_conversation

    _, ours = tiny_lm_and_tokenizer
    turns = [("user", "what color?"), ("assistant", "red")]
    plain = encode_conversation(ours, turns)
    assert plain.ids[0] != ours.bos_token_id
    llama_like = copy.deepcopy(ours)  # Llama's tokenizers put <s> before every text
    llama_like.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", ours.bos_token_id)]
    )
    encoded = encode_conversation(llama_like, turns)
    assert encoded.ids == [ours.bos_token_id] + plain.ids
    assert encoded.labels == [IGNORE_INDEX] + plain.labels


@pytest.mark.parametrize("name,layers", [("linear", 1), ("mlp2x_gelu", 3), ("mlp3x_gelu", 5)])
def test_projector_types(name, layers):
    projector = build_projector(name, 16, 32)
    assert projector(torch.randn(2, 5, 16)).shape == (2, 5, 32)
    assert len(list(projector.modules())) - (0 if name == "linear" else 1) == layers


def test_unknown_projector_raises():
    for name in ("mlp2x_tanh", "mlp0x_gelu", "conv"):
        with pytest.raises(ValueError, match="mlpNx_ACT"):
            build_projector(name, 4, 4)


def test_projector_activations_and_bias_are_built_as_named():
    relu = build_projector("mlp2x_relu", 4, 6, bias=False)
    assert isinstance(relu[1], torch.nn.ReLU) and relu[0].bias is None and relu[2].bias is None
    assert build_projector("mlp2x_gelu_tanh", 4, 6)[1].approximate == "tanh"


@pytest.mark.parametrize("stage,trained", [(1, {"projector"}), (2, {"projector", "lm"})])
def test_only_the_stages_parameters_get_gradients(tiny_llava, stage, trained):
    freeze_for_stage(tiny_llava, stage)
    batch = vlm_batch(tiny_llava, [("user", "<image>\ncolor?"), ("assistant", "red")], [RED])
    tiny_llava(**batch).loss.backward()
    with_grad = {
        name.split(".")[0] for name, p in tiny_llava.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert with_grad == trained


def _losses_learning_one_answer(model) -> list[float]:
    """Stage-2 losses of 15 steps on one question about RED."""
    freeze_for_stage(model, 2)
    return losses_fitting_one_batch(
        model, vlm_batch(model, [("user", "<image>\ncolor?"), ("assistant", "red")], [RED]), lr=3e-3
    )


def test_a_few_steps_lower_the_loss(tiny_llava):
    losses = _losses_learning_one_answer(tiny_llava)
    assert losses[-1] < 0.5 * losses[0]


QUESTIONS = ["what color is the shape?", "is there a circle in the image? answer yes or no please", "shape?"]


def test_batched_generation_equals_one_at_a_time(tiny_llava):
    config = GenerationConfig(max_new_tokens=6)
    images = [RED, BLUE, None]
    alone = [tiny_llava.answer_batch([im], [q], max_new_tokens=6) for im, q in zip(images, QUESTIONS)]
    together = tiny_llava.answer_batch(images, QUESTIONS, max_new_tokens=config.max_new_tokens)
    assert together == [a[0] for a in alone]


def _tokens(model, use_cache):
    sequences = [model.encode([("user", "<image>\n" + q)], generation_prompt=True)[0] for q in QUESTIONS[:2]]
    prompt = model.prepare(sequences, [[RED], [BLUE]])
    config = GenerationConfig(max_new_tokens=8, use_cache=use_cache)
    return torch.stack(list(generate(model, prompt, stop_ids=(-1,), pad_id=0, config=config)), dim=1)


def test_kv_cache_gives_the_same_tokens_as_recomputing(tiny_llava):
    assert torch.equal(_tokens(tiny_llava, True), _tokens(tiny_llava, False))


def test_sampling_is_seeded(tiny_llava):
    a = tiny_llava.answer(RED, "color?", temperature=1.0, top_p=0.9, seed=3, max_new_tokens=5)
    assert a == tiny_llava.answer(RED, "color?", temperature=1.0, top_p=0.9, seed=3, max_new_tokens=5)


def test_streamed_pieces_join_to_the_whole_answer(tiny_llava):
    messages = [{"role": "user", "content": "<image>\nwhat color?"}]
    pieces = list(tiny_llava.chat(messages, [RED], stream=True, max_new_tokens=8))
    assert "".join(pieces).strip() == tiny_llava.chat(messages, [RED], max_new_tokens=8)


def test_long_conversations_lose_their_oldest_turns(tiny_llava, caplog):
    prompt_sensitive(tiny_llava)  # so the reply depends on which turns and images are kept
    turns = [{"role": "user", "content": "<image>\nwhat color?"}, {"role": "assistant", "content": "red " * 30}]
    turns += [{"role": "user", "content": "and now? " * 3}, {"role": "assistant", "content": "blue"}] * 3
    turns += [{"role": "user", "content": "<image>\nlast one?"}]
    with caplog.at_level(logging.WARNING):
        reply = tiny_llava.chat(turns, [RED, BLUE], max_new_tokens=4)
    dropped = int(re.search(r"dropped the oldest (\d+) turns", caplog.text).group(1))
    assert dropped % 2 == 0 and 0 < dropped < len(turns)  # whole question-answer pairs, the last question kept
    assert reply == tiny_llava.chat(turns[dropped:], [BLUE], max_new_tokens=4)  # the red image went with its turn


def test_save_load_round_trip_gives_identical_logits(tiny_llava, tmp_path):
    tiny_llava.save(tmp_path / "m")
    loaded = LlavaModel.load(tmp_path / "m")
    batch = vlm_batch(tiny_llava, [("user", "<image>\ncolor?"), ("assistant", "red")], [RED])
    with torch.no_grad():
        a, b = tiny_llava(**batch).logits, loaded(**batch).logits
    assert torch.equal(a, b)


def test_answer_hits_counts_whole_answers():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7]])
    logits = torch.zeros(1, 5, 10)
    logits[0, 0, 5] = logits[0, 1, 6] = 1  # first answer (5, 6) predicted right
    logits[0, 3, 2] = 1  # second answer (7) wrong
    assert answer_hits(logits, labels) == (1, 2)


def test_mixtral_sparse_experts_lm_trains(tiny_clip, tiny_lm_and_tokenizer):

    from transformers import AutoModelForCausalLM, MixtralConfig

    _, tokenizer = tiny_lm_and_tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    model = build_llava(vision=VisionTower.from_clip(tiny_clip), lm=lm, tokenizer=tokenizer, max_length=128)
    losses = _losses_learning_one_answer(model)
    assert losses[-1] < 0.5 * losses[0]
    assert isinstance(model.eval().answer(RED, "color?", max_new_tokens=3), str)


def test_real_hf_lm_and_open_clip_vit_from_local_files(tmp_path, tiny_lm_and_tokenizer):
    """The real-pretrained path, offline: an open_clip ViT saved with torch.save and a
    Hugging Face LM + tokenizer saved with save_pretrained, both loaded by name."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from vlm.clip import build_clip, load_clip
    from vlm.lm import load_lm

    torch.manual_seed(0)
    torch.save(build_clip("ViT-S-32").model.state_dict(), tmp_path / "vit.pt")
    _, tokenizer = tiny_lm_and_tokenizer
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=256))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")

    vision = VisionTower.from_clip(load_clip(f"open_clip:ViT-S-32@{tmp_path / 'vit.pt'}"))
    lm, lm_tokenizer = load_lm(str(tmp_path / "gpt2"))
    model = build_llava(vision=vision, lm=lm, tokenizer=lm_tokenizer, max_length=200)
    assert model.image_token_count == 49  # 224 / 32 squared
    losses = _losses_learning_one_answer(model)
    assert losses[-1] < 0.5 * losses[0]
    assert isinstance(model.eval().answer(RED, "color?", max_new_tokens=3), str)


def test_two_stage_training_end_to_end(tmp_path, shapes_dataset, pretrained_dirs):
    from vlm.load import load_vlm
    from vlm.train.pipeline import train_pipeline

    clip_dir, lm_dir = pretrained_dirs
    conversations = [
        {
            "id": str(i),
            "image": f"images/{name}",
            "conversations": [
                {"from": "human", "value": "<image>\ncolor?"},
                {"from": "gpt", "value": name.split("-")[0]},
            ],
        }
        for i, name in enumerate(sorted(p.name for p in (shapes_dataset.parent / "images").iterdir()))
    ]
    (tmp_path / "conversations.json").write_text(json.dumps(conversations))
    train = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "workers": 0}
    recipe = {
        "vision": clip_dir,
        "lm": lm_dir,
        "max_length": 128,
        "val_fraction": 0.1,
        "stage1": {"data": str(shapes_dataset), "train": train},
        "stage2": {"data": str(tmp_path / "conversations.json"), "train": train},
    }
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    metrics = train_pipeline("llava", str(tmp_path / "recipe.json"), tmp_path / "run")  # a version 2 recipe
    assert "val_answer_accuracy" in metrics
    assert json.loads((tmp_path / "run" / "phases" / "stage1" / "model_card.json").read_text())["stage"] == 1
    model = load_vlm(str(tmp_path / "run"))
    assert isinstance(model, LlavaModel) and isinstance(model.answer(RED, "color?"), str)
    recipe["init"] = lm_dir
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(VlmError, match="is not a shipped LLaVA model or a LLaVA model directory"):
        train_pipeline("llava", str(tmp_path / "recipe.json"), tmp_path / "more")
    with pytest.raises(VlmError, match="run --phase stage1 first"):
        train_pipeline("llava", str(tmp_path / "recipe.json"), tmp_path / "fresh", phase="stage2")


def test_one_call_with_more_images_than_the_feature_cache_holds(tiny_llava, monkeypatch):
    import vlm.chat

    monkeypatch.setattr(vlm.chat, "FEATURE_CACHE_SIZE", 2)
    images = [draw_shape(color, "circle", offset=i) for i, color in enumerate(["red", "blue", "green", "red"])]
    features = tiny_llava.image_features(images)
    assert len(features) == 4 and len(tiny_llava._feature_cache) == 2
    assert torch.equal(features[0], tiny_llava.image_features(images[:1])[0])  # recomputed after eviction, same values


def test_max_new_tokens_that_fill_the_context_are_refused_by_name(tiny_llava):
    with pytest.raises(ValueError, match="max_new_tokens 500 leaves no room"):
        tiny_llava.answer(None, "what color?", max_new_tokens=500)
