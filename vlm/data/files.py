"""Caption and VQA datasets from JSONL or CSV files, image paths relative to the file.

Captions: {"image": "rel/path.jpg", "caption": "..."} per JSONL line, or a CSV with
`image` and `caption` columns. VQA: the same with `question` and `answer`. An image may
be a webdataset shard member, `shards/00000.tar#00000.jpg` (what `vlmstack caption` writes
for shards).
"""

import csv
import json
import os
from pathlib import Path
from typing import Iterator

from vlm.data.records import CaptionRecord, VqaRecord
from vlm.data.webdataset import image_source
from vlm.errors import VlmError


def read_rows(path: str | Path, columns: tuple[str, ...]) -> Iterator[dict]:
    """Rows of a .jsonl or .csv file holding at least `columns`; image paths made absolute
    (lexically: symlinks stay as written).

    Raises:
        VlmError: missing file, unknown extension, bad JSON, or a row missing a column
            (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise VlmError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise VlmError(f"{path}: expected a .jsonl or .csv file")
    with path.open(newline="", encoding="utf-8") as f:
        if suffix == ".csv":
            rows = enumerate(csv.DictReader(f), start=2)  # line 1 is the header
        else:
            rows = ((n, _json_line(path, n, line)) for n, line in enumerate(f, start=1) if line.strip())
        for line_no, row in rows:
            missing = [c for c in columns if not isinstance(row.get(c), str)]
            if missing:
                raise VlmError(f"{path}:{line_no}: missing {', '.join(missing)}")
            if isinstance(row.get("image"), str):
                row["image"] = os.path.normpath(path.parent.absolute() / row["image"])
            yield row


def _json_line(path: Path, line_no: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise VlmError(f"{path}:{line_no}: not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise VlmError(f"{path}:{line_no}: expected a JSON object")
    return row


def read_captions(path: str | Path) -> list[CaptionRecord]:
    return [CaptionRecord(image_source(r["image"]), r["caption"]) for r in read_rows(path, ("image", "caption"))]


def read_vqa(path: str | Path) -> list[VqaRecord]:
    columns = ("image", "question", "answer")
    return [VqaRecord(r["image"], r["question"], r["answer"]) for r in read_rows(path, columns)]


def first_row_columns(path: str | Path) -> set[str]:
    """The columns of a .jsonl/.csv file's first row (to tell VQA data from captions)."""
    for row in read_rows(path, ()):
        return set(row)
    return set()
