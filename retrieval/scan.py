"""What a folder holds: its image files with size, modification time and content hash."""

from dataclasses import dataclass
from pathlib import Path

from vlm.data.folders import find_images


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the indexed folder, with forward slashes
    mtime: float  # modification time (seconds since the epoch)
    size: int  # bytes


def scan_folder(root: Path, *, recursive: bool = True) -> list[FileInfo]:
    """Every image file under `root`, sorted by path."""
    root = Path(root)
    files = []
    for path in find_images(root, recursive=recursive).images:
        stat = path.stat()
        files.append(FileInfo(path.relative_to(root).as_posix(), stat.st_mtime, stat.st_size))
    return files


