"""Image folders: every image file under a directory, in a stable order, with the entries
that look like images but cannot be read as files named and set aside.

A folder is the user's, and may hold anything: a FIFO or device named `x.png` (reading it
would block forever), a dangling symlink or a symlink loop, a file name that is not valid
UTF-8 (which no JSON, CSV or SQLite row can hold). Each of those is skipped with a reason
that names it; one of them never stops a run.
"""

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vlm.errors import VlmError
from vlm.images import is_image_file


@dataclass
class FolderImages:
    images: list[Path] = field(default_factory=list)  # regular image files, sorted
    skipped: list[str] = field(default_factory=list)  # reasons, each naming the entry


def printable(path: str | Path) -> str:
    """A path as text that can be printed and stored: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def is_utf8(path: str | Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def unreadable_reason(path: Path) -> str | None:
    """Why `path` cannot be read as a regular file (following symlinks), or None if it can."""
    if not is_utf8(path):
        return f"{printable(path)}: file name is not valid UTF-8; rename the file"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"{path}: broken symbolic link" if path.is_symlink() else f"{path}: no such file"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path}: symbolic link loop"
        return f"{path}: cannot read ({e.strerror})"
    if not stat.S_ISREG(mode):
        return f"{path}: not a regular file (a FIFO, socket or device)"
    return None


def find_images(root: str | Path, *, recursive: bool = True) -> FolderImages:
    """Image files under `root` (by extension), sorted; hidden files and folders left out;
    entries that are not readable regular files go to `skipped`.

    Raises:
        VlmError: `root` is not a directory, or its own name is not valid UTF-8.
    """
    root = Path(root)
    if not root.is_dir():
        raise VlmError(f"{printable(root)}: not a directory")
    if not is_utf8(root.absolute()):
        raise VlmError(f"{printable(root.absolute())}: the folder's path is not valid UTF-8; rename it")
    found = FolderImages()
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in files:
            if name.startswith(".") or not is_image_file(name):
                continue
            path = Path(folder) / name
            reason = unreadable_reason(path)
            if reason:
                found.skipped.append(reason)
            else:
                found.images.append(path)
    found.images.sort()
    found.skipped.sort()
    return found
