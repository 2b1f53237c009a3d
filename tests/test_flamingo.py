import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers import draw_shape, losses_fitting_one_batch, open_gates, vlm_batch
from vlm.chat_template import IGNORE_INDEX, encode_fewshot
from vlm.data import easyvqa
from vlm.data.interleaved import pair_records
from vlm.errors import VlmError
from vlm.flamingo import FlamingoModel
from vlm.generation import GenerationConfig, generate, positions
from vlm.resampler import PerceiverResampler, ResamplerConfig
from vlm.train.flamingo import freeze_for_flamingo
from vlm.xattn import MaskedCrossAttention, media_index

RED, BLUE, GREEN = draw_shape("red", "circle"), draw_shape("blue", "rectangle"), draw_shape("green", "circle")


@pytest.mark.parametrize("patches", [4, 64, 300])
def test_resampler_output_shape_does_not_depend_on_patch_count(patches):
    resampler = PerceiverResampler(
        dim=32, config=ResamplerConfig(depth=2, heads=2, head_dim=16, num_latents=8, max_frames=3)
    )
    assert resampler(torch.randn(5, 1, patches, 32)).shape == (5, 8, 32)
    assert resampler(torch.randn(2, 3, patches, 32)).shape == (2, 8, 32)  # three frames per item


def test_resampler_refuses_more_frames_than_it_has_time_embeddings():
    with pytest.raises(ValueError, match="frames"):
        PerceiverResampler(dim=8, config=ResamplerConfig(head_dim=4, max_frames=2))(torch.randn(1, 3, 4, 8))


def test_gates_at_zero_leave_the_lm_unchanged(tiny_flamingo, tiny_lm_and_tokenizer):
    bare, _ = tiny_lm_and_tokenizer
    inputs = vlm_batch(
        tiny_flamingo, [("user", "what? <image>\nand this <image>\ncolor?"), ("assistant", "red")], [RED, BLUE]
    )
    with torch.no_grad():
        wrapped = tiny_flamingo(**inputs).logits
        plain = bare(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert (wrapped - plain).abs().max() < 1e-5


def test_text_before_the_first_image_gets_zero_cross_attention():
    attention = MaskedCrossAttention(dim=16, media_dim=8, heads=2, head_dim=8)
    ids = torch.tensor([[5, 6, 9, 7, 9, 8]])  # 9 = <image>
    index = media_index(ids, 9)
    assert index.tolist() == [[0, 0, 1, 1, 2, 2]]
    out = attention(torch.randn(1, 6, 16), torch.randn(1, 2, 4, 8), index)
    assert torch.equal(out[0, :2], torch.zeros(2, 16))
    assert out[0, 2:].abs().sum() > 0


def test_a_token_after_image_two_ignores_image_one():
    torch.manual_seed(0)
    attention = MaskedCrossAttention(dim=16, media_dim=8, heads=2, head_dim=8)
    x, media = torch.randn(1, 6, 16), torch.randn(1, 2, 4, 8)
    index = torch.tensor([[0, 0, 1, 1, 2, 2]])
    changed = media.clone()
    changed[0, 0] = torch.randn(4, 8)  # a different first image
    before, after = attention(x, media, index), attention(x, changed, index)
    assert torch.equal(before[0, 4:], after[0, 4:])  # after image 2: unaffected
    assert not torch.allclose(before[0, 2:4], after[0, 2:4])  # after image 1: affected


def test_only_resampler_blocks_and_new_token_rows_learn(tiny_flamingo):
    open_gates(tiny_flamingo)
    freeze_for_flamingo(tiny_flamingo)
    inputs = vlm_batch(tiny_flamingo, [("user", "<image>\ncolor?"), ("assistant", "red")], [RED])
    inputs["input_ids"][0, -1] = tiny_flamingo.chunk_end_id  # use the other new token too
    tiny_flamingo(**inputs).loss.backward()
    changed = {name for name, p in tiny_flamingo.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    embeddings = "lm.model.embed_tokens.weight"
    assert {n.split(".")[0] for n in changed} == {"resampler", "lm"}
    assert all(".xattn." in n for n in changed if n.startswith("lm.") and n != embeddings)
    assert any(".xattn." in n for n in changed)
    grad = tiny_flamingo.lm.get_input_embeddings().weight.grad
    learnt_rows = set(grad.abs().sum(-1).nonzero().flatten().tolist())
    assert learnt_rows <= {tiny_flamingo.image_token_id, tiny_flamingo.chunk_end_id} and learnt_rows
    assert not any(p.requires_grad for p in tiny_flamingo.vision.parameters())


def test_a_few_steps_lower_the_loss(tiny_flamingo):
    freeze_for_flamingo(tiny_flamingo)
    inputs = vlm_batch(tiny_flamingo, [("user", "<image>\ncolor?"), ("assistant", "red")], [RED])
    losses = losses_fitting_one_batch(tiny_flamingo, inputs, lr=1e-2)
    # Gates start at 0, so at first only they get gradient: a slow start by design.
    assert losses[-1] < 0.8 * losses[0]


def test_generation_with_cached_image_latents_equals_fresh(tiny_flamingo):
    open_gates(tiny_flamingo)
    messages = [{"role": "user", "content": "<image>\n<image>\nsame color?"}]
    first = tiny_flamingo.chat(messages, [RED, BLUE], max_new_tokens=6)
    assert len(tiny_flamingo._feature_cache) == 2
    follow_up = messages + [{"role": "assistant", "content": first}, {"role": "user", "content": "sure?"}]
    again = tiny_flamingo.chat(follow_up, [RED, BLUE], max_new_tokens=6)
    assert len(tiny_flamingo._feature_cache) == 2  # the follow-up reused both images' latents
    tiny_flamingo._feature_cache.clear()
    assert tiny_flamingo.chat(messages, [RED, BLUE], max_new_tokens=6) == first
    tiny_flamingo._feature_cache.clear()
    assert tiny_flamingo.chat(follow_up, [RED, BLUE], max_new_tokens=6) == again


def test_kv_cache_and_batching_do_not_change_tokens(tiny_flamingo):
    open_gates(tiny_flamingo)
    conversations = [
        [("user", "<image>\ncolor?")],
        [("user", "<image>\nthen <image>\nsame?")],
        [("user", "no image here, just words")],
    ]
    images = [[RED], [BLUE, GREEN], []]
    sequences = [tiny_flamingo.encode(c, generation_prompt=True)[0] for c in conversations]

    def run(rows, use_cache):
        prompt = tiny_flamingo.prepare([sequences[i] for i in rows], [images[i] for i in rows])
        config = GenerationConfig(max_new_tokens=6, use_cache=use_cache)
        return torch.stack(list(generate(tiny_flamingo, prompt, stop_ids=(-1,), pad_id=0, config=config)), dim=1)

    together = run([0, 1, 2], True)
    assert torch.equal(together, run([0, 1, 2], False))
    for i in range(3):
        assert torch.equal(together[i], run([i], True)[0])


def test_concurrent_calls_on_one_model_each_see_their_own_images(tiny_flamingo):
    """The app and the server call one model from many threads: per-call media must not leak."""
    open_gates(tiny_flamingo)
    cases = [
        ([RED], "<image>\ncolor?"),
        ([BLUE, GREEN], "<image>\nthen <image>\nare they the same color?"),
        ([GREEN], "<image>\nwhat shape is it and which colour is it?"),
        ([BLUE], "<image>\nshape?"),
    ]

    def prefill_logits(case):
        images, text = case
        with torch.inference_mode():
            prompt = tiny_flamingo.prepare(
                [tiny_flamingo.encode([("user", text)], generation_prompt=True)[0]], [images]
            )
            mask = prompt.attention_mask
            return tiny_flamingo.step(prompt.embeds, mask, positions(mask), None, prompt, 0)[0]

    alone = [prefill_logits(case) for case in cases]
    assert not torch.allclose(alone[0][:, -1], alone[3][:, -1], atol=1e-3)  # the images matter
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda i: prefill_logits(cases[i % len(cases)]), range(96)))
    for i, logits in enumerate(together):
        assert torch.allclose(logits, alone[i % len(cases)], atol=1e-5), f"call {i} saw another call's images"


