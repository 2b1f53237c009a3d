"""Batch captioning of an image folder that survives bad files and crashes.

    vlmstack caption photos/ --model llava-easyvqa --out captions.jsonl
    vlmstack caption shards/ --out captions.jsonl --engine ray     # webdataset, Ray Data

Each caption is written as soon as it exists: a JSONL or CSV row appended and flushed
(image paths relative to the output file, so the output is a caption dataset vlmstack can
train on), or for --format txt a .txt file beside each image. Run the same command again
after a crash and it skips what is done — a row cut short by the crash is dropped and
redone. Unreadable images — and entries that are not readable files at all (a FIFO, a
dangling link, a link loop, a name that is not UTF-8) — are logged and listed at the
end; the rest go on. One run at a time writes an output: a second run on the same file
(or, for txt, the same folder) stops at once with one line.
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
from vlm.locks import only_writer
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


def _check_out(path: Path, fmt: str) -> None:
    """Raises VlmError when `path` cannot be a --format `fmt` output file."""
    if path.suffix.lower() != f".{fmt}":
        raise VlmError(f"{path}: --format {fmt} writes a .{fmt} file")
    if path.is_dir():
        raise VlmError(f"{path}: is a folder; --out names the {fmt} file to write")


def _drop_partial_last_line(path: Path) -> None:
    """Cut a row left half-written by a crash (everything after the last newline)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _inputs(source: Path, *, recursive: bool) -> tuple[list, list[str]]:
    """The images to caption (files of a folder, or the image members of webdataset
    shards), and the reasons for the folder entries that cannot be read as files.

    Raises:
        VlmError: not a folder or shards, or nothing that looks like an image.
    """
    if webdataset.is_webdataset(source):
        return webdataset.image_members(source), []
    if not source.is_dir():
        raise VlmError(f"{source}: not a folder of images or webdataset shards")
    found = find_images(source, recursive=recursive)
    if not found.images and not found.skipped:
        raise VlmError(f"{source}: no images found{'' if recursive else ' (add --recursive to look in subfolders)'}")
    return found.images, found.skipped


def _lock_file(source: Path, out: str | Path | None, fmt: str) -> tuple[Path, Path]:
    """(lock file, what it guards): `.NAME.lock` beside a jsonl/csv output; for txt, a
    hidden lock file in the image folder the captions are written into."""
    if fmt == "txt":
        return source / ".vlmstack-caption.lock", source
    out = Path(out)
    return out.parent / f".{out.name}.lock", out


def _check_counts(**counts: int) -> None:
    """Raises VlmError naming the first count that is below 1."""
    for name, value in counts.items():
        if value < 1:
            raise VlmError(f"{name} must be at least 1, not {value}")


def _local_model(model, max_new_tokens: int):
    """The model loaded in this process (by name or directory, unless already loaded).

    Raises:
        VlmError: not a VQA model, or `max_new_tokens` alone would fill its context.
    """
    from vlm.load import load_vlm

    loaded = load_vlm(model) if isinstance(model, str) else model
    if max_new_tokens >= loaded.max_length:
        raise VlmError(
            f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the model's {loaded.max_length}-token context; "
            f"give fewer than {loaded.max_length}"
        )
    return loaded


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
            raise VlmError(
                f"{other} and {image} would both write {image.with_suffix('.txt')}; use --format jsonl or csv"
            )


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
        answers = (
            model.answer_batch(pictures, [prompt] * len(pictures), max_new_tokens=max_new_tokens) if pictures else []
        )
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
        VlmError: unknown format or engine, batch_size or max_new_tokens below 1, no --out
            for jsonl/csv, no images found, or another run writing the same output.
    """
    _check_counts(batch_size=batch_size, max_new_tokens=max_new_tokens)
    if fmt not in FORMATS:
        raise VlmError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if engine not in ENGINES:
        raise VlmError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if fmt != "txt" and not out:
        raise VlmError(f"--out FILE is needed for --format {fmt}")
    if fmt != "txt":
        _check_out(Path(out), fmt)
    source = Path(folder).resolve()
    images, skipped = _inputs(source, recursive=recursive)
    if fmt == "txt" and images and isinstance(images[0], TarMember):
        raise VlmError("--format txt writes beside each image, which webdataset shards cannot hold; use jsonl or csv")
    if fmt == "txt":
        _refuse_shared_txt(images)
    if engine == "ray" and not isinstance(model, str):
        raise VlmError("the ray engine needs the model's name or directory, which each actor loads")
    lock_file, target = _lock_file(source, out, fmt)
    with only_writer(
        lock_file, busy=f"{target}: another run is writing it; wait for that run to end, or write elsewhere"
    ):
        if engine == "local":
            model = _local_model(model, max_new_tokens)  # before --overwrite removes anything
        report = CaptionReport(failed=list(skipped))
        for reason in skipped:
            log.warning("skipped %s", reason)
        rows = _RowFile(Path(out), fmt, overwrite=overwrite) if fmt != "txt" else None
        try:
            done = rows.done() if rows else {str(p) for p in images if p.with_suffix(".txt").exists() and not overwrite}
            todo = [image for image in images if _key(image) not in done]
            report.already_done = len(images) - len(todo)
            if not todo:
                results = iter(())
            elif engine == "ray":
                from vlm import ray_engine

                results = ray_engine.caption_images(
                    model,
                    todo,
                    prompt=prompt,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    workers=workers,
                    address=ray_address,
                    progress=False,
                )
            else:
                results = _local_captions(
                    model, todo, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens
                )
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
