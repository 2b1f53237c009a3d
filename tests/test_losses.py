import math

import torch
import torch.nn.functional as F

from vlm.losses import clip_loss, dedupe_texts, siglip_loss


def _unit(x):
    return F.normalize(x, dim=-1)


def test_without_duplicates_it_is_the_standard_clip_loss():
    torch.manual_seed(0)
    images, texts = _unit(torch.randn(6, 8)), _unit(torch.randn(6, 8))
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * images @ texts.T
    labels = torch.arange(6)
    standard = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(clip_loss(images, texts, labels, scale), standard, atol=1e-6)


def test_identical_captions_are_not_negatives():
    # Images 0 and 1 share caption 0 and sit exactly on it; image 2 sits on caption 1.
    texts = _unit(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    images = texts[[0, 0, 1]]
    targets = torch.tensor([0, 0, 1])
    scale = torch.tensor(math.log(100.0))
    loss = clip_loss(images, texts, targets, scale)
    # image->text is ~0; text->image is ln(2) for the caption with two equally good images,
    # its minimum: the loss cannot push the twins apart.
    assert abs(loss.item() - math.log(2) / 4) < 1e-3
    # Treating the twin as a negative (the plain loss) would cost more.
    plain = clip_loss(images, texts[[0, 0, 1]], torch.arange(3), scale)
    assert plain > 2 * loss


def test_dedupe_texts_maps_rows_to_unique_ids():
    tokens = torch.tensor([[5, 6], [7, 8], [5, 6]])
    unique, targets = dedupe_texts(tokens)
    assert unique.shape == (2, 2)
    assert torch.equal(unique[targets], tokens)


def test_siglip_counts_duplicates_as_positives():
    texts = _unit(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    images = texts[[0, 0, 1]]
    scale, bias = torch.tensor(math.log(50.0)), torch.tensor(-10.0)
    good = siglip_loss(images, texts, torch.tensor([0, 0, 1]), scale, bias)
    wrong = siglip_loss(images, texts, torch.tensor([0, 1, 1]), scale, bias)
    assert good < 0.01 < wrong
