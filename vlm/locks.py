"""One writer at a time: an exclusive flock on a lock file, held while a block runs.

Used for an index (INDEX/.writer.lock), an embeddings folder (EMB/.writer.lock) and a
caption output (.NAME.lock beside it). A second writer fails at once, in one line, rather
than interleave with the first; a writer that dies (even by kill -9) releases the lock.
"""

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from vlm.errors import VlmError


@contextlib.contextmanager
def only_writer(lock_file: Path, *, busy: str) -> Iterator[None]:
    """Hold the lock on `lock_file` (created if missing) while the block runs.

    Raises:
        VlmError: with the message `busy`, at once, when another process holds the lock.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VlmError(busy) from None
        yield
    finally:
        os.close(fd)  # releases the lock
