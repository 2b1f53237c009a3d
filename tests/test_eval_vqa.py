import pytest

from vlm.eval.vqa import answer_type, normalize_answer, vqa_metrics


def test_normalisation_strips_case_punctuation_and_articles():
    assert normalize_answer("A Red  circle.") == "red circle"
    assert normalize_answer("The answer: YES!") == "answer yes"


def test_answer_types():
    assert [answer_type(a) for a in ["yes", "No", "teal", "triangle", "3", "a dog"]] == [
        "yes/no",
        "yes/no",
        "color",
        "shape",
        "number",
        "other",
    ]


def test_metrics_on_a_hand_built_case():
    predictions = ["Yes.", "blue", "the circle", "no"]
    answers = ["yes", "red", "circle", "yes"]
    metrics = vqa_metrics(predictions, answers)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["n"] == 4
    assert metrics["per_answer_type"] == {"color": 0.0, "shape": 1.0, "yes/no": 0.5}
