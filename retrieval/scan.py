"""What a folder holds: its image files with size, modification time and content hash.

The folder may change while a job runs: a file listed by the scan that vanished, became
a FIFO or cannot be read by the time it is hashed is an ImageError naming it (the job
skips and reports it), never a crash or a read that blocks forever.
"""

import stat
from dataclasses import dataclass, field
from pathlib import Path

from vlm.data.folders import find_images, unreadable_reason
from vlm.errors import ImageError
from vlm.hashing import sha256_file


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the indexed folder, with forward slashes
    mtime: float  # modification time (seconds since the epoch)
    size: int  # bytes


@dataclass
class FolderScan:
    files: list[FileInfo] = field(default_factory=list)  # regular image files, sorted by path
    skipped: list[str] = field(default_factory=list)  # reasons, each naming an entry that cannot be read


def scan_folder(root: Path, *, recursive: bool = True) -> FolderScan:
    """Every image file under `root`, sorted by path; FIFOs, devices, dangling links, link
    loops and names that are not UTF-8 go to `skipped` (see vlm.data.folders).

    Raises:
        VlmError: `root` is not a directory.
    """
    root = Path(root)
    found = find_images(root, recursive=recursive)
    scan = FolderScan(skipped=list(found.skipped))
    for path in found.images:
        try:
            info = path.stat()
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):  # changed since find_images looked
            scan.skipped.append(unreadable_reason(path) or f"{path}: changed while the folder was read")
            continue
        scan.files.append(FileInfo(path.relative_to(root).as_posix(), info.st_mtime, info.st_size))
    return scan


def content_hash(path: Path) -> str:
    """Hex sha256 of an image file's bytes.

    Raises:
        ImageError: naming the file, when it vanished, is no longer a regular file, or
            cannot be read (permissions, I/O error).
    """
    try:
        return sha256_file(path)
    except OSError as e:
        raise ImageError(unreadable_reason(Path(path)) or f"{path}: cannot read ({e.strerror or e})") from None
