"""Token-sequence datasets and collates for language-model training (text only, or with
the images of LLaVA-format conversations)."""

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from vlm.chat_template import IGNORE_INDEX, encode_fewshot, from_llava
from vlm.data.image_text import Skipped, split_skipped
from vlm.errors import ImageError, VlmError
from vlm.images import ImageTransform, load_image


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


@dataclass(frozen=True)
class CollateSequences:
    """Items {"ids", "labels"[, "pixels"]} -> a right-padded batch:
    {"input_ids", "attention_mask", "labels": (B, T), "pixels": (M, 3, S, S) | None,
    "size": B, "skipped": [reason]}."""

    pad_id: int

    def __call__(self, items: list) -> dict:
        good, skipped = split_skipped(items)
        if not good:
            return {"size": 0, "skipped": skipped}
        ids = [item["ids"] for item in good]
        pixels = [p for item in good for p in item.get("pixels", [])]
        return {
            "input_ids": pad_right(ids, self.pad_id),
            "attention_mask": pad_right([[1] * len(r) for r in ids], 0),
            "labels": pad_right([item["labels"] for item in good], IGNORE_INDEX),
            "pixels": torch.stack(pixels) if pixels else None,
            "size": len(good),
            "skipped": skipped,
        }


class TokenDataset(Dataset):
    """Pre-tokenised (ids, labels) pairs."""

    def __init__(self, sequences: Sequence[tuple[list[int], list[int]]]):
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.sequences]

    def __getitem__(self, index: int) -> dict:
        ids, labels = self.sequences[index]
        return {"ids": ids, "labels": labels}


class ConversationDataset(Dataset):
    """Tokenised sequences with their image paths -> {"ids", "labels", "pixels":
    [(3, S, S)]} or Skipped. Tokenising happens up front (`encode_records`), so workers
    only decode images (and augment each one when `augment`, PIL -> PIL, is given)."""

    def __init__(
        self,
        sequences: Sequence[tuple[list[int], list[int], list[str]]],
        *,
        transform: ImageTransform,
        augment: Callable | None = None,
    ):
        self.sequences, self.transform, self.augment = sequences, transform, augment

    def __len__(self) -> int:
        return len(self.sequences)

    def lengths(self) -> list[int]:
        return [len(ids) for ids, _, _ in self.sequences]

    def __getitem__(self, index: int):
        ids, labels, images = self.sequences[index]
        try:
            pictures = [load_image(image) for image in images]
            if self.augment is not None:
                pictures = [self.augment(picture) for picture in pictures]
            pixels = [self.transform(picture) for picture in pictures]
        except ImageError as e:
            return Skipped(index, str(e))
        return {"ids": ids, "labels": labels, "pixels": pixels}


def record_images(record: dict) -> list[str]:
    """A record's images in reading order: "images" (a list) or "image" (one, or none)."""
    if "images" in record:
        return list(record["images"])
    return [record["image"]] if record.get("image") else []


def encode_records(records: Sequence[dict], model, max_length: int) -> list[tuple[list[int], list[int], list[str]]]:
    """(ids, labels, image paths) per record with the model's tokenisation. A record is a
    LLaVA conversation, or {"images", "fewshot": [[question, answer], ...]} for
    Flamingo's interleaved few-shot format.

    Raises:
        VlmError: a sequence is longer than max_length (its answers would be cut).
    """
    sequences = []
    for record in records:
        if "fewshot" in record:
            ids, labels = model.expand(encode_fewshot(model.tokenizer, [tuple(p) for p in record["fewshot"]], None))
        else:
            ids, labels = model.encode(from_llava(record))
        if len(ids) > max_length:
            raise VlmError(f"example {record.get('id', '?')} has {len(ids)} tokens, over max_length {max_length}")
        sequences.append((ids, labels, record_images(record)))
    return sequences