def test_save_load_round_trip_gives_identical_logits(tiny_flamingo, tmp_path):
    open_gates(tiny_flamingo)
    tiny_flamingo.save(tmp_path / "m")
    loaded = FlamingoModel.load(tmp_path / "m")
    inputs = vlm_batch(tiny_flamingo, [("user", "<image>\ncolor?"), ("assistant", "red")], [RED])
    with torch.no_grad():
        assert torch.equal(tiny_flamingo(**inputs).logits, loaded(**inputs).logits)


def test_fewshot_prompt_format_and_labels(tiny_flamingo):
    encoded = encode_fewshot(tiny_flamingo.tokenizer, [("what color?", "red")], "what shape?")
    text = tiny_flamingo.tokenizer.decode(encoded.ids)
    assert text == "<image>Question: what color? Answer: red<|endofchunk|><image>Question: what shape? Answer:"
    learnt = [token for token, label in zip(encoded.ids, encoded.labels) if label != IGNORE_INDEX]
    assert tiny_flamingo.tokenizer.decode(learnt) == " red<|endofchunk|>"
    answers = tiny_flamingo.answer_batch(
        [BLUE], ["what shape?"], examples=[[(RED, "what color?", "red")]], max_new_tokens=4
    )
    assert len(answers) == 1


def test_pair_questions_are_balanced_and_right():
    images = list(easyvqa.images("test"))
    records = pair_records(images, 40, seed=0)
    by_path = {im.path: im for im in images}
    answers = [r["conversations"][1]["value"] for r in records]
    assert answers.count("yes") == answers.count("no") == 20
    for record, answer in zip(records, answers):
        first, second = (by_path[p] for p in record["images"])
        attribute = "color" if "color" in record["conversations"][0]["value"] else "shape"
        assert (getattr(first, attribute) == getattr(second, attribute)) == (answer == "yes")
    assert all(len(r["conversations"]) == 2 for r in records)


