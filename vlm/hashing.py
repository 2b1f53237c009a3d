"""Content hashes of files: what identifies an image in an index, a set of weights, a checkpoint."""

import hashlib
import os
import stat
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, read 1 MiB at a time.

    Raises:
        OSError: the file cannot be opened, or is not a regular file (a FIFO that was
            put where a file was would otherwise block the read forever).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
