"""CLIP retrieval metrics on an image-caption dataset.

Hits are judged by caption text: retrieving any image whose caption equals the query
counts, so datasets with repeated captions (easy-VQA has 24) are scored fairly.
- zeroshot_top1: each image classified among the dataset's distinct captions.
- t2i_r1 / t2i_r5: each distinct caption queries all images; a hit when one of the top
  1 / 5 images carries that caption. Averaged over distinct captions.
- i2t_r1: each image queries all distinct captions; a hit when the top one is one of
  the image's captions. With one caption per image this equals zeroshot_top1.
"""

import logging
from collections import defaultdict
from typing import Sequence

import torch

from vlm.data.records import CaptionRecord
from vlm.embedding import embed_images
from vlm.errors import VlmError

log = logging.getLogger(__name__)


def retrieval_metrics(
    image_vectors: torch.Tensor,
    image_captions: Sequence[set[str]],
    text_vectors: torch.Tensor,
    texts: Sequence[str],
) -> dict:
    """Metrics from embeddings.

    Args:
        image_vectors: (N, D) normalised image embeddings.
        image_captions: per image, the set of its captions (the first one is its class).
        text_vectors: (U, D) normalised embeddings of the distinct captions `texts`.
    """
    similarity = image_vectors @ text_vectors.T  # (N, U)
    n_images, n_texts = similarity.shape
    # truth[i, t]: text t is a caption of image i
    truth = torch.tensor([[t in caps for t in texts] for caps in image_captions], dtype=torch.bool)
    best_text = similarity.argmax(dim=1)  # (N,)
    i2t_r1 = truth[torch.arange(n_images), best_text].float().mean().item()
    k = min(5, n_images)
    top_images = similarity.T.topk(k, dim=1).indices  # (U, k)
    hits = truth.T.gather(1, top_images)  # (U, k): image at rank r carries query t
    return {
        "zeroshot_top1": i2t_r1,
        "t2i_r1": hits[:, 0].float().mean().item(),
        "t2i_r5": hits.any(dim=1).float().mean().item(),
        "i2t_r1": i2t_r1,
        "n": n_images,
    }


def evaluate_clip(clip, records: Sequence[CaptionRecord], *, batch_size: int = 256, progress: bool = True) -> dict:
    """Embed the dataset's images and distinct captions and score retrieval.

    Unreadable images are skipped and logged; "n" counts the images scored.

    Raises:
        VlmError: no image could be read.
    """
    captions_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        captions_of[record.image].add(record.caption)
    paths = list(captions_of)
    texts = sorted({record.caption for record in records})
    embedded = embed_images(clip, paths, batch_size=batch_size, progress=progress)
    text_vectors = clip.encode_texts(texts)
    if embedded.failures:
        log.warning("%d of %d images could not be read and were not scored", len(embedded.failures), len(paths))
    if not embedded.indices:
        raise VlmError(f"none of the {len(paths)} images could be read; nothing to score")
    return retrieval_metrics(embedded.vectors, [captions_of[paths[i]] for i in embedded.indices], text_vectors, texts)
