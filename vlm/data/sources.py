"""Resolve a data argument (`easyvqa:train`, `easyvqa:test`, or a file) to records."""

from vlm.data import easyvqa
from vlm.data.files import read_captions, read_vqa
from vlm.data.records import CaptionRecord, VqaRecord
from vlm.errors import VlmError

BUILTIN = tuple(f"easyvqa:{split}" for split in easyvqa.SPLITS)


def _builtin_split(spec: str) -> str | None:
    """"train"/"test" for a built-in name, None for a file path."""
    if not spec.startswith("easyvqa:"):
        return None
    if spec not in BUILTIN:
        raise VlmError(f"unknown built-in dataset {spec!r}; choose from {', '.join(BUILTIN)}")
    return spec.split(":", 1)[1]


def caption_records(spec: str) -> list[CaptionRecord]:
    """Image-caption pairs from a built-in name or a .jsonl/.csv caption file."""
    split = _builtin_split(spec)
    return easyvqa.caption_records(split) if split else read_captions(spec)


def vqa_records(spec: str) -> list[VqaRecord]:
    """Image-question-answer triples from a built-in name or a .jsonl/.csv VQA file."""
    split = _builtin_split(spec)
    return easyvqa.vqa_records(split) if split else read_vqa(spec)
