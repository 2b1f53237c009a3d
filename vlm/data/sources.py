"""Resolve a data argument (`easyvqa:train`, `easyvqa:test`, or a file) to records."""

from vlm.data import easyvqa, webdataset
from vlm.data.conversations import (
    caption_conversations,
    easyvqa_conversations,
    read_llava_json,
    vqa_conversations,
)
from vlm.data.files import first_row_columns, read_captions, read_vqa
from vlm.data.mix import EasyVqaMix
from vlm.data.records import CaptionRecord, VqaRecord
from vlm.errors import VlmError

BUILTIN = tuple(f"easyvqa:{split}" for split in easyvqa.SPLITS)


def builtin_split(spec: str) -> str | None:
    """ "train"/"test" for a built-in name, None for a file path."""
    if not spec.startswith("easyvqa:"):
        return None
    if spec not in BUILTIN:
        raise VlmError(f"unknown built-in dataset {spec!r}; choose from {', '.join(BUILTIN)}")
    return spec.split(":", 1)[1]


def caption_records(spec: str) -> list[CaptionRecord]:
    """Image-caption pairs from a built-in name, a .jsonl/.csv caption file, or
    webdataset shards (.tar, a folder of them, or a {00000..00009} range)."""
    split = builtin_split(spec)
    if split:
        return easyvqa.caption_records(split)
    return webdataset.caption_records(spec) if webdataset.is_webdataset(spec) else read_captions(spec)


def vqa_records(spec: str) -> list[VqaRecord]:
    """Image-question-answer triples from a built-in name or a .jsonl/.csv VQA file."""
    split = builtin_split(spec)
    return easyvqa.vqa_records(split) if split else read_vqa(spec)


def conversation_records(
    spec: str,
    *,
    kind: str = "conversations",
    mix: EasyVqaMix | None = None,
) -> list[dict]:
    """LLaVA-format records.

    kind="captions": one describe-the-image exchange per caption (built-in split or
    caption file). kind="conversations": a built-in split's questions and captions, a
    LLaVA JSON file (.json), or a VQA or caption file (.jsonl/.csv) turned into exchanges.
    mix: built-in splits only, the yes/no and recall questions added (vlm/data/mix.py).
    """
    if kind == "captions":
        return caption_conversations(caption_records(spec))
    split = builtin_split(spec)
    if split:
        return easyvqa_conversations(split, mix)
    if spec.endswith(".json"):
        return read_llava_json(spec)
    if "question" in first_row_columns(spec):
        return vqa_conversations(read_vqa(spec))
    return caption_conversations(read_captions(spec))
