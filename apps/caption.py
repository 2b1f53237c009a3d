"""Batch captioning of an image folder that survives bad files and crashes.

    vlmstack caption photos/ --model llava-easyvqa --out captions.jsonl

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
from vlm.data.conversations import DEFAULT_CAPTION_PROMPT
from vlm.data.folders import list_images
from vlm.errors import ImageError, VlmError
from vlm.images import load_image
from vlm.progress import progress_bar

log = logging.getLogger(__name__)
FORMATS = ("jsonl", "csv", "txt")


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
        """Absolute paths of the images the file already has."""
        if self.new:
            return set()
        with self.path.open(encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f) if self.fmt == "csv" else (json.loads(line) for line in f if line.strip())
            return {str((self.path.parent / row["image"]).resolve()) for row in rows}

    def write(self, image: Path, caption: str) -> None:
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
    progress: bool = True,
) -> CaptionReport:
    """Caption every image in `folder` with `model` (a loaded VQA model).

    Raises:
        VlmError: unknown format, no --out for jsonl/csv, or no images in the folder.
    """
    if fmt not in FORMATS:
        raise VlmError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    folder = Path(folder).resolve()
    images = list_images(folder, recursive=recursive)
    if not images:
        raise VlmError(f"{folder}: no images found{'' if recursive else ' (add --recursive to look in subfolders)'}")
    if fmt != "txt" and not out:
        raise VlmError(f"--out FILE is needed for --format {fmt}")
    rows = _RowFile(Path(out), fmt, overwrite=overwrite) if fmt != "txt" else None
    report = CaptionReport()
    try:
        done = rows.done() if rows else {str(p) for p in images if p.with_suffix(".txt").exists() and not overwrite}
        todo = [p for p in images if str(p) not in done]
        report.already_done = len(images) - len(todo)
        with progress_bar(total=len(todo), desc="captioning", unit="img", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch, pictures = [], []
                for path in todo[start : start + batch_size]:
                    try:
                        pictures.append(load_image(path))
                        batch.append(path)
                    except ImageError as e:
                        log.warning("skipped %s", e)
                        report.failed.append(str(e))
                captions = model.answer_batch(pictures, [prompt] * len(pictures), max_new_tokens=max_new_tokens) if pictures else []
                for path, caption in zip(batch, captions):
                    caption = " ".join(caption.split())  # one line per caption
                    if rows:
                        rows.write(path, caption)
                    else:
                        write_text(path.with_suffix(".txt"), caption + "\n")
                    report.captioned += 1
                bar.update(len(todo[start : start + batch_size]))
    finally:
        if rows:
            rows.close()
    return report
