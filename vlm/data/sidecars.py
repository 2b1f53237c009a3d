"""Captions kept beside their images: `photo.jpg` + `photo.txt` (what `vlmstack caption
DIR --format txt` writes, and how many fine-tuning tools lay out a dataset)."""

import logging
from pathlib import Path

from vlm.data.folders import find_images
from vlm.data.records import CaptionRecord
from vlm.errors import VlmError

log = logging.getLogger(__name__)


def sidecar_captions(folder: str | Path) -> list[CaptionRecord]:
    """One record per image under `folder` that has a non-empty .txt of the same stem
    beside it; images without one are skipped with a count in the log.

    Raises:
        VlmError: not a folder, or no image there has a caption.
    """
    found = find_images(folder)
    records, missing = [], 0
    for image in found.images:
        text = image.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""
        if caption:
            records.append(CaptionRecord(str(image.absolute()), caption))
        else:
            missing += 1
    if missing:
        log.warning("%s: %d images have no .txt caption beside them; left out", folder, missing)
    if not records:
        raise VlmError(f"{folder}: no image has a .txt caption beside it (photo.jpg + photo.txt)")
    return records
