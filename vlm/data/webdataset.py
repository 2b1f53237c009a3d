"""WebDataset tar shards (the img2dataset / clip-retrieval layout) as a data source.

A shard is an uncompressed tar of samples; a sample is the files sharing a key (the name
up to its first dot): `00000.jpg` + `00000.txt` (caption), optionally `00000.json`.
A data argument is a shard (`data/00000.tar`), a folder of shards (`data/`), or a brace
range (`data/{00000..00099}.tar`).

Images are not extracted: a `TarMember` remembers where its bytes sit in the shard and
reads just those (`load_image` accepts it like a path). Its reference string,
`path/to/00000.tar#00000.jpg`, names it in outputs; `image_source` turns such a string
back into the member, so those outputs (caption files, indexes) can be read again.
"""

import functools
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from vlm.data.records import CaptionRecord
from vlm.errors import VlmError
from vlm.images import is_image_file

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class TarMember:
    shard: str  # path of the tar file
    name: str  # member name inside it
    offset: int  # where its bytes start
    size: int  # how many bytes

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def __str__(self) -> str:
        return f"{self.shard}#{self.name}"


def image_source(path: str) -> "str | TarMember":
    """`path` itself, or the shard member it names when it reads `shard.tar#member`.

    Raises:
        VlmError: the shard has no such member.
    """
    shard, separator, name = path.partition(".tar#")
    if not separator or Path(path).exists():
        return path
    shard += ".tar"
    try:
        offset, size = _member_offsets(shard, Path(shard).stat().st_mtime)[name]
    except (OSError, KeyError):
        raise VlmError(f"{path}: no such member in a readable tar shard") from None
    return TarMember(shard, name, offset, size)


@functools.lru_cache(maxsize=16)
def _member_offsets(shard: str, mtime: float) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of a shard's files; `mtime` keys the cache to the file's version."""
    try:
        with tarfile.open(shard, "r:") as tar:
            return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    except tarfile.TarError:
        return {}


def is_webdataset(spec: str | Path) -> bool:
    spec = str(spec)
    if spec.endswith(".tar"):
        return True
    path = Path(spec)
    return path.is_dir() and any(path.glob("*.tar")) and not any(is_image_file(p) for p in path.iterdir())


def shard_paths(spec: str | Path) -> list[Path]:
    """The shards a data argument names, in order.

    Raises:
        VlmError: no shard found, or a named shard is missing.
    """
    spec = str(spec)
    match = _BRACES.search(spec)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first)
        paths = [
            Path(spec[: match.start()] + str(i).zfill(width) + spec[match.end() :])
            for i in range(int(first), int(last) + 1)
        ]
    elif Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
    else:
        paths = [Path(spec)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise VlmError(f"{spec}: missing webdataset shards {missing[:3] or ['(none found)']}")
    return paths


def _key(name: str) -> tuple[str, str]:
    """'dir/00000.jpg' -> ('dir/00000', 'jpg') (the key ends at the first dot of the base name)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def samples(spec: str | Path) -> Iterator[tuple[str, TarMember | None, str | None]]:
    """(key, image member or None, caption text or None) for every sample, shard by shard."""
    for shard in shard_paths(spec):
        try:
            with tarfile.open(shard, "r:") as tar:
                grouped: dict[str, dict] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    key, extension = _key(member.name)
                    entry = grouped.setdefault(key, {})
                    if extension == "txt":
                        entry["caption"] = tar.extractfile(member).read().decode("utf-8").strip()
                    elif is_image_file(member.name):
                        entry["image"] = TarMember(str(shard), member.name, member.offset_data, member.size)
        except tarfile.TarError as e:
            raise VlmError(f"{shard}: not a readable tar shard ({e})") from None
        for key, entry in grouped.items():
            yield key, entry.get("image"), entry.get("caption")


def caption_records(spec: str | Path) -> list[CaptionRecord]:
    """Samples with both an image and a caption."""
    return [CaptionRecord(image, caption) for _, image, caption in samples(spec) if image and caption is not None]


def image_members(spec: str | Path) -> list[TarMember]:
    return [image for _, image, _ in samples(spec) if image]


def write_shards(
    items: Iterable[tuple[bytes, str, str | None]], folder: str | Path, *, per_shard: int = 1000
) -> list[Path]:
    """Write (image bytes, image extension, caption) samples as shards 00000.tar, 00001.tar, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    tar = None
    for index, (data, extension, caption) in enumerate(items):
        if index % per_shard == 0:
            if tar:
                tar.close()
            shards.append(folder / f"{len(shards):05d}.tar")
            tar = tarfile.open(shards[-1], "w")
        key = f"{index:08d}"
        files = [(f"{key}.{extension}", data)] + (
            [(f"{key}.txt", caption.encode("utf-8"))] if caption is not None else []
        )
        for name, payload in files:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    if tar:
        tar.close()
    return shards
