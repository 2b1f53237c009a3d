import pytest

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
    from tests.conftest import draw_shape

    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_llava.answer(draw_shape("red", "circle"), "what color is the shape?", max_new_tokens=0)
