"""Image folders: every image file under a directory, in a stable order."""

import os
from pathlib import Path

from vlm.errors import VlmError
from vlm.images import is_image_file


def list_images(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Image files under `root` (by extension), sorted; hidden files and folders skipped.

    Raises:
        VlmError: `root` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise VlmError(f"{root}: not a directory")
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [Path(folder) / f for f in files if not f.startswith(".") and is_image_file(f)]
    return sorted(found)
