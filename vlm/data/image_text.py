"""Image(-text) datasets for DataLoaders. A file that cannot be read becomes a `Skipped`
item; the collate functions drop it and report its message, so one bad file never stops
an epoch or an embedding run."""

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from vlm.data.records import CaptionRecord
from vlm.errors import ImageError
from vlm.images import ImageSource, ImageTransform, load_image


@dataclass(frozen=True)
class Skipped:
    index: int  # position in the dataset
    reason: str  # the ImageError message (names the file)


class ImageDataset(Dataset):
    """Items: (index, (3, S, S) pixels) or Skipped."""

    def __init__(self, sources: Sequence[ImageSource], *, transform: ImageTransform):
        self.sources = sources
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(self.sources[index])
        except ImageError as e:
            return Skipped(index, str(e))


class ImageTextDataset(Dataset):
    """Items: ((3, S, S) pixels, caption) or Skipped; optional augmentation on the PIL image."""

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        *,
        transform: ImageTransform,
        augment: Callable | None = None,
    ):
        self.records = records
        self.transform = transform
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            image = load_image(record.image)
            if self.augment is not None:
                image = self.augment(image)
            return self.transform(image), record.caption
        except ImageError as e:
            return Skipped(index, str(e))


def split_skipped(items: list) -> tuple[list, list[str]]:
    """(good items, reasons of the skipped ones)."""
    good = [item for item in items if not isinstance(item, Skipped)]
    return good, [item.reason for item in items if isinstance(item, Skipped)]


def collate_images(items: list) -> dict:
    """-> {"indices": (B,), "pixels": (B, 3, S, S), "size": B, "skipped": [(index, reason)]}"""
    good, _ = split_skipped(items)
    skipped = [(item.index, item.reason) for item in items if isinstance(item, Skipped)]
    return {
        "indices": torch.tensor([i for i, _ in good], dtype=torch.long),
        "pixels": torch.stack([p for _, p in good]) if good else torch.empty(0),
        "size": len(good),
        "skipped": skipped,
    }


@dataclass(frozen=True)
class CollateImageText:
    """-> {"pixels": (B, 3, S, S), "tokens": (B, L), "size": B, "skipped": [reason]}; picklable."""

    tokenize: Callable[[list[str]], torch.Tensor]

    def __call__(self, items: list) -> dict:
        good, skipped = split_skipped(items)
        return {
            "pixels": torch.stack([p for p, _ in good]) if good else torch.empty(0),
            "tokens": self.tokenize([c for _, c in good]) if good else torch.empty(0, dtype=torch.long),
            "size": len(good),
            "skipped": skipped,
        }
