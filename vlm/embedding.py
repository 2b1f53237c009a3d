"""Batched image embedding with DataLoader workers decoding files in parallel.

Unreadable files are skipped and reported, never fatal: the result says which inputs
got an embedding (`indices`) and why the others did not (`failures`).
"""

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from vlm.data.image_text import ImageDataset, collate_images
from vlm.images import ImageSource
from vlm.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    vectors: torch.Tensor  # (M, D) float32, L2-normalised, one per readable input
    indices: list[int]  # position in the input of each row of `vectors`
    failures: list[tuple[int, str]] = field(default_factory=list)  # (input position, reason)


def embed_images(
    clip,
    sources: Sequence[ImageSource],
    *,
    batch_size: int = 256,
    workers: int = 2,
    progress: bool = True,
) -> Embeddings:
    """Embed images with `clip` (a vlm.clip.Clip), skipping unreadable ones.

    Args:
        sources: paths, bytes or PIL images.
        workers: DataLoader worker processes decoding images (0 = in this process).
        progress: show a tqdm bar.
    """
    dataset = ImageDataset(sources, transform=clip.transform)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers if len(sources) > batch_size else 0,
        collate_fn=collate_images,
        persistent_workers=False,
    )
    vectors, indices, failures = [], [], []
    with (
        torch.inference_mode(),
        progress_bar(total=len(sources), desc="embedding", unit="img", disable=not progress) as bar,
    ):
        for batch in loader:
            for index, reason in batch["skipped"]:
                log.warning("skipped %s", reason)
                failures.append((index, reason))
            if len(batch["indices"]):
                vectors.append(clip.image_features(batch["pixels"]).float())
                indices += batch["indices"].tolist()
            bar.update(len(batch["indices"]) + len(batch["skipped"]))
    empty = torch.empty(0, clip.embed_dim)
    return Embeddings(torch.cat(vectors) if vectors else empty, indices, failures)