def test_skewed_pair_questions_say_yes_more_often_for_later_first_values_and_stay_right():
    images = list(easyvqa.images("train"))
    by_path = {im.path: im for im in images}
    same = {value: [] for value in easyvqa.COLORS + easyvqa.SHAPES}
    for record in pair_records(images, 2000, skew=0.4, seed=0):
        first, second = (by_path[p] for p in record["images"])
        attribute = "color" if "color" in record["conversations"][0]["value"] else "shape"
        is_same = getattr(first, attribute) == getattr(second, attribute)
        assert is_same == (record["conversations"][1]["value"] == "yes")
        same[getattr(first, attribute)].append(is_same)
    rate = {value: sum(flags) / len(flags) for value, flags in same.items()}
    assert rate["red"] < 0.25 and rate["black"] > 0.75 and rate["circle"] < 0.2 and rate["triangle"] > 0.8
    assert pair_records(images, 40, skew=0.0, seed=3) == pair_records(images, 40, seed=3)


def test_pair_recall_follow_ups_name_the_first_images_attribute():
    from vlm.data.interleaved import FIRST_IMAGE_QUESTIONS

    images = list(easyvqa.images("test"))
    by_path = {im.path: im for im in images}
    records = pair_records(images, 40, recall=1.0, seed=0)
    for record in records:
        first = by_path[record["images"][0]]
        attribute = "color" if "color" in record["conversations"][0]["value"] else "shape"
        assert [t["value"] for t in record["conversations"][2:]] == [
            FIRST_IMAGE_QUESTIONS[attribute],
            getattr(first, attribute),
        ]


def test_training_end_to_end(tmp_path, pretrained_dirs, shapes_dataset):
    from vlm.load import load_vlm
    from vlm.train.pipeline import train_pipeline

    clip_dir, lm_dir = pretrained_dirs
    names = sorted(p.name for p in (shapes_dataset.parent / "images").iterdir())
    conversations = [
        {
            "id": str(i),
            "images": [f"images/{a}", f"images/{b}"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nsame color?"},
                {"from": "gpt", "value": "yes" if a[:3] == b[:3] else "no"},
            ],
        }
        for i, (a, b) in enumerate(zip(names, reversed(names)))
    ]
    (tmp_path / "c.json").write_text(json.dumps(conversations))
    recipe = {
        "vision": clip_dir,
        "lm": lm_dir,
        "data": str(tmp_path / "c.json"),
        "max_length": 64,
        "resampler": {"depth": 1, "heads": 2, "head_dim": 32, "num_latents": 4, "max_frames": 1},
        "xattn_heads": 2,
        "xattn_head_dim": 32,
        "val_fraction": 0.1,
        "augment": {"formats": 0.5, "hflip": 0.5, "zoom_out": 0.5},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "workers": 0},
    }
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    metrics = train_pipeline("flamingo", str(tmp_path / "recipe.json"), tmp_path / "run")
    assert "val_answer_accuracy" in metrics
    model = load_vlm(str(tmp_path / "run"))
    assert isinstance(model, FlamingoModel)
    assert isinstance(model.chat([{"role": "user", "content": "<image>\n<image>\nsame color?"}], [RED, BLUE]), str)

    # "init" continues the trained model (nearly frozen here by a tiny lr), not a new one.
    recipe["train"]["lr"] = 1e-12
    recipe["init"] = str(tmp_path / "run")
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    train_pipeline("flamingo", str(tmp_path / "recipe.json"), tmp_path / "more")
    before, after = load_vlm(str(tmp_path / "run")), load_vlm(str(tmp_path / "more"))
    gates = [n for n, _ in before.named_parameters() if n.endswith("gate")]
    assert gates and any(before.get_parameter(n).item() != 0 for n in gates)
    for name, param in before.named_parameters():
        torch.testing.assert_close(after.get_parameter(name), param, atol=1e-6, rtol=0)
    recipe["init"] = lm_dir
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(VlmError, match="not a shipped Flamingo model"):
        train_pipeline("flamingo", str(tmp_path / "recipe.json"), tmp_path / "bad")


def test_a_bfloat16_flamingo_answers_as_its_float32_self_nearly(tiny_flamingo):
    """Every tensor the model makes follows its dtype (the latents' batch, the pixels)."""
    import copy

    from PIL import Image

    image = Image.new("RGB", (40, 40), (200, 30, 30))
    half = copy.deepcopy(tiny_flamingo).to(torch.bfloat16)
    ids = torch.tensor([tiny_flamingo.encode([("user", "<image>\nwhat color?")], generation_prompt=True)[0]])
    with torch.no_grad():
        full = tiny_flamingo(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixels=tiny_flamingo.transform(image)[None]
        )
        low = half(input_ids=ids, attention_mask=torch.ones_like(ids), pixels=half.transform(image)[None])
    assert low.logits.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(full.logits[0, -1], low.logits[0, -1].float(), dim=0) > 0.99
    assert isinstance(half.answer(image, "what color?", max_new_tokens=3), str)
