import pytest
import torch

from vlm.eval.clip import retrieval_metrics


def test_metrics_on_a_hand_built_case():
    texts = ["a", "b", "c"]
    text_vectors = torch.eye(3)
    # image 0 -> a (right), image 1 -> b (right), image 2 is "c" but looks like "a",
    # image 3 is "a" and looks like "a" less than image 0 does.
    image_vectors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.9, 0, 0.1], [0.5, 0, 0]])
    captions = [{"a"}, {"b"}, {"c"}, {"a"}]
    metrics = retrieval_metrics(image_vectors, captions, text_vectors, texts)
    assert metrics["zeroshot_top1"] == pytest.approx(3 / 4)
    assert metrics["i2t_r1"] == pytest.approx(3 / 4)
    # queries: a -> image 0 (hit); b -> image 1 (hit); c -> image 2 scores 0.1, the top
    # for c (others score 0), so a hit too.
    assert metrics["t2i_r1"] == pytest.approx(1.0)
    assert metrics["t2i_r5"] == pytest.approx(1.0)
    assert metrics["n"] == 4


def test_t2i_counts_a_miss_when_another_caption_wins():
    texts = ["a", "b"]
    image_vectors = torch.tensor([[1.0, 0.0], [0.9, 0.1]])  # image 1 is "b" but looks like "a"
    metrics = retrieval_metrics(image_vectors, [{"a"}, {"b"}], torch.eye(2), texts)
    assert metrics["t2i_r1"] == pytest.approx(1.0)  # "b"'s best is still image 1 (0.1 > 0)
    image_vectors = torch.tensor([[0.2, 0.8], [0.9, 0.1]])  # image 0 ("a") looks like "b"
    metrics = retrieval_metrics(image_vectors, [{"a"}, {"b"}], torch.eye(2), texts)
    assert metrics["t2i_r1"] == pytest.approx(0.0)
    assert metrics["t2i_r5"] == pytest.approx(1.0)
