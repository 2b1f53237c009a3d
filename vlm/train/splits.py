"""Validation splits carved out of training data (never the test split), by image so an
image's examples never straddle training and validation."""

import hashlib
from pathlib import Path


def held_out(image, fraction: float) -> bool:
    """Stable choice by a hash of the image's file name (or webdataset member reference)."""
    if not image or fraction <= 0:
        return False
    digest = hashlib.sha256(Path(str(image)).name.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def split_by_image(records: list, fraction: float, image=lambda r: r["image"]) -> tuple[list, list]:
    """(train, validation) records; `image(record)` gives a record's image path."""
    train = [r for r in records if not held_out(image(r), fraction)]
    return train, [r for r in records if held_out(image(r), fraction)]
