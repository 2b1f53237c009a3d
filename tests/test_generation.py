import pytest

from tests.helpers import draw_shape, greedy_answer, open_gates, prompt_sensitive
from vlm.chat_template import encode_conversation
from vlm.generation import GenerationConfig


@pytest.mark.parametrize(
    "values, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -5}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_generation_config_refuses_values_no_generation_can_use(values, field):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**values)


def test_generation_config_accepts_the_edges_of_each_range():
    config = GenerationConfig(max_new_tokens=1, temperature=0.0, top_p=1.0)
    assert (config.max_new_tokens, config.temperature, config.top_p) == (1, 0.0, 1.0)
    assert GenerationConfig(temperature=2.0, top_p=1e-6).top_p == 1e-6


def test_max_new_tokens_0_no_longer_answers_with_an_empty_string(tiny_llava):
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_llava.answer(draw_shape("red", "circle"), "what color is the shape?", max_new_tokens=0)


def _no_images(pixels):
    raise AssertionError("a question without an image encoded an image")


@pytest.mark.parametrize("kind", ["tiny_llava", "tiny_flamingo"])
def test_a_question_without_an_image_is_answered_by_the_lm_from_the_text_alone(kind, request, monkeypatch):
    model = request.getfixturevalue(kind)
    open_gates(model)  # then Flamingo's blocks change what its LM says, with or without images
    prompt_sensitive(model)
    question = "what color is the circle?"
    with_image = model.answer(draw_shape("red", "circle"), question, max_new_tokens=6)
    monkeypatch.setattr(model, "encode_images", _no_images)
    answer = model.answer(None, question, max_new_tokens=6)
    text_only = encode_conversation(model.tokenizer, [("user", question)], generation_prompt=True).ids
    assert answer == greedy_answer(model, text_only, 6) != with_image
    assert model.answer(None, question, max_new_tokens=6) == answer  # and again the same
