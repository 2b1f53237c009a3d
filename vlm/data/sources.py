"""Resolve a data argument (`easyvqa:train`, `easyvqa:test`, or a file) to records."""

from vlm.data import easyvqa, webdataset
from vlm.data.conversations import caption_conversations, easyvqa_conversations, read_llava_json, vqa_conversations
from vlm.data.files import first_row_columns, read_captions, read_vqa
from vlm.data.records import CaptionRecord, VqaRecord
from vlm.errors import VlmError

BUILTIN = tuple(f"easyvqa:{split}" for split in easyvqa.SPLITS)


def builtin_split(spec: str) -> str | None:
    """"train"/"test" for a built-in name, None for a file path."""
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
    yes_no_per_image: int = 0,
    yes_no_negated: float = 0.5,
    yes_no_skew: float = 0.0,
    yes_no_skew_attributes=("color", "shape"),
    recall_questions: float = 0.0,
    recall_attributes=("color", "shape"),
) -> list[dict]:
    """LLaVA-format records.

    kind="captions": one describe-the-image exchange per caption (built-in split or
    caption file). kind="conversations": a built-in split's questions and captions, a
    LLaVA JSON file (.json), or a VQA or caption file (.jsonl/.csv) turned into exchanges.
    yes_no_per_image: built-in splits only, extra balanced yes/no questions per image,
        `yes_no_negated` of them in negated forms, those about `yes_no_skew_attributes`
        tilted by `yes_no_skew` (easyvqa.balanced_yes_no).
    recall_questions: built-in splits only, the fraction of yes/no questions about
        `recall_attributes` ("color", "shape") followed by "which color (shape) did I ask
        about?" (conversations.add_recall_questions).
    """
    if kind == "captions":
        return caption_conversations(caption_records(spec))
    split = builtin_split(spec)
    if split:
        return easyvqa_conversations(
            split,
            yes_no_per_image=yes_no_per_image,
            yes_no_negated=yes_no_negated,
            yes_no_skew=yes_no_skew,
            yes_no_skew_attributes=yes_no_skew_attributes,
            recall_questions=recall_questions,
            recall_attributes=recall_attributes,
        )
    if spec.endswith(".json"):
        return read_llava_json(spec)
    if "question" in first_row_columns(spec):
        return vqa_conversations(read_vqa(spec))
    return caption_conversations(read_captions(spec))
