"""Batch captioning of an image folder that survives bad files and crashes.

    vlmstack caption photos/ --model llava-easyvqa --out captions.jsonl
    vlmstack caption shards/ --out captions.jsonl --engine ray     # webdataset, Ray Data

Each caption is written as soon as it exists: a JSONL or CSV row appended and flushed
(image paths relative to the output file, so the output is a caption dataset vlmstack can
train on), or for --format txt a .txt file beside each image. Run the same command again
after a crash and it skips what is done — a row cut short by the crash is dropped and
redone. Unreadable images are logged and listed at the end; the rest go on.
"""

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from vlm.atomic import write_text
from vlm.data import webdataset
from vlm.data.conversations import DEFAULT_CAPTION_PROMPT
from vlm.data.files import read_rows
from vlm.data.folders import find_images
from vlm.data.webdataset import TarMember
from vlm.errors import ImageError, VlmError
from vlm.images import load_image
from vlm.progress import progress_bar

log = logging.getLogger(__name__)
FORMATS = ("jsonl", "csv", "txt")
ENGINES = ("local", "ray")


@dataclass
class CaptionReport:
    captioned: int = 0  # captions written by this run
    already_done: int = 0  # images skipped because the output already had them
    failed: list[str] = field(default_factory=list)  # reasons, each naming the file

    def summary(self) -> str:
        lines = [f"{self.captioned} captioned, {self.already_done} already done, {len(self.failed)} failed"]
        return "\n".join(lines + [f"  failed: {reason}" for reason in self.failed])


class _RowFile:
    """A JSONL/CSV output opened for appending whole, flushed rows."""

    def __init__(self, path: Path, fmt: str, *, overwrite: bool):
        if path.suffix.lower() != f".{fmt}":
            raise VlmError(f"{path}: --format {fmt} writes a .{fmt} file")
        if path.is_dir():
            raise VlmError(f"{path}: is a folder; --out names the {fmt} file to write")
        self.path, self.fmt = path, fmt
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.path.unlink(missing_ok=True)
        _drop_partial_last_line(self.path)
        self.new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = self.path.open("a", encoding="utf-8", newline="")

    def done(self) -> set[str]:
        """The keys (`_key`) of the images the file already has."""
        return set() if self.new else {row["image"] for row in read_rows(self.path, ("image",))}

    def write(self, image, caption: str) -> None:
        if isinstance(image, TarMember):
            relative = f"{os.path.relpath(image.shard, self.path.parent)}#{image.name}"
        else:
            relative = os.path.relpath(image, self.path.parent)
        if self.fmt == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            if self.new:
                writer.writerow(["image", "caption"])
                self.new = False
            writer.writerow([relative, caption])
            line = buffer.getvalue()
        else:
            line = json.dumps({"image": relative, "caption": caption}, ensure_ascii=False) + "\n"
        self.file.write(line)  # one write per row: a crash loses at most this row
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _drop_partial_last_line(path: Path) -> None:
    """Cut a row left half-written by a crash (everything after the last newline)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _inputs(source: Path, *, recursive: bool) -> list:
    """The images to caption: files of a folder, or the image members of webdataset shards."""
    if webdataset.is_webdataset(source):
        return webdataset.image_members(source)
    if not source.is_dir():
        raise VlmError(f"{source}: not a folder of images or webdataset shards")
    images = find_images(source, recursive=recursive).images
    if not images:
        raise VlmError(f"{source}: no images found{'' if recursive else ' (add --recursive to look in subfolders)'}")
    return images


def _key(image) -> str:
    """An image's identity in the output: its absolute path as listed, symlinks not followed
    (shard path#member for tar members), which is what `read_rows` makes of a written row."""
    return os.path.abspath(str(image))


def _refuse_shared_txt(images: list[Path]) -> None:
    """--format txt names a caption after its image's stem: a.png and a.jpg would share a.txt."""
    seen: dict[Path, Path] = {}
    for image in images:
        other = seen.setdefault(image.with_suffix(".txt"), image)
        if other != image:
            raise VlmError(f"{other} and {image} would both write {image.with_suffix('.txt')}; use --format jsonl or csv")


def _local_captions(model, images: list, *, prompt: str, batch_size: int, max_new_tokens: int):
    """(position, caption or None, error or None) per image, batch by batch."""
    for start in range(0, len(images), batch_size):
        pictures, readable = [], []
        for i in range(start, min(start + batch_size, len(images))):
            try:
                pictures.append(load_image(images[i]))
                readable.append(i)
            except ImageError as e:
                yield i, None, str(e)
        answers = model.answer_batch(pictures, [prompt] * len(pictures), max_new_tokens=max_new_tokens) if pictures else []
        for i, answer in zip(readable, answers):
            yield i, answer, None


def caption_folder(
    folder: str | Path,
    *,
    model,
    out: str | Path | None,
    fmt: str = "jsonl",
    prompt: str = DEFAULT_CAPTION_PROMPT,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    recursive: bool = False,
    overwrite: bool = False,
    engine: str = "local",
    workers: int = 2,
    ray_address: str | None = None,
    progress: bool = True,
) -> CaptionReport:
    """Caption every image in `folder` (a folder, or webdataset shards).

    Args:
        model: a loaded VQA model, or its name/directory (loaded here; the ray engine
            needs a name, which each Ray actor loads).
        engine: "local" (this process) or "ray" (`workers` Ray actors; `ray_address`
            of a cluster, default a local Ray).
    Raises:
        VlmError: unknown format or engine, no --out for jsonl/csv, no images found.
    """
    if fmt not in FORMATS:
        raise VlmError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if engine not in ENGINES:
        raise VlmError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if fmt != "txt" and not out:
        raise VlmError(f"--out FILE is needed for --format {fmt}")
    source = Path(folder).resolve()
    images = _inputs(source, recursive=recursive)
    if fmt == "txt" and isinstance(images[0], TarMember):
        raise VlmError("--format txt writes beside each image, which webdataset shards cannot hold; use jsonl or csv")
    if fmt == "txt":
        _refuse_shared_txt(images)
    if engine == "ray" and not isinstance(model, str):
        raise VlmError("the ray engine needs the model's name or directory, which each actor loads")
    rows = _RowFile(Path(out), fmt, overwrite=overwrite) if fmt != "txt" else None
    report = CaptionReport()
    try:
        done = rows.done() if rows else {str(p) for p in images if p.with_suffix(".txt").exists() and not overwrite}
        todo = [image for image in images if _key(image) not in done]
        report.already_done = len(images) - len(todo)
        if not todo:
            results = iter(())
        elif engine == "ray":
            from vlm import ray_engine

            results = ray_engine.caption_images(
                model, todo, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                workers=workers, address=ray_address, progress=False,
            )
        else:
            from vlm.load import load_vlm

            loaded = load_vlm(model) if isinstance(model, str) else model
            results = _local_captions(loaded, todo, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens)
        with progress_bar(total=len(todo), desc="captioning", unit="img", disable=not progress) as bar:
            for i, caption, error in results:
                bar.update(1)
                if error:
                    log.warning("skipped %s", error)
                    report.failed.append(error)
                    continue
                caption = " ".join(caption.split())  # one line per caption
                if rows:
                    rows.write(todo[i], caption)
                else:
                    write_text(todo[i].with_suffix(".txt"), caption + "\n")
                report.captioned += 1
    finally:
        if rows:
            rows.close()
    return report
